import json

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery.errors import SurgeryError
from surgery.graph import compare_outputs

from conftest import ConvBnNet, randomize_norm_stats

RELOAD_ATOL = 1e-6  # reload is the same graph with the same weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    result = surgery.apply("resnet18", ["fuse"], input_size="3x48x48", measure=False)
    out = tmp_path_factory.mktemp("art") / "resnet18-fused"
    result.save(out)
    return result, out


def test_artifact_round_trip_reproduces_outputs(saved):
    result, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe.json", "report.json"]  # measure=False: no report.png
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"] == {"kind": "timm", "name": "resnet18", "kwargs": {"in_chans": 3},
                                "input_size": [3, 48, 48]}
    assert recipe["input_size"] == [3, 48, 48] and recipe["passes"][0]["pass"] == "fuse"
    model = surgery.load(out)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert compare_outputs(result.model(x), model(x)) <= RELOAD_ATOL


def test_passes_chain_across_runs(saved, tmp_path):
    result, out = saved
    again = surgery.apply(str(out), ["fuse"], measure=False)
    assert [p["pass"] for p in again.recipe["passes"]] == ["fuse", "fuse"]
    assert again.recipe["source"]["name"] == "resnet18"  # rebuilt from the origin, not from DIR
    again.save(tmp_path / "chained")
    reloaded = surgery.load(tmp_path / "chained")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert compare_outputs(result.model(x), reloaded(x)) <= RELOAD_ATOL


def test_refuses_non_empty_out_dir_unless_forced(saved, tmp_path):
    result, _ = saved
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="not empty.*--force"):
        result.save(out)
    with pytest.raises(SurgeryError, match="is not a surgery artifact; choose another --out"):
        result.save(out, force=True)  # --force never replaces a folder of the user's
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    art = tmp_path / "art"
    result.save(art)
    first = (art / "recipe.json").read_bytes()
    result.save(art, force=True)  # an artifact of ours is replaced
    assert (art / "recipe.json").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def _copy_artifact(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.safetensors").unlink(), "lacks model.safetensors"),
    (lambda d: (d / "recipe.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "recipe.json").write_text(json.dumps({"format": "other"})), r"\$\.\w+: .*modified or damaged"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64), "does not match the sha256"),
])
def test_damaged_artifacts_are_clear_errors(saved, tmp_path, damage, message):
    d = _copy_artifact(saved[1], tmp_path / "copy")
    damage(d)
    with pytest.raises(SurgeryError, match=message):
        surgery.load(d)


def test_tampered_recipe_pass_is_caught(saved, tmp_path):
    d = _copy_artifact(saved[1], tmp_path / "copy")
    recipe = json.loads((d / "recipe.json").read_text())
    recipe["passes"][0]["plan"]["folded"] = recipe["passes"][0]["plan"]["folded"][:-1]
    (d / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(SurgeryError, match="do not match the architecture: missing .*bn"):
        surgery.load(d)


def test_missing_artifact_dir():
    with pytest.raises(SurgeryError, match="not found"):
        surgery.load("/nonexistent/artifact")


def test_custom_module_artifact_needs_its_base_model(tmp_path, images):
    model = randomize_norm_stats(ConvBnNet()).eval()
    result = surgery.apply(model, "fuse", example_inputs=images, measure=False)
    result.save(tmp_path / "custom")
    with pytest.raises(SurgeryError, match="base_model"):
        surgery.load(tmp_path / "custom")
    reloaded = surgery.load(tmp_path / "custom", base_model=ConvBnNet())
    with torch.no_grad():
        assert compare_outputs(model(images), reloaded(images)) <= 1e-5


def test_loading_never_unpickles(saved, tmp_path):
    # The weights file is plain safetensors: readable without torch's pickle machinery.
    from safetensors import safe_open

    with safe_open(str(saved[1] / "model.safetensors"), "pt") as f:
        assert "conv1.weight" in f.keys()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "t.safetensors"))  # the format we rely on


def test_timm_model_built_with_custom_arguments_needs_its_base_model(tmp_path):
    # patch_size=8 is not in the recipe's source: rebuilding by name would give another architecture.
    import timm

    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()

    x = torch.randn(2, 3, 32, 32)
    result = surgery.apply(build(), ["fuse"], example_inputs=x, measure=False)
    assert result.recipe["source"]["kind"] == "module"
    result.save(tmp_path / "vit")
    with pytest.raises(SurgeryError, match="base_model"):
        surgery.load(tmp_path / "vit")
    again = surgery.load(tmp_path / "vit", base_model=build())
    with torch.no_grad():
        assert (again(x) - result.model(x)).abs().max().item() <= 1e-6


class ViewsNet(torch.nn.Module):
    """Tensors that are views of other storage: a transposed buffer, a strided parameter, an
    expanded one, and a head tied to the stem's weight (14.3: safetensors refused such views)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("mix", torch.randn(8, 8).t())
        self.scale = torch.nn.Parameter(torch.randn(16)[::2])
        self.shift = torch.nn.Parameter(torch.randn(1, 8).expand(8, 8))
        self.fc = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)
        self.fc2.weight = self.fc.weight  # tied
        self.offsets = torch.randn(4, 16)[1, ::2]  # a plain tensor attribute: traced into a constant buffer

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        y = y @ self.mix * self.scale + self.shift.sum(0) + self.offsets
        return self.fc2(self.fc(y))


def test_saves_views_and_tied_tensors(tmp_path, images):
    model = ViewsNet().eval()
    assert not model.mix.is_contiguous() and not model.scale.is_contiguous() and not model.shift.is_contiguous()
    result = surgery.apply(model, "fuse", example_inputs=images, measure=False)
    result.save(tmp_path / "views")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "views" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    offsets = result.model.get_buffer("offsets")  # the traced constant: a strided view of a larger storage
    assert offsets.untyped_storage().nbytes() > offsets.numel() * offsets.element_size()
    assert {"mix", "scale", "shift", "offsets"} <= names and len({"fc.weight", "fc2.weight"} & names) == 1  # tied: once
    reloaded = surgery.load(tmp_path / "views", base_model=ViewsNet())
    assert reloaded.fc.weight is reloaded.fc2.weight or reloaded.fc.weight.data_ptr() == reloaded.fc2.weight.data_ptr()
    with torch.no_grad():
        assert compare_outputs(model(images), reloaded(images)) == 0.0
