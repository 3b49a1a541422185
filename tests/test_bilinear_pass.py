"""Pass `bilinear` on timm models (small inputs): forward, ONNX parity, artifact round trip, options."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.errors import SurgeryError
from surgery.export import check_parity, export_onnx
from surgery.graph import compare_outputs
from surgery.nn import BilinearConv2d, BilinearProjection
from surgery.passes import parse_spec
from surgery.passes.bilinear import BilinearConfig

RELOAD_ATOL = 1e-6  # reload is the same graph with the same weights
ATOL = 1e-5

# name, spec for surgery.load_model, pass options, the rewritten module types expected
MODELS = {
    "resnet18": (dict(num_classes=10, input_size="3x32x32"), "bilinear:targets=linear+conv1x1",
                 {"linear": 1, "conv1x1": 3}),
    "vit_tiny_patch16_224": (dict(num_classes=10, input_size="3x32x32"), "bilinear:scale=2,skip=*.attn.*",
                             {"linear": 25}),
    "convnext_atto": (dict(num_classes=10, input_size="3x32x32"),
                      "bilinear:targets=linear+conv1x1+conv,rank=2,min_features=32", {"linear": 1, "conv1x1": 24,
                                                                                       "conv": 4}),
    "mixer_s32_224": (dict(num_classes=10, input_size="3x64x64"), "bilinear:rank=2,pad=true", {"linear": 25}),
}


class TinyMLP(nn.Module):
    """Linear -> GELU -> Linear -> ReLU/dropout -> Linear: every layer but the last can be scaled."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 30)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(30, 5)

    def forward(self, x):
        x = self.fc2(self.act(self.fc1(x.flatten(1))))
        return self.head(self.drop(torch.relu(x) * 0.5))


def _count(model: nn.Module) -> dict[str, int]:
    kinds = {"linear": 0, "conv1x1": 0, "conv": 0}
    for m in model.modules():
        if isinstance(m, BilinearProjection):
            kinds["linear"] += 1
        elif isinstance(m, BilinearConv2d):
            kinds["conv1x1" if m.pointwise else "conv"] += 1
    return {k: v for k, v in kinds.items() if v}


@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.slow) for m in MODELS])
def rewritten(request, tmp_path_factory):
    """Each model rewritten, saved and exported once."""
    name = request.param
    spec, options, _ = MODELS[name]
    torch.manual_seed(0)
    loaded = surgery.load_model(name, **spec)
    result = surgery.apply(loaded, [options], measure=False)
    out = tmp_path_factory.mktemp(name)
    result.save(out / "artifact")
    onnx_path = export_onnx(result.model, torch.randn(1, *result.input_size), out / "model.onnx")
    return name, loaded.model, result, out / "artifact", onnx_path


def test_pass_rewrites_and_forwards(rewritten):
    name, original, result, _, _ = rewritten
    assert _count(result.model) == MODELS[name][2]
    x = torch.randn(2, *result.input_size)
    with torch.no_grad():
        out, ref = result.model(x), original(x)
    assert out.shape == ref.shape == (2, 10) and torch.isfinite(out).all()
    plan = result.recipe["passes"][0]["plan"]
    assert len(plan["layers"]) == sum(MODELS[name][2].values())
    assert all(e["params_after"] < e["params_before"] for e in plan["layers"] if e["in_features"] >= 64)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in original.parameters())
    if name == "vit_tiny_patch16_224":  # scale=2: fc1 widened, fc2 takes fc1's grid, the head keeps 10 outputs
        mlp = result.model.get_submodule("blocks.0.mlp")
        assert mlp.fc1.out_features == 4 * 768 and mlp.fc1.out_shape == (48, 64)
        assert mlp.fc2.in_features == 4 * 768 and mlp.fc2.in_shape == (48, 64) and mlp.fc2.out_features == 192
        assert result.model.head.scale == 1 and result.model.head.out_features == 10


def test_pass_onnx_parity(rewritten):
    _, _, result, _, onnx_path = rewritten
    assert check_parity(result.model, onnx_path, result.input_size)["ok"]


def test_pass_artifact_round_trip(rewritten):
    _, _, result, artifact, _ = rewritten
    model = surgery.load(artifact)
    x = torch.randn(3, *result.input_size)
    with torch.no_grad():
        assert compare_outputs(result.model(x), model(x)) <= RELOAD_ATOL


