"""ONNX export: real exporters, real onnxruntime, small inputs. Each model is exported once per module."""

import copy
import json

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.export import (
    EXPORTER_KEY,
    ParityError,
    check_parity,
    export_onnx,
    onnx_latency_ms,
    onnx_session,
    select_providers,
    verify_onnx,
)
from surgery.graph import trace

RESNET_SHAPE = (3, 64, 64)
VIT_SHAPE = (3, 224, 224)  # vit_tiny's position embedding fixes the image size


def _exporter(path) -> str:
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return meta[EXPORTER_KEY]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gm = trace(model, torch.randn(1, *RESNET_SHAPE))
    path = export_onnx(gm, torch.randn(1, *RESNET_SHAPE), tmp_path_factory.mktemp("resnet") / "resnet18.onnx")
    return gm, path


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    gm = trace(model, torch.randn(1, *VIT_SHAPE))
    path = export_onnx(gm, torch.randn(1, *VIT_SHAPE), tmp_path_factory.mktemp("vit") / "vit.onnx")
    return gm, path


def test_select_providers_is_cpu_without_cuda(resnet):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    # onnxruntime-gpu advertises CUDA even without a GPU; it must not be picked.
    assert select_providers() == ["CPUExecutionProvider"]
    assert onnx_session(resnet[1]).get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("fixture", ["resnet", "vit"])
def test_traced_model_exports_with_dynamo_and_matches_torch(fixture, request):
    gm, path = request.getfixturevalue(fixture)
    shape = RESNET_SHAPE if fixture == "resnet" else VIT_SHAPE
    assert path.is_file()
    assert _exporter(path) == "dynamo"
    onnx.checker.check_model(str(path), full_check=True)

    report = check_parity(gm, path, shape, batch_sizes=(1, 4))
    assert report["ok"] and report["batch_sizes"] == [1, 4]
    assert set(report["max_abs_diff"]) == {"1", "4"}
    for b in ("1", "4"):
        assert report["max_rel_diff"][b] < 1e-4
        assert report["max_abs_diff"][b] < 1e-3


def test_batch_dimension_is_symbolic(resnet):
    gm, path = resnet
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")

    # A batch size the export never saw runs and matches torch.
    session = onnx_session(path)
    x = torch.randn(3, *RESNET_SHAPE)
    (out,) = session.run(None, {"input": x.numpy()})
    assert out.shape == (3, 10)
    with torch.no_grad():
        np.testing.assert_allclose(out, gm(x).numpy(), rtol=1e-4, atol=1e-4)


def test_parity_error_when_model_changes_after_export(resnet):
    gm, path = resnet
    changed = copy.deepcopy(gm)
    with torch.no_grad():
        changed.fc.weight.add_(0.5)
    with pytest.raises(ParityError) as info:
        check_parity(changed, path, RESNET_SHAPE)
    message = str(info.value)
    assert "\n" not in message and "batch 1" in message and "batch 4" in message
    assert info.value.report["ok"] is False


def test_verify_onnx_report_is_json(resnet):
    gm, path = resnet
    result = verify_onnx(gm, path, RESNET_SHAPE)
    json.dumps(result)
    assert result["exporter"] == "dynamo"
    assert result["bytes"] > 4 * 11e6  # resnet18's ~11M float32 weights live in the one file
    assert isinstance(result["opset"], int) and result["opset"] >= 17
    assert result["providers"] == select_providers()
    assert result["parity"]["ok"]
    assert result["latency_ms"]["onnxruntime"] > 0 and result["latency_ms"]["torch"] > 0
    assert onnx_latency_ms(path, RESNET_SHAPE, 2, warmup=1, runs=2) > 0


def test_missing_parent_folder_is_a_surgery_error(tmp_path):
    model = nn.Conv2d(3, 4, 3)
    with pytest.raises(SurgeryError, match="does not exist"):
        export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "no" / "such" / "model.onnx")


class DataDependent(nn.Module):
    """A Python branch on tensor values: torch.export refuses it, TorchScript bakes in one branch."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x * 3


def test_falls_back_to_torchscript_quietly(tmp_path, capfd):
    model = DataDependent().train()
    path = export_onnx(model, torch.ones(2, 3), tmp_path / "dd.onnx")
    # Neither the failed dynamo attempt nor TorchScript's warnings reach the terminal.
    assert capfd.readouterr() == ("", "")
    assert _exporter(path) == "torchscript"
    assert model.training  # exported in eval mode, handed back as it came
    (out,) = onnx_session(path).run(None, {"input": np.ones((5, 3), np.float32)})
    np.testing.assert_allclose(out, 2 * np.ones((5, 3)))


@torch.library.custom_op("surgery_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(nn.Module):
    """Calls an op that neither exporter can translate to ONNX."""

    def forward(self, x):
        return _opaque(x) + 1


def test_unexportable_model_is_one_line_surgery_error(tmp_path, capfd):
    with pytest.raises(SurgeryError) as info:
        export_onnx(Opaque(), torch.randn(2, 3), tmp_path / "opaque.onnx")
    # The TorchScript exporter's C++ side dumps its IR to stdout on failure: swallowed.
    assert capfd.readouterr() == ("", "")
    message = str(info.value)
    assert "\n" not in message
    assert "dynamo exporter" in message and "torchscript exporter" in message


def test_large_model_goes_to_external_data(tmp_path, monkeypatch):
    # Lower the 2 GB threshold rather than allocate 2 GB: the external-data path is what matters.
    monkeypatch.setattr("surgery.export.SINGLE_FILE_LIMIT", 1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    path = export_onnx(model.eval(), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    result = verify_onnx(model, path, (3, 16, 16))
    assert result["exporter"] == "dynamo" and result["parity"]["ok"]
    assert result["bytes"] == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
