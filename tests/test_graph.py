import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.errors import SurgeryError
from surgery.graph import compare_outputs, finalize, node_shape

# (timm name, input H=W, extra create kwargs): small inputs where the model allows, to keep CI fast.
TRACE_MODELS = [
    ("resnet18", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("mobilenetv3_small_050", 64, {}),
    ("convnext_atto", 64, {}),
    ("vit_tiny_patch16_224", 64, {"img_size": 64}),
    ("levit_128s", 224, {}),
    ("swin_tiny_patch4_window7_224", 224, {}),
]


@pytest.mark.parametrize("name,size,kwargs", TRACE_MODELS, ids=[m[0] for m in TRACE_MODELS])
def test_trace_timm_models_match_eager_with_shapes(name, size, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    gm = surgery.trace(model, x)
    with torch.no_grad():
        diff = compare_outputs(model(x), gm(x))
    assert diff <= 1e-5
    assert gm.meta["surgery"].max_abs_diff <= 1e-5
    # Every module call produced a tensor, so every one carries its shape.
    modules = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert modules and all("tensor_meta" in n.meta for n in modules)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert node_shape(out.args[0]) == (2, 10)


def test_trace_binds_optional_forward_args_and_keeps_batch_dynamic():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3).eval()
    gm = surgery.trace(model, torch.randn(2, 3, 32, 32))
    assert "attn_mask" in gm.meta["surgery"].concrete_args
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert compare_outputs(model(x5), gm(x5)) <= 1e-5


def test_trace_does_not_touch_the_callers_model(convbn, images):
    before = {k: v.clone() for k, v in convbn.state_dict().items()}
    convbn.train()
    gm = surgery.trace(convbn, images)
    assert convbn.training and gm.training  # mode restored, and mirrored on the graph
    gm.conv1.weight.data.zero_()
    assert all(torch.equal(before[k], v) for k, v in convbn.state_dict().items())


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor: not symbolically traceable
            return x * 2
        return x - 1


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.odd = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.odd(self.conv(x)).mean((2, 3)))


def test_untraceable_submodule_becomes_a_leaf(images):
    model = WithUntraceable().eval()
    gm = surgery.trace(model, images)
    assert gm.meta["surgery"].leaf_fallbacks == ["odd"]
    assert any(n.op == "call_module" and n.target == "odd" for n in gm.graph.nodes)
    with torch.no_grad():
        assert compare_outputs(model(images), gm(images)) == 0.0
        neg = -images.abs() - 1  # takes the other branch: the leaf still decides at run time
        assert compare_outputs(model(neg), gm(neg)) == 0.0


class TopLevelUntraceable(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_root_is_a_clear_error(images):
    with pytest.raises(SurgeryError, match="cannot fx-trace TopLevelUntraceable"):
        surgery.trace(TopLevelUntraceable(), images)


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def test_graph_that_differs_from_eager_fails_loudly(images):
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        surgery.trace(Noisy(), images)


def test_input_that_does_not_fit_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with pytest.raises(SurgeryError, match="does not fit"):
        surgery.trace(model, torch.randn(1, 3, 16, 16))


def test_timm_linear_stays_a_module_so_the_head_pass_finds_it():
    # mobilenetv3's classifier is timm.layers.Linear (an nn.Linear subclass for AMP): traced
    # through, it would become F.linear on get_attr weights and no pass would see a Linear.
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = surgery.trace(model, x)
    assert isinstance(gm.get_submodule("classifier"), timm.layers.Linear)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    result = surgery.apply(model, ["head:num_classes=7"], example_inputs=x, measure=False)
    assert result.model(x).shape == (2, 7)


class PadToPatches(nn.Module):
    """MobileViT's pattern: control flow and math.ceil on the input's spatial size."""

    def __init__(self, patch=4):
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        new_h = math.ceil(h / self.patch) * self.patch
        if new_h != h:
            x = F.interpolate(x, size=(new_h, new_h), mode="bilinear", align_corners=False)
        x = self.conv(x)
        return x.reshape(b, 4, -1).mean(-1)  # b stays traced: any batch


class WithShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = PadToPatches()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.pad(x))


def test_control_flow_on_shapes_is_decided_by_the_example_input():
    model = WithShapeBranch().eval()
    x = torch.randn(2, 3, 14, 14)
    gm = surgery.trace(model, x)
    info = gm.meta["surgery"]
    assert info.leaf_fallbacks == [] and info.specialized == {"pad": 1}  # the `if` (the ceil stays a traced op)
    assert not any(n.op == "call_module" and n.target == "pad" for n in gm.graph.nodes)
    with torch.no_grad():
        for batch in (1, 3):  # the batch was never fixed
            other = torch.randn(batch, 3, 14, 14)
            assert compare_outputs(model(other), gm(other)) <= 1e-6


def test_control_flow_on_tensor_values_is_never_decided_at_trace(images):
    """Negative control: `if x.sum() > 0` depends on values, so the module stays a leaf."""
    gm = surgery.trace(WithUntraceable().eval(), images)
    assert gm.meta["surgery"].specialized == {} and gm.meta["surgery"].leaf_fallbacks == ["odd"]


class InPlaceGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gain = nn.Parameter(torch.full((1, 3, 1, 1), 0.5))

    def forward(self, x):
        out = self.conv(x)
        out.mul_(self.gain)  # NFNet's skipinit: the result of mul_ goes unused
        return out + x


def test_in_place_methods_survive_dead_code_elimination(images):
    model = InPlaceGain().eval()
    gm = finalize(surgery.trace(model, images))
    assert any(n.target == "mul_" for n in gm.graph.nodes)
    with torch.no_grad():
        assert compare_outputs(model(images), gm(images)) <= 1e-6


def test_timm_blocks_marked_untraceable_are_traced_through_where_they_can_be():
    model = timm.create_model("mobilevit_xxs", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = surgery.trace(model, x)
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert "MobileVitBlock" not in kinds and gm.meta["surgery"].leaf_fallbacks == []
    with torch.no_grad():
        other = torch.randn(3, 3, 64, 64)
        assert compare_outputs(model(other), gm(other)) <= 1e-5 * max(1.0, model(other).abs().max().item())
