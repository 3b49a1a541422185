"""Recovery (surgery.recover): the rows it reads, the closed forms, distillation, and the passes' recover=on."""

import pytest
import timm
import torch
from torch import nn

import surgery
from surgery import recover
from surgery.data import load_data
from surgery.errors import SurgeryError
from surgery.graph import trace
from surgery.nn.bilinear import BilinearProjection

from conftest import randomize_norm_stats

FIT_ATOL = 1e-4  # a noise-free linear target is met to this relative error


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(2, 1), dilation=2, bias=False),
    nn.Conv2d(4, 6, 1),
])
def test_input_rows_are_the_patches_the_conv_multiplies(conv):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 11)
    y = conv(x).detach()
    rows = recover.input_rows(conv, x, 50, seed=7)
    targets = recover.output_rows(y, recover.Fit("c", "c", "linear"), True, 50, seed=7)
    bias = conv.bias if conv.bias is not None else 0
    assert torch.allclose(rows @ conv.weight.reshape(6, -1).T + bias, targets, atol=1e-5)


def test_output_rows_keep_the_fits_channels():
    y = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 3, 5)  # (batch, tokens, channels)
    rows = recover.output_rows(y, recover.Fit("l", "l", "linear", channels=[4, 1], axis=-1), False, 100, 0)
    assert rows.shape == (6, 2)
    assert set(rows[:, 0].tolist()) == set(y[..., 4].flatten().tolist())


@pytest.mark.parametrize("rows", [400, 20])  # more rows than inputs (primal), fewer (the rows' kernel)
def test_linear_fit_recovers_a_noise_free_layer(rows):
    torch.manual_seed(0)
    target = nn.Linear(30, 8)
    layer = nn.Linear(30, 8)
    x = torch.randn(rows, 30)
    before, after, write = recover.fit_linear(layer, x, target(x).detach(), ridge=1e-9)
    assert before > 0.5 and after < FIT_ATOL
    write()
    assert torch.allclose(layer(x), target(x), atol=1e-3)
    if rows > 30:
        assert torch.allclose(layer.weight, target.weight, atol=1e-3)


def test_the_two_forms_of_ridge_least_squares_agree():
    torch.manual_seed(0)
    x, y = torch.randn(20, 50), torch.randn(20, 3)
    dual = recover.ridge_solve(x, y, 0.1)  # 20 rows < 50 inputs
    lam = 0.1 * x.double().square().sum() / 50
    primal = torch.linalg.solve(x.double().T @ x.double() + lam * torch.eye(50, dtype=torch.float64),
                                x.double().T @ y.double()).T
    assert torch.allclose(dual, primal, atol=1e-5)  # the kernel is summed in float32


def test_als_recovers_a_kronecker_layer_and_never_does_worse_than_its_start():
    torch.manual_seed(0)
    target = BilinearProjection(64, 36, rank=2)  # in grid 8x8, out grid 6x6
    layer = BilinearProjection(64, 36, rank=2)
    x = torch.randn(500, 64)
    y = target(x).detach()
    before, after, write = recover.fit_bilinear(layer, x, y, ridge=1e-9, sweeps=30)
    assert before > 0.5 and after < 1e-3
    write()
    assert torch.allclose(layer(x), y, atol=1e-3 * y.abs().max())
    # A dense target: the ALS starts from the kron-svd factors and lowers their error on the rows.
    dense = nn.Linear(64, 36)
    start = BilinearProjection(64, 36, rank=1)
    start.init_from_dense(dense.weight.detach(), dense.bias.detach())
    before, after, _ = recover.fit_bilinear(start, x, dense(x).detach(), ridge=1e-6, sweeps=10)
    assert after < before


def test_scaled_layers_fit_their_base_block_only():
    torch.manual_seed(0)
    dense = nn.Linear(64, 36)
    layer = BilinearProjection(64, 36, rank=1, scale=2)
    layer.init_from_dense(dense.weight.detach(), dense.bias.detach())
    extra = layer.U.detach()[:, :, 6:].clone()
    x = torch.randn(300, 64)
    _, after, write = recover.fit_bilinear(layer, x, dense(x).detach(), ridge=1e-6, sweeps=10)
    write()
    assert torch.equal(layer.U.detach()[:, :, 6:], extra)  # the widened columns stay as they were
    out = layer(x)[:, layer.output_index()]
    err = ((out - dense(x)).square().sum() / dense(x).square().sum()).sqrt().item()
    assert err == pytest.approx(after, rel=1e-3)


def test_segment_computes_what_the_graph_computes():
    torch.manual_seed(0)
    gm = trace(nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5)).eval(), torch.randn(2, 5))
    nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    sub, outside = recover.segment(gm, nodes[1:])
    x = torch.randn(4, 5)
    assert [n.name for n in outside] == [nodes[0].name]
    assert torch.equal(sub(gm.get_submodule(nodes[0].target)(x)), gm(x))
    assert sub.get_submodule(nodes[2].target) is gm.get_submodule(nodes[2].target)  # shared: training it trains gm


def test_compose_indexes_channels_through_two_passes():
    first = [recover.Fit("conv2", "conv2", "linear", channels=[0, 2, 3, 5])]
    second = [recover.Fit("conv2", "conv2", "bilinear", channels=[1, 3]), recover.Fit("fc", "fc", "bilinear")]
    out = {f.node: f for f in recover.compose(first, second, {"conv2", "fc"})}
    assert out["conv2"].channels == [2, 5] and out["conv2"].kind == "bilinear"
    assert out["fc"].channels is None
    kept = recover.compose(first, [], {"conv2"})
    assert [f.node for f in kept] == ["conv2"] and recover.compose(first, [], {"fc"}) == []


