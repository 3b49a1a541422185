"""Pass `ebcle`: depth from entropy, which blocks go, widening, plans that replay, ONNX and reload."""

import json
import math

import pytest
import timm
import torch

import surgery
from surgery.blocks import find_structure
from surgery.entropy import MAX_NATS
from surgery.errors import SurgeryError
from surgery.graph import compare_outputs, trace
from surgery.passes import PassContext, parse_spec
from surgery.passes.ebcle import RULES, EbcleConfig, choose, ebcle, register_rule, spread

from conftest import randomize_norm_stats

RELOAD_ATOL = 1e-6
PRESERVE_ATOL = 1e-5


def _stage_counts(model, size=32):
    return find_structure(trace(model, torch.randn(1, 3, size, size))).counts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The must-show run, small: resnet50 with data=digits, saved with ONNX."""
    loaded = surgery.load_model("resnet50", num_classes=10, input_size="3x32x32")
    torch.manual_seed(0)
    randomize_norm_stats(loaded.model)  # timm zero-inits each block's last BN: make the blocks do something
    result = surgery.apply(loaded, ["ebcle:data=digits,calib=16"], measure=False)
    out = tmp_path_factory.mktemp("art") / "r50-ebcle"
    result.save(out, onnx=True)
    return result, out


def test_resnet50_on_digits_removes_blocks_and_reloads(saved):
    result, out = saved
    plan = result.recipe["passes"][-1]["plan"]
    # digits: ~1.91 nats; linear rule keeps round(1.91 / ln 256 * 16) = 6 of 16 blocks
    assert 1.8 < plan["entropy"] < 2.0 and plan["bound"] == 6 and plan["keep"] == [1, 2, 2, 1]
    assert len(plan["removed"]) == 10 and plan["select"] == "identity"
    assert _stage_counts(result.model) == [2, 2]  # layer2 and layer3 keep head + 1; layer1, layer4 only heads
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = result.model(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    # the kept blocks are the least identity-like of their stage
    for stage in plan["stages"]:
        gone = set(stage["removed"])
        kept = [b for b in stage["blocks"][1:] if b not in gone]
        for k in kept:
            assert all(plan["scores"][k]["branch"] >= plan["scores"][r]["branch"] for r in gone)
    model = surgery.load(out)  # rebuilt from the recipe: no data needed
    with torch.no_grad():
        assert compare_outputs(y, model(x)) <= RELOAD_ATOL
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["parity"]["ok"]
    notes = report["passes"][-1]["notes"]
    assert any(n.startswith("entropy of digits") for n in notes) and any(n.startswith("layer3:") for n in notes)


def test_spread_and_rules():
    assert spread([3, 4, 6, 3], 6) == [1, 2, 2, 1]
    assert spread([3, 4, 6, 3], 16) == [3, 4, 6, 3]
    assert spread([3, 4, 6, 3], 1) == [1, 1, 1, 1]  # a stage keeps at least one block
    assert spread([12], 5) == [5]
    for total in range(4, 17):
        keep = spread([3, 4, 6, 3], total)
        assert sum(keep) == total and all(1 <= k <= c for k, c in zip(keep, [3, 4, 6, 3]))
    linear = RULES["linear"][0]
    assert linear(MAX_NATS, [3, 4, 6, 3]) == pytest.approx(16) and linear(0.0, [3, 4]) == 0
    assert RULES["sqrt"][0](MAX_NATS / 4, [8]) == pytest.approx(4)


def test_overrides_and_position_select():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    r = surgery.apply(model, ["ebcle:depth=5,select=position"], example_inputs=x, measure=False)
    plan = r.recipe["passes"][-1]["plan"]
    assert plan["keep"] == [2, 1, 1, 1]  # 5 over 2+2+2+2: one each, the spare to the first stage
    # position: the last blocks of each stage go first
    assert all(name.endswith(".1") for name in plan["removed"]) and len(plan["removed"]) == 3
    r = surgery.apply(model, ["ebcle:keep=2+1+1+2,select=position"], example_inputs=x, measure=False)
    assert r.recipe["passes"][-1]["plan"]["removed"] == ["layer2.1", "layer3.1"]
    # entropy given directly, no data: the rule decides, position selects
    r = surgery.apply(model, [f"ebcle:entropy={MAX_NATS / 2}"], example_inputs=x, measure=False)
    plan = r.recipe["passes"][-1]["plan"]
    assert plan["bound"] == 4 and plan["select"] == "position"


def test_custom_rule_is_pluggable():
    register_rule("half", "keep half the blocks")(lambda entropy, counts: sum(counts) / 2)
    try:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=10).eval()
        r = surgery.apply(model, ["ebcle:entropy=1.0,rule=half"], example_inputs=torch.randn(2, 3, 32, 32),
                          measure=False)
        assert r.recipe["passes"][-1]["plan"]["bound"] == 4
    finally:
        RULES.pop("half")


def test_identity_select_removes_blocks_whose_branch_is_small():
    loaded = surgery.load_model("resnet50", num_classes=10, input_size="3x32x32")
    torch.manual_seed(0)
    model = randomize_norm_stats(loaded.model)
    with torch.no_grad():  # layer1.1 and layer3.3 nearly identities: they must be the ones removed
        for bn in (model.layer1[1].bn3, model.layer3[3].bn3):
            bn.weight.mul_(1e-3)
            bn.bias.mul_(1e-3)
    r = surgery.apply(loaded, ["ebcle:data=digits,keep=2+4+5+3,calib=8"], measure=False)
    plan = r.recipe["passes"][-1]["plan"]
    assert sorted(plan["removed"]) == ["layer1.1", "layer3.3"]
    assert plan["scores"]["layer1.1"]["branch"] < 0.1 * plan["scores"]["layer1.2"]["branch"]


def test_widen_keeps_the_function_and_replays(tmp_path):
    loaded = surgery.load_model("efficientnet_b0", num_classes=10, input_size="3x32x32")
    torch.manual_seed(0)
    randomize_norm_stats(loaded.model)
    plain = surgery.apply(loaded, ["ebcle:depth=8,select=position"], measure=False)
    wide = surgery.apply(loaded, ["ebcle:depth=8,select=position,widen=1.5"], measure=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert compare_outputs(plain.model(x), wide.model(x)) <= PRESERVE_ATOL
    n_plain = sum(p.numel() for p in plain.model.parameters())
    n_wide = sum(p.numel() for p in wide.model.parameters())
    assert n_wide > 1.2 * n_plain
    grown = wide.recipe["passes"][-1]["plan"]["widen"]
    assert grown and all(new >= 1.5 * old - 8 and new > old for old, new in grown.values())
    wide.save(tmp_path / "wide")
    with torch.no_grad():
        assert compare_outputs(wide.model(x), surgery.load(tmp_path / "wide")(x)) <= RELOAD_ATOL


def test_dense_layers_collapse_through_the_pass():
    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model("densenet121", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    r = surgery.apply(model, ["ebcle:keep=2+2+2+2,select=position"], example_inputs=x, measure=False)
    assert _stage_counts(r.model) == [2, 2, 2, 2]
    assert sum(p.numel() for p in r.model.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert r.model(x).shape == (2, 10)


@pytest.mark.parametrize("spec, message", [
    ("ebcle:rule=cubic", "rule must be one of"),
    ("ebcle:depth=0", "depth must be >= 1"),
    ("ebcle:depth=4,keep=1+1+1+1", "depth or keep"),
    ("ebcle:keep=0+1", ">= 1 block per stage"),
    ("ebcle:entropy=9", "between 0 and ln 256"),
    ("ebcle:widen=0.5", "between 1"),
    ("ebcle:select=fast", "must be one of"),
])
def test_bad_options(spec, message):
    with pytest.raises(SurgeryError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize("options, message", [
    ({}, "needs the data set's entropy"),
    ({"keep": [1, 1]}, "give one per stage"),
    ({"keep": [1, 3, 1, 1]}, "which has 2"),
    ({"depth": 99}, "between 4"),
    ({"depth": 6, "select": "identity"}, "needs calibration images"),
])
def test_bad_runs(options, message):
    gm = trace(timm.create_model("resnet18", num_classes=10).eval(), torch.randn(2, 3, 32, 32))
    ctx = PassContext(example_inputs=(torch.randn(2, 3, 32, 32),))
    with pytest.raises(SurgeryError, match=message):
        ebcle(gm, EbcleConfig(**options), ctx)


def test_model_without_blocks_is_a_stated_no_op():
    # Nothing to collapse is reported as no change (--strict refuses it), not raised.
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    result = surgery.apply(net, ["ebcle:depth=1"], example_inputs=torch.randn(1, 3, 8, 8), measure=False)
    effect = result.report["passes"][0]["effect"]
    assert effect["changed"] is False and "no residual" in effect["reason"]
    assert result.recipe["passes"][0]["plan"] == {"removed": []}


def test_choose_never_removes_heads():
    torch.manual_seed(0)
    s = find_structure(trace(timm.create_model("resnet50").eval(), torch.randn(1, 3, 32, 32)))
    for select in ("position", "identity"):
        removed = choose(s, [1, 1, 1, 1], select, scores={})
        assert len(removed) == 12 and not any(b.kind == "head" for b in removed)
    assert math.isclose(sum(spread(s.counts, 6)), 6)


def test_collapsed_resnet_trains():
    """The ReLU after a collapsed add is made out-of-place: in place it would overwrite x, which autograd needs."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    x = torch.randn(4, 3, 16, 16)
    r = surgery.apply(model, ["ebcle:keep=1+1+1+1,select=position"], example_inputs=x, measure=False)
    gm = r.model.train()
    torch.nn.functional.cross_entropy(gm(x), torch.arange(4)).backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, kwargs, counts", [
    # each residual followed by a pointwise conv + norm outside it: one block per stage before
    ("ConvMixer", {"dim": 16, "depth": 4, "kernel_size": 3, "patch_size": 4}, [4]),
    # attention and MLP residuals on (B, H, W, C) and (B, H * W, C) views of the same stream
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
                                      "window_size": 4}, [4, 4]),
])
def test_single_block_runs_join_into_stages_and_collapse(name, kwargs, counts):
    torch.manual_seed(0)
    if name == "ConvMixer":
        from timm.models.convmixer import ConvMixer

        model = ConvMixer(num_classes=10, **kwargs)
    else:
        model = timm.create_model(name, num_classes=10, **kwargs)
    model = randomize_norm_stats(model).eval()
    assert _stage_counts(model) == counts
    x = torch.randn(2, 3, 32, 32)
    r = surgery.apply(model, [f"ebcle:depth={len(counts)},select=position"], example_inputs=x, measure=False)
    plan = r.recipe["passes"][-1]["plan"]
    assert plan["keep"] == [1] * len(counts) and len(plan["removed"]) == sum(counts) - len(counts)
    effect = r.report["passes"][-1]["effect"]
    assert effect["changed"] and effect["after"]["flops"] < 0.9 * effect["before"]["flops"]
    assert effect["target"]["met"], effect["target"]  # the FLOPs of the removed blocks, as predicted
    with torch.no_grad():
        assert r.model(x).shape == (2, 10)
