"""Residual blocks and stages from the fx graph: counts on known models, exact collapse, identity scores."""

import copy
import math

import pytest
import timm
import torch
from torch import nn

from surgery.blocks import collapse, find_structure, identity_scores, zero_block
from surgery.errors import SurgeryError
from surgery.graph import compare_outputs, propagate_shapes, trace

from conftest import randomize_norm_stats

COLLAPSE_ATOL = 1e-5

# name, input size, timm kwargs, blocks per stage, heads per stage, residual adds per block
KNOWN = {
    "resnet50": (64, {}, [3, 4, 6, 3], ["layer1.0", "layer2.0", "layer3.0", "layer4.0"], 1),
    "efficientnet_b0": (64, {}, [2, 2, 3, 3, 4], ["blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0",
                                                  "blocks.5.0"], 1),
    "convnext_atto": (64, {}, [2, 2, 6, 2], [None] * 4, 1),
    "vit_tiny_patch16_224": (32, {"img_size": 32}, [12], [None], 2),
    "densenet121": (32, {}, [6, 12, 24, 16], [None] * 4, 0),
}


def _wake(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics, layer scales and heads: timm's zero inits would make every block an identity."""
    g = torch.Generator().manual_seed(seed)
    randomize_norm_stats(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and (name.endswith("gamma") or ".ls" in name or "norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5 if not name.endswith("bias")
                        else torch.randn(p.shape, generator=g) * 0.1)
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            head.weight.normal_(0, head.in_features ** -0.5, generator=g)
    return model


@pytest.fixture(scope="module", params=list(KNOWN))
def traced(request):
    name = request.param
    size, kwargs, *_ = KNOWN[name]
    torch.manual_seed(0)
    model = _wake(timm.create_model(name, num_classes=10, **kwargs)).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return name, trace(model, x), x


def test_blocks_and_stages_of_known_models(traced):
    name, gm, _ = traced
    _, _, counts, heads, adds = KNOWN[name]
    s = find_structure(gm)
    assert s.counts == counts
    assert [st.head.name if st.head else None for st in s.stages] == heads
    kinds = {b.kind for st in s.stages for b in st.collapsible}
    assert kinds == ({"dense"} if adds == 0 else {"residual"})
    assert all(len(b.residuals) == adds for b in s.blocks if b.collapsible)
    assert all(b.span and b.modules for b in s.blocks if b.collapsible)


def test_collapsing_a_zeroed_block_keeps_the_output(traced):
    """Zero the branch of a block in every stage; collapsing those blocks must not change the output."""
    name, gm, x = traced
    gm = copy.deepcopy(gm)
    s = find_structure(gm)
    with torch.no_grad():
        original = gm(x)
    chosen = [st.collapsible[-1] for st in s.stages] + [s.stages[-1].collapsible[0]]
    for b in chosen:
        zero_block(gm, b)
    with torch.no_grad():
        zeroed = gm(x)
    assert compare_outputs(original, zeroed) > 1e-3  # the zeroed blocks did matter
    n_params = sum(p.numel() for p in gm.parameters())
    small = collapse(copy.deepcopy(gm), chosen)
    with torch.no_grad():
        out = small(x)
    assert compare_outputs(zeroed, out) <= COLLAPSE_ATOL
    assert sum(p.numel() for p in small.parameters()) < n_params
    propagate_shapes(small, x)
    left = sum(len(st.collapsible) for st in find_structure(small).stages)
    assert left == sum(len(st.collapsible) for st in s.stages) - len({b.name for b in chosen})


class _Toy(nn.Module):
    """x + gamma * f(x) with a drop path, a block whose branch leaks, and a projection block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.f1 = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))
        self.drop = timm.layers.DropPath(0.1)
        self.f2 = nn.Conv2d(8, 8, 1)
        self.f3 = nn.Conv2d(8, 8, 1)
        self.proj = nn.Conv2d(8, 16, 1)
        self.f4 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(8 + 16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.drop(self.gamma * self.f1(x))
        x = self.f2(x) + x
        tap = self.f3(x)  # used by the add and by the head: this branch cannot go
        x = x + tap
        y = self.proj(x) + self.f4(x)
        return self.head(torch.cat([tap.mean((2, 3)), y.mean((2, 3))], 1))


def test_toy_residuals_gamma_drop_path_leaks_and_scores():
    torch.manual_seed(0)
    model = _Toy().eval()
    x = torch.randn(4, 3, 16, 16)
    gm = trace(model, x)
    s = find_structure(gm)
    assert s.counts == [2]  # gamma/drop-path block and the plain one; the leaking add is left out
    assert any("also used outside" in why for why in s.skipped)
    b1, b2 = s.stages[0].blocks
    # ||gamma * f1(x)|| / ||x||, computed by hand
    with torch.no_grad():
        h = model.stem(x)
        f = 0.5 * model.f1(h)
        expected = math.sqrt(float(f.double().square().sum() / h.double().square().sum()))
    scores = identity_scores(gm, s, [x[:2], x[2:]], output_change=True)
    assert scores[b1.name]["branch"] == pytest.approx(expected, rel=1e-5)
    # output change of dropping block 1 alone equals what the collapsed graph gives
    small = collapse(copy.deepcopy(gm), [b1])
    with torch.no_grad():
        ref, out = gm(x), small(x)
    want = float((out - ref).double().norm() / ref.double().norm())
    assert scores[b1.name]["output"] == pytest.approx(want, rel=1e-5)
    assert scores[b2.name]["output"] > 0


def test_heads_cannot_collapse_and_shapes_are_required():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    gm = trace(model, torch.randn(1, 3, 32, 32))
    s = find_structure(gm)
    assert s.counts == [2, 2, 2, 2] and s.stages[0].head is None and s.stages[1].head.name == "layer2.0"
    with pytest.raises(SurgeryError, match="cannot be collapsed"):
        collapse(gm, [s.stages[1].head])
    bare = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(SurgeryError, match="no shapes"):
        find_structure(bare)
