import timm
import torch
from torch import nn

import surgery
from surgery.graph import compare_outputs
from surgery.passes.fuse import FuseConfig

from conftest import randomize_norm_stats

FUSE_ATOL = 1e-5  # fuse preserves the function: outputs match the original to float32 rounding


def _batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_fuse_folds_what_it_can_and_preserves_outputs(convbn, images):
    result = surgery.apply(convbn, [FuseConfig()], example_inputs=images, measure=False)
    gm = result.model
    assert _batchnorms(gm) == ["bn3"]  # bn3's input is shared with the residual add
    assert gm.conv1.bias is not None  # gained the folded bias
    assert sorted(map(tuple, result.recipe["passes"][0]["plan"]["folded"])) == [
        ("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn_fc")]
    with torch.no_grad():
        assert compare_outputs(convbn(images), gm(images)) <= FUSE_ATOL
    assert _batchnorms(convbn) == ["bn1", "bn2", "bn3", "bn_fc"]  # caller's model untouched


def test_fuse_skip_option(convbn, images):
    result = surgery.apply(convbn, ["fuse:skip=bn1+bn_*"], example_inputs=images, measure=False)
    assert sorted(_batchnorms(result.model)) == ["bn1", "bn3", "bn_fc"]


def test_fuse_resnet50_removes_every_batchnorm():
    model = randomize_norm_stats(timm.create_model("resnet50", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = surgery.apply(model, "fuse", example_inputs=x, measure=False)
    assert _batchnorms(model) and not _batchnorms(result.model)
    with torch.no_grad():
        ref = model(x)
        assert compare_outputs(ref, result.model(x)) <= FUSE_ATOL * max(1.0, ref.abs().max().item())


def test_fuse_keeps_the_activation_of_timm_norm_act_layers():
    from timm.layers import BatchNormAct2d

    model = randomize_norm_stats(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    n_norm_act = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = surgery.apply(model, "fuse", example_inputs=x, measure=False)
    gm = result.model
    assert not _batchnorms(gm)
    # Each BatchNormAct2d became its activation, or vanished where it had none: no SiLU lost.
    assert not any(isinstance(m, BatchNormAct2d) for m in gm.modules())
    assert sum(isinstance(m, nn.SiLU) for m in gm.modules()) == sum(
        isinstance(m, nn.SiLU) for m in model.modules())
    assert n_norm_act > 40
    with torch.no_grad():
        assert compare_outputs(model(x), gm(x)) <= FUSE_ATOL
    assert "kept their activation" in result.report["passes"][0]["notes"][0]


def test_fuse_leaves_a_training_mode_batchnorm_without_running_stats(images):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    result = surgery.apply(model, "fuse", example_inputs=images, measure=False)
    assert _batchnorms(result.model) == ["1"]