def test_resnet50_classifier_is_rewritten_by_default():
    result = surgery.apply("resnet50", ["bilinear"], input_size="3x64x64", measure=False)
    fc = result.model.fc
    assert isinstance(fc, BilinearProjection) and (fc.in_shape, fc.out_shape) == ((32, 64), (25, 40))
    (layer,) = result.recipe["passes"][0]["plan"]["layers"]
    assert layer["name"] == "fc" and layer["classifier"]
    assert layer["params_before"] == 2_049_000 and layer["params_after"] == 32 * 25 + 64 * 40 + 1000
    notes = result.report["passes"][0]["notes"]
    assert notes[0].startswith("rewrote 1 linear") and "2,049,000 -> 4,360" in notes[0]
    assert any(n.startswith("fc (linear 2048->1000, classifier)") and "rel. error" in n for n in notes)
    json.dumps(result.recipe)  # the plan is JSON


def test_scale_starts_at_the_function_of_scale_one(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(4, 24)
    plain = surgery.apply(model, ["bilinear:min_features=1"], example_inputs=x.reshape(4, 1, 4, 6), measure=False)
    wide = surgery.apply(model, ["bilinear:min_features=1,scale=2"], example_inputs=x.reshape(4, 1, 4, 6),
                         measure=False)
    gm = wide.model
    assert (gm.fc1.out_features, gm.fc2.in_features, gm.fc2.out_features, gm.head.in_features) == (128, 128, 120, 120)
    assert gm.head.out_features == 5
    with torch.no_grad():
        assert compare_outputs(plain.model(x.reshape(4, 1, 4, 6)), gm(x.reshape(4, 1, 4, 6))) <= ATOL
    wide.save(tmp_path / "mlp")
    again = surgery.load(tmp_path / "mlp", base_model=TinyMLP())
    with torch.no_grad():
        assert compare_outputs(gm(x.reshape(4, 1, 4, 6)), again(x.reshape(4, 1, 4, 6))) <= RELOAD_ATOL


def test_scale_widens_a_dense_consumer():
    torch.manual_seed(0)
    model = TinyMLP().eval()
    x = torch.randn(4, 1, 4, 6)
    plain = surgery.apply(model, ["bilinear:min_features=1,skip=fc2+head"], example_inputs=x, measure=False)
    wide = surgery.apply(model, ["bilinear:min_features=1,skip=fc2+head,scale=3"], example_inputs=x, measure=False)
    gm = wide.model
    assert type(gm.fc2) is nn.Linear and gm.fc2.in_features == 9 * 32
    assert wide.recipe["passes"][0]["plan"]["widened"] == [
        {"name": "fc2", "in_features": 288, "out_features": 30, "bias": True}]
    with torch.no_grad():
        assert compare_outputs(plain.model(x), gm(x)) <= ATOL


def test_scale_refuses_layers_it_cannot_widen(convbn, images):
    with pytest.raises(SurgeryError, match=r"scale=2 cannot widen .*fc: it feeds bn_fc .*skip="):
        surgery.apply(convbn, ["bilinear:min_features=1,scale=2"], example_inputs=images, measure=False)
    with pytest.raises(SurgeryError, match=r"conv2: it is a convolution"):
        surgery.apply(convbn, ["bilinear:min_features=1,scale=2,targets=conv,skip=conv1"], example_inputs=images,
                      measure=False)


def test_scale_refuses_a_model_with_nothing_to_widen():
    with pytest.raises(SurgeryError, match=r"scale=2 widens no layer of this model \(selected: fc;"):
        surgery.apply("resnet18", ["bilinear:scale=2"], input_size="3x32x32", measure=False)


class TracedThroughLinear(nn.Linear):
    """An nn.Linear subclass outside torch.nn: fx traces through it to F.linear(x, W, b)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_traced_through_linear_subclass_is_rewritten(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 96), nn.ReLU(), TracedThroughLinear(96, 10)).eval()
    x = torch.randn(2, 6, 4, 4)
    result = surgery.apply(model, ["bilinear:scale=2"], example_inputs=x, measure=False)
    gm = result.model
    assert isinstance(gm.get_submodule("3"), BilinearProjection) and gm.get_submodule("3").in_features == 4 * 96
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    (head,) = [e for e in result.recipe["passes"][0]["plan"]["layers"] if e["name"] == "3"]
    assert head["call"] == "function" and head["classifier"]
    result.save(tmp_path / "seq")
    again = surgery.load(tmp_path / "seq", base_model=nn.Sequential(nn.Flatten(), nn.Linear(96, 96), nn.ReLU(),
                                                                    TracedThroughLinear(96, 10)))
    with torch.no_grad():
        assert compare_outputs(gm(x), again(x)) <= RELOAD_ATOL


def test_timm_linear_is_rewritten_as_a_module():
    """timm's Linear (MobileNetV3, GhostNet classifiers) stays a module in the graph."""
    from timm.layers import Linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 96), nn.ReLU(), Linear(96, 10)).eval()
    result = surgery.apply(model, ["bilinear:scale=2"], example_inputs=torch.randn(2, 6, 4, 4), measure=False)
    (head,) = [e for e in result.recipe["passes"][0]["plan"]["layers"] if e["name"] == "3"]
    assert "call" not in head and head["classifier"]  # a plain module call, not F.linear
    assert isinstance(result.model.get_submodule("3"), BilinearProjection)


