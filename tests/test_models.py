import pytest
import torch

import surgery
from surgery.errors import SurgeryError
from surgery.models import parse_input_size


def test_unknown_model_suggests_close_names():
    with pytest.raises(SurgeryError, match=r"unknown model 'resnet5O'; did you mean resnet50"):
        surgery.load_model("resnet5O")


def test_unknown_torchvision_model():
    with pytest.raises(SurgeryError, match="did you mean torchvision:resnet18"):
        surgery.load_model("torchvision:resnet1")


def test_timm_defaults_and_overrides():
    loaded = surgery.load_model("resnet18", num_classes=7, input_size="96")
    assert loaded.input_size == (3, 96, 96)
    assert loaded.model.num_classes == 7
    assert surgery.load_model("resnet18").input_size == (3, 224, 224)  # from pretrained_cfg


def test_vit_input_size_goes_to_the_constructor():
    loaded = surgery.load_model("vit_tiny_patch16_224", input_size="3x64x64", num_classes=2)
    assert loaded.source["kwargs"]["img_size"] == [64, 64]
    assert loaded.model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_torchvision_model():
    loaded = surgery.load_model("torchvision:resnet18", num_classes=4, input_size="64")
    assert loaded.source == {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 4}}
    result = surgery.apply(loaded, "fuse", measure=False)
    assert result.model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


@pytest.mark.parametrize("value,expected", [("224", (3, 224, 224)), ("3x32x48", (3, 32, 48)),
                                            ("32x48", (3, 32, 48)), ((1, 28, 28), (1, 28, 28))])
def test_parse_input_size(value, expected):
    assert parse_input_size(value) == expected


@pytest.mark.parametrize("value", ["abc", "0", "1x2x3x4"])
def test_bad_input_size(value):
    with pytest.raises(SurgeryError, match="input size"):
        parse_input_size(value)


def test_input_size_that_does_not_fit_the_model():
    with pytest.raises(SurgeryError, match="does not fit"):
        surgery.apply("vit_tiny_patch16_224", "fuse", example_inputs=torch.randn(1, 3, 100, 100),
                      measure=False)


def test_weights_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    src = surgery.load_model("resnet18", num_classes=3).model
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = surgery.load_model("resnet18", num_classes=3, weights=tmp_path / name)
        assert torch.equal(loaded.model.fc.weight, src.fc.weight)


def test_missing_corrupt_and_mismatched_weights(tmp_path):
    with pytest.raises(SurgeryError, match="not found"):
        surgery.load_model("resnet18", weights=tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(SurgeryError, match="cannot read weights"):
        surgery.load_model("resnet18", weights=tmp_path / "bad.safetensors")
    torch.save(surgery.load_model("resnet18", num_classes=3).model.state_dict(), tmp_path / "three.pth")
    with pytest.raises(SurgeryError, match=r"wrong shape or dtype fc.weight \(3, 512\) vs \(1000, 512\).*classes"):
        surgery.load_model("resnet18", weights=tmp_path / "three.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SurgeryError, match="missing conv1.weight"):
        surgery.load_model("resnet18", weights=tmp_path / "other.pth")