# --- the passes' recover=on and the recover pass ---------------------------------------------------


def _held_out(size=32, n=96):
    val = load_data("digits", image_size=size).val
    return torch.stack([val[i][0] for i in range(n)])


def _relative_error(model, reference, images):
    with torch.no_grad():
        ref = reference(images)
        return ((model(images) - ref).square().sum() / ref.square().sum()).sqrt().item()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 10)).eval()


def test_bilinear_recovery_moves_the_outputs_back_towards_the_dense_model():
    model, x = _mlp(), torch.randn(2, 3, 16, 16)
    spec = "bilinear:min_features=16"
    plain = surgery.apply(model, spec, example_inputs=x, measure=False)
    fitted = surgery.apply(model, spec + ",recover=on,data=digits,calib=128", example_inputs=x, measure=False)
    images = _held_out(16)
    assert _relative_error(fitted.model, model, images) < 0.75 * _relative_error(plain.model, model, images)
    rows = fitted.report["passes"][0]["recovery"]
    assert [r["kind"] for r in rows] == ["bilinear"] * 3 and all(r["after"] < r["before"] for r in rows)


def _resnet_with_live_blocks():
    torch.manual_seed(0)  # zero_init_last=False: a removed block is not an identity at random weights
    return randomize_norm_stats(timm.create_model("resnet18", num_classes=10, zero_init_last=False)).eval()


def test_ebcle_recovery_distills_the_blocks_next_to_the_removed_ones():
    model, x = _resnet_with_live_blocks(), torch.randn(2, 3, 32, 32)
    spec = "ebcle:depth=4,select=position"
    plain = surgery.apply(model, spec, example_inputs=x, measure=False)
    fitted = surgery.apply(model, spec + ",recover=on,data=digits,calib=64,steps=60", example_inputs=x,
                           measure=False)
    images = _held_out()
    assert _relative_error(fitted.model, model, images) < _relative_error(plain.model, model, images)
    rows = fitted.report["passes"][0]["recovery"]
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"distill"}
    assert any(r["kept"] and r["after"] < r["before"] for r in rows)


def test_the_recover_pass_fits_a_chain_once_against_the_original(tmp_path):
    model, x = _resnet_with_live_blocks(), torch.randn(2, 3, 32, 32)
    chain = ["prune:ratio=0.5,scope=uniform", "bilinear:targets=linear+conv1x1"]
    plain = surgery.apply(model, chain, example_inputs=x, measure=False)
    fitted = surgery.apply(model, chain + ["recover:data=digits,calib=64"], example_inputs=x, measure=False)
    images = _held_out()
    assert _relative_error(fitted.model, model, images) < 0.5 * _relative_error(plain.model, model, images)
    record = fitted.report["passes"][-1]
    kinds = [r["kind"] for r in record["recovery"]]
    # fc and the downsamples of layer3 and 4 are bilinear now (layer2.0.downsample is left under min_features)
    assert kinds.count("bilinear") == 3 and kinds.count("linear") == 17
    assert fitted.recipe["passes"][-1]["plan"] == {}
    # The fitted weights are the artifact's: reloaded, the model is the same function.
    out = fitted.save(tmp_path / "r18")
    loaded = surgery.load(out)
    with torch.no_grad():
        assert torch.allclose(loaded(images), fitted.model(images), atol=1e-5)


def test_recover_with_nothing_before_it_says_so_and_changes_nothing():
    model, x = _mlp(), torch.randn(2, 3, 16, 16)
    result = surgery.apply(model, ["recover:data=digits"], example_inputs=x, measure=False)
    effect = result.report["passes"][0]["effect"]
    assert not effect["changed"] and "nothing to align" in effect["reason"]


def test_recover_needs_calibration_images():
    model, x = _mlp(), torch.randn(2, 3, 16, 16)
    with pytest.raises(SurgeryError, match="bilinear:recover needs calibration images"):
        surgery.apply(model, "bilinear:min_features=16,recover=on", example_inputs=x, measure=False)
    with pytest.raises(SurgeryError, match="recover:steps must be >= 1"):
        surgery.apply(model, "recover:steps=0", example_inputs=x, measure=False)


def test_recover_aligns_a_saved_artifact_with_the_model_it_was_made_from(tmp_path):
    torch.manual_seed(0)
    source = surgery.apply("resnet18", [], input_size="3x32x32", measure=False)
    source_dir = source.save(tmp_path / "r18")
    pruned_dir = surgery.apply(str(source_dir), ["prune:ratio=0.5,scope=uniform"], measure=False).save(tmp_path / "p")
    plain = surgery.apply(str(pruned_dir), ["recover:data=digits"], measure=False)  # no source: nothing to align
    assert "nothing to align" in plain.report["passes"][0]["effect"]["reason"]
    fitted = surgery.apply(str(pruned_dir), [f"recover:source={source_dir},data=digits,calib=32"], measure=False)
    rows = fitted.report["passes"][0]["recovery"]
    assert len(rows) == 20 and all(r["kind"] == "linear" for r in rows)
    original = surgery.load(source_dir)
    images = _held_out()
    assert _relative_error(fitted.model, original, images) < 0.5 * _relative_error(plain.model, original, images)
    with pytest.raises(SurgeryError, match="not the architecture this artifact was made from"):
        other = surgery.apply("resnet34", [], input_size="3x32x32", measure=False).save(tmp_path / "r34")
        surgery.apply(str(pruned_dir), [f"recover:source={other},data=digits"], measure=False)
    with pytest.raises(SurgeryError, match="holds no passes"):
        surgery.apply(str(source_dir), [f"recover:source={source_dir},data=digits"], measure=False)