def test_selection_options(convbn, images):
    result = surgery.apply(convbn, ["bilinear:min_features=1,targets=linear+conv1x1+conv,skip=conv1"],
                           example_inputs=images, measure=False)
    gm = result.model
    assert type(gm.conv1) is nn.Conv2d  # skipped
    assert isinstance(gm.conv2, BilinearConv2d) and not gm.conv2.pointwise
    assert isinstance(gm.conv3, BilinearConv2d) and gm.conv3.pointwise
    assert isinstance(gm.fc, BilinearProjection) and isinstance(gm.head, BilinearProjection)
    kept = surgery.apply(convbn, ["bilinear:min_features=1,keep_classifier=true"], example_inputs=images,
                         measure=False).model
    assert type(kept.head) is nn.Linear and isinstance(kept.fc, BilinearProjection)
    small = surgery.apply(convbn, ["bilinear"], example_inputs=images, measure=False)
    assert type(small.model.fc) is nn.Linear  # 8 input features < min_features=64
    assert "left dense: 2 (< 64 input features)" in small.report["passes"][0]["notes"][0]


def test_random_init_reports_no_error(convbn, images):
    result = surgery.apply(convbn, [BilinearConfig(min_features=1, init="random", targets="linear")],
                           example_inputs=images, measure=False)
    assert all(e["rel_error"] is None for e in result.recipe["passes"][0]["plan"]["layers"])


@pytest.mark.parametrize("spec,message", [
    ("bilinear:rank=0", "rank must be an integer >= 1"),
    ("bilinear:scale=0", "scale must be an integer >= 1"),
    ("bilinear:targets=linear+conv3x3", "unknown target 'conv3x3'"),
    ("bilinear:targets=", "targets is empty"),
    ("bilinear:init=svd", "must be one of kron-svd, random"),
    ("bilinear:min_features=0", "min_features must be an integer >= 1"),
    ("bilinear:rank=two", "must be an integer"),
    ("bilinear:ranks=2", "did you mean rank"),
])
def test_bad_options_are_surgery_errors(spec, message):
    with pytest.raises(SurgeryError, match=message):
        parse_spec(spec)


def test_prime_sizes_are_noted_and_padded_on_request():
    model = nn.Sequential(nn.Flatten(), nn.Linear(97, 10)).eval()
    x = torch.randn(2, 1, 1, 97)
    result = surgery.apply(model, ["bilinear"], example_inputs=x, measure=False)
    assert result.model.get_submodule("1").in_shape == (1, 97)
    assert any("prime size" in n and "pad=true" in n for n in result.report["passes"][0]["notes"])
    assert result.recipe["passes"][0]["plan"]["layers"][0]["degenerate"] == ["in"]
    padded = surgery.apply(model, ["bilinear:pad=true"], example_inputs=x, measure=False)
    layer = padded.model.get_submodule("1")
    assert layer.in_shape == (7, 14) and layer.in_pad == 1 and layer.out_features == 10
    assert not any("prime size" in n for n in padded.report["passes"][0]["notes"])


def test_bad_config_object_is_refused_before_any_work(convbn, images):
    with pytest.raises(SurgeryError, match="unknown target 'dense'"):
        surgery.apply(convbn, [BilinearConfig(targets=["dense"])], example_inputs=images, measure=False)
