"""Pretrained weights through timm's and torchvision's own loaders and caches, offline (issue 13.1).

No network here: each test builds the cache layout the library's loader reads (the Hugging
Face hub cache for timm, TORCH_HOME/hub/checkpoints for torchvision), with seeded random
weights, and checks that the weights come back exactly.
"""

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import surgery
from surgery.models import load_model
from surgery.safeio import sha256_file

TIMM_NAME = "test_resnet.r160_in1k"
TV_NAME = "squeezenet1_1"


def build_hub_cache(home: Path, name: str = TIMM_NAME) -> dict[str, torch.Tensor]:
    """A Hugging Face cache holding timm/<name>: refs/main -> snapshot with model.safetensors and config.json."""
    arch, tag = name.split(".")
    repo = home / "hub" / f"models--timm--{name}"
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model(arch).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    cfg = timm.get_pretrained_cfg(name).to_dict()
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": cfg["num_classes"],
        "pretrained_cfg": {k: cfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation",
                                               "num_classes", "classifier") if k in cfg} | {"tag": tag}}))
    return state


def build_torch_cache(torch_home: Path, name: str = TV_NAME) -> dict[str, torch.Tensor]:
    """TORCH_HOME/hub/checkpoints/<file of the weights' url>, as torch.hub leaves a download."""
    member = torchvision.models.get_model_weights(name).DEFAULT
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(8)
    state = torchvision.models.get_model(name).state_dict()
    torch.save(state, folder / Path(member.url).name)
    return state


@pytest.fixture()
def caches(tmp_path):
    hub, torch_home = tmp_path / "hf", tmp_path / "torch"
    refs = {"timm": build_hub_cache(hub), "torchvision": build_torch_cache(torch_home)}
    for key, state in refs.items():
        torch.save(state, tmp_path / f"{key}.pt")
    env = {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(torch_home)}
    return tmp_path, env


LOAD_ALL = f"""
import json, sys, torch
from surgery.models import load_model
refs = {{k: torch.load(f"{{sys.argv[1]}}/{{k}}.pt", weights_only=True) for k in ("timm", "torchvision")}}
out = {{}}
for spec, kw, ref in [("{TIMM_NAME}", dict(pretrained=True), "timm"),
                      ("hf-hub:timm/{TIMM_NAME}", dict(pretrained=True), "timm"),
                      ("torchvision:{TV_NAME}", dict(pretrained=True), "torchvision"),
                      ("torchvision:{TV_NAME}", dict(weights="IMAGENET1K_V1"), "torchvision")]:
    loaded = load_model(spec, **kw)
    state = loaded.model.state_dict()
    same = state.keys() == refs[ref].keys() and all(torch.equal(v, refs[ref][k]) for k, v in state.items())
    out[spec + " " + str(kw)] = {{"exact": same, "source": loaded.source}}
print(json.dumps(out))
"""


def test_pretrained_weights_load_exactly_from_the_libraries_caches(caches):
    root, env = caches
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, str(root)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert len(got) == 4 and all(r["exact"] for r in got.values()), got
    sources = [r["source"] for r in got.values()]
    assert sources[0] == {"kind": "timm", "name": TIMM_NAME, "kwargs": {},
                          "weights": {"kind": "timm", "name": TIMM_NAME}}
    # hf-hub: rebuilt by architecture (same shapes), the hub name kept as where the weights came from
    assert sources[1]["name"] == "test_resnet" and sources[1]["weights"]["name"] == f"hf-hub:timm/{TIMM_NAME}"
    assert sources[2]["weights"] == sources[3]["weights"] == {"kind": "torchvision",
                                                              "name": "SqueezeNet1_1_Weights.IMAGENET1K_V1"}


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_apply_with_pretrained_records_the_weights_and_reloads(caches):
    root, env = caches
    out = root / "art"
    proc = cli("apply", TIMM_NAME, "--pretrained", "--pass", "fuse", "--no-latency", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"]["weights"] == {"kind": "timm", "name": TIMM_NAME}
    model = surgery.load(out)  # the schema accepts the provenance; the artifact carries the weights
    ref = torch.load(root / "timm.pt", weights_only=True)
    assert torch.equal(model.get_submodule("fc").weight, ref["fc.weight"])  # fuse leaves the classifier


def test_offline_without_the_cache_is_one_line_naming_what_to_download(tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    proc = cli("inspect", "resnet34.a1_in1k", "--pretrained", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pretrained weights for resnet34.a1_in1k are not in the "
                                                   "cache and cannot be downloaded (HF_HUB_OFFLINE is set)")
    assert str(tmp_path / "empty" / "hub" / "models--timm--resnet34.a1_in1k") in lines[0]
    assert "timm.create_model('resnet34.a1_in1k', pretrained=True)" in lines[0]


def test_torchvision_without_cache_or_network_names_the_url_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):  # what urllib raises here without a network
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    url = torchvision.models.get_model_weights(TV_NAME).DEFAULT.url
    with pytest.raises(surgery.SurgeryError) as err:
        load_model(f"torchvision:{TV_NAME}", pretrained=True)
    assert f"download {url} to {tmp_path / 'hub' / 'checkpoints' / Path(url).name}" in str(err.value)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_ema+module", "compiled"])
def test_weights_files_in_common_checkpoint_shapes(tmp_path, wrap):
    torch.manual_seed(3)
    state = timm.create_model("test_resnet", num_classes=10).state_dict()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model": {"model": state, "optimizer": {"state": {}}},
             # timm's train script: raw weights and an EMA copy, DDP's prefix on both; EMA wins
             "model_ema+module": {"state_dict": {f"module.{k}": torch.zeros_like(v) for k, v in state.items()},
                                  "state_dict_ema": {f"module.{k}": v for k, v in state.items()}},
             "compiled": {f"_orig_mod.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    loaded = load_model("test_resnet", num_classes=10, weights=path)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.source["weights"] == {"kind": "file", "file": str(path), "sha256": sha256_file(path)}


def test_pretrained_refuses_an_artifact_and_both_sources(tmp_path):
    with pytest.raises(surgery.SurgeryError, match="not both"):
        load_model("test_resnet", pretrained=True, weights=tmp_path / "w.safetensors")
    with pytest.raises(surgery.SurgeryError, match="an artifact or a module already has its weights"):
        load_model(str(tmp_path), pretrained=True)
