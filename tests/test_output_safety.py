"""Issue 11, points 1-4, 6, 7: no user file is lost, nothing read from disk is trusted.

CLI cases run as a user runs them, in a subprocess, and assert the exit code, a one-line
message without a traceback, and that the user's files are byte-identical afterwards.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery.artifact import onnx_file
from surgery.errors import SurgeryError
from surgery.export import ParityError, export_verified
from surgery.models import build_source
from surgery.safeio import recover
from surgery.validate import ValidationError

from conftest import snapshot

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["resnet18", "--input-size", "32", "--num-classes", "10"]


def run(*args, code, cwd=None, env=None, prefix=()):
    """The CLI in a subprocess; asserts the exit code, and one line without traceback on failure."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "surgery", "-q", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env={**os.environ, **(env or {})})
    assert proc.returncode == code, proc.stderr
    if code:
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr
    return proc


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small real artifact (with ONNX) to copy and tamper with."""
    out = tmp_path_factory.mktemp("art") / "r18"
    run("apply", *SMALL, "--pass", "fuse", "--out", out, "--onnx", "--no-latency", code=0)
    return out


def copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def edit_recipe(d: Path, change) -> None:
    recipe = json.loads((d / "recipe.json").read_text())
    change(recipe)
    (d / "recipe.json").write_text(json.dumps(recipe))


# --- 1. single files: no write through a symlink, replaced only after export and parity ------------------


def test_export_refuses_a_symlink_and_keeps_its_target(tmp_path):
    precious = tmp_path / "thesis.pdf"
    precious.write_bytes(b"%PDF my thesis")
    link = tmp_path / "model.onnx"
    link.symlink_to(precious)
    proc = run("export", *SMALL, "--out", link, "--force", code=2)
    assert "is a symlink" in proc.stderr
    assert precious.read_bytes() == b"%PDF my thesis" and link.is_symlink()


def test_export_refuses_an_existing_file_without_force(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"an older export")
    proc = run("export", *SMALL, "--out", target, code=2)
    assert "exists; choose another path or add --force" in proc.stderr
    assert target.read_bytes() == b"an older export"


def test_entropy_plot_is_a_single_file_write_too(tmp_path):
    precious = tmp_path / "photo.png"
    precious.write_bytes(b"my photo")
    link = tmp_path / "hist.png"
    link.symlink_to(precious)
    before = snapshot(tmp_path)
    assert "is a symlink" in run("entropy", "digits", "--plot", link, code=2).stderr
    assert "exists; choose another path or add --force" in run("entropy", "digits", "--plot", precious, code=2).stderr
    assert snapshot(tmp_path) == before
    run("entropy", "digits", "--plot", tmp_path / "new.png", code=0)
    assert (tmp_path / "new.png").read_bytes()[:4] == b"\x89PNG" and snapshot(tmp_path)["photo.png"] == \
        before["photo.png"]


class Noisy(nn.Module):
    """Random in its forward: the ONNX file exports, but parity with torch fails."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) + torch.randn_like(self.conv(x))


def test_failed_parity_leaves_the_previous_file_byte_identical(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous, good export")
    with pytest.raises(ParityError):
        export_verified(Noisy().eval(), target, (3, 16, 16))
    assert target.read_bytes() == b"the previous, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left


def test_export_replaces_with_force_after_parity(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    proc = run("export", *SMALL, "--out", target, "--force", "--json", code=0)
    assert json.loads(proc.stdout)["parity"]["ok"] and target.stat().st_size > 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# --- 2. --out DIR --force: only an empty folder or an artifact of ours ------------------------------------


def test_force_refuses_a_folder_that_is_not_an_artifact(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (user / "sub").mkdir()
    (user / "sub" / "dog.jpg").write_bytes(b"\xff\xd8 dog")
    before = snapshot(tmp_path)
    proc = run("apply", *SMALL, "--pass", "fuse", "--out", user, "--force", code=2)
    assert f"{user} is not a surgery artifact; choose another --out" in proc.stderr
    assert snapshot(tmp_path) == before


def test_force_refuses_an_artifact_holding_a_users_file(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    (d / "notes.md").write_text("my notes on this run")
    before = snapshot(tmp_path)
    proc = run("apply", *SMALL, "--pass", "fuse", "--out", d, "--force", code=2)
    assert "holds files surgery did not write (notes.md)" in proc.stderr
    assert snapshot(tmp_path) == before


def test_force_replaces_an_artifact_of_ours(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    old = (d / "recipe.json").read_bytes()
    run("apply", *SMALL, "--pass", "fuse:skip=layer4.*", "--out", d, "--force", "--no-latency", code=0)
    assert (d / "recipe.json").read_bytes() != old and "model.onnx" not in os.listdir(d)
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_out_dot_is_refused(tmp_path):
    (tmp_path / "work.txt").write_text("mine")
    before = snapshot(tmp_path)
    proc = run("apply", *SMALL, "--pass", "fuse", "--out", ".", "--force", code=2, cwd=tmp_path)
    assert "is the current folder" in proc.stderr
    assert snapshot(tmp_path) == before


def test_out_equal_to_the_source_artifact_is_refused(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    before = snapshot(tmp_path)
    proc = run("apply", d, "--pass", "fuse", "--out", d, "--force", code=2)
    assert "holds the input" in proc.stderr
    assert snapshot(tmp_path) == before


def test_training_out_equal_to_its_data_or_teacher_is_refused(artifact, tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        (data / cls / "1.png").write_bytes(b"not really a png")
    teacher = copy_artifact(artifact, tmp_path / "teacher")
    before = snapshot(tmp_path)
    proc = run("train", "resnet18", "--data", data, "--out", data, "--force", code=2)
    assert f"holds the input {str(data)!r}" in proc.stderr
    proc = run("finetune", teacher, "--data", "digits", "--teacher", teacher, "--out", tmp_path, "--force", code=2)
    assert "holds the input" in proc.stderr
    assert snapshot(tmp_path) == before


def test_api_training_out_equal_to_its_data_is_refused(tmp_path):
    from surgery.tasks import train

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "1.png").write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(SurgeryError, match="holds the input"):
        train("resnet18", str(data), out=data, force=True)
    assert snapshot(tmp_path) == before


def test_symlinked_out_dir_is_refused(artifact, tmp_path):
    real = copy_artifact(artifact, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(tmp_path)
    proc = run("apply", *SMALL, "--pass", "fuse", "--out", link, "--force", code=2)
    assert "is a symlink" in proc.stderr
    assert snapshot(tmp_path) == before


def test_missing_parent_is_refused_before_any_work(tmp_path):
    proc = run("apply", *SMALL, "--pass", "fuse", "--out", tmp_path / "no" / "such" / "out", code=2)
    assert "does not exist; create it first (mkdir -p" in proc.stderr
    assert os.listdir(tmp_path) == []


# Root writes through mode bits: as root, the CLI runs without the capabilities that allow it.
NO_OVERRIDE = ("setpriv", "--inh-caps=-dac_override,-fowner", "--bounding-set=-dac_override,-fowner")


def test_read_only_parent_is_refused_before_any_work(tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no folder is read-only to this process")
    parent = tmp_path / "locked"
    parent.mkdir()
    (parent / "keep.txt").write_text("mine")
    parent.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        proc = run("apply", *SMALL, "--pass", "fuse", "--out", parent / "out", code=2,
                   prefix=NO_OVERRIDE if os.geteuid() == 0 else ())
        assert "is not writable; choose another location" in proc.stderr
        assert snapshot(tmp_path) == before
    finally:
        parent.chmod(0o755)


# --- 3. crash-safe replace: kill -9 at any instant leaves the old or the new artifact -------------------


KILL_CHILD = """
import sys, torch
from torch import nn
from surgery.artifact import write_artifact
out = sys.argv[1]
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)))
recipe = {"format": "surgery.recipe/1", "source": {"kind": "module", "class": "x.Net"},
          "input_size": [3, 32, 32], "passes": []}
write_artifact(out, models[0], recipe, {"n": 0}, force=True)
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_artifact(out, models[i % 2], recipe, {"n": i}, force=True)
"""


def _complete(d: Path) -> str:
    """The sha256 of the weights if ``d`` is a complete, self-consistent artifact."""
    recipe = json.loads((d / "recipe.json").read_text())
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert recipe["weights"]["sha256"] == digest
    json.loads((d / "report.json").read_text())
    return digest


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_sigkill_during_saves_leaves_a_complete_artifact(tmp_path, exchange):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not exchange:
        env["SURGERY_NO_RENAME_EXCHANGE"] = "1"
    rng = random.Random(0)
    versions = set()
    for trial in range(4):
        out = tmp_path / f"run{trial}"
        child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(out)], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if exchange:  # atomic exchange: complete at every instant, before any recovery
            versions.add(_complete(out))
        lines = recover(out)  # what the next run does first
        versions.add(_complete(out))
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")], lines
    assert len(versions) <= 2


def test_next_run_restores_an_artifact_left_between_two_renames(artifact, tmp_path):
    """The state a kill leaves between the two renames of the fallback: DIR gone, old and new beside it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after kill -9
    d = tmp_path / "art"
    old = tmp_path / f".art.old-{dead.pid}-abc"
    old.mkdir()
    copy_artifact(artifact, old / "art")
    partial = copy_artifact(artifact, tmp_path / f".art.partial-{dead.pid}-def")
    (partial / "report.json").write_text("{")  # the new one, possibly incomplete
    expected = snapshot(artifact)
    proc = run("verify", d, code=0)
    assert snapshot(d) == expected
    assert sorted(os.listdir(tmp_path)) == ["art"]
    assert f"restored {d} from an interrupted save" in proc.stderr
    assert "removed .art.partial-" in proc.stderr


def test_leftovers_of_a_live_run_are_left_alone(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    live = tmp_path / f".art.partial-{os.getpid()}-xyz"
    live.mkdir()
    assert recover(d) == [] and live.is_dir()


# --- 4. recipe.json against its schema ------------------------------------------------------------------


def _nest(depth):
    v = 0
    for _ in range(depth):
        v = {"a": v}
    return v


@pytest.mark.parametrize("change,where,problem", [
    (lambda r: r["input_size"].__setitem__(1, "32"), r"\$\.input_size\[1\]", "must be integer"),
    (lambda r: r.__setitem__("surprise", 1), r"\$", "unknown key 'surprise'"),
    (lambda r: r["input_size"].__setitem__(2, -5), r"\$\.input_size\[2\]", "out of range"),
    (lambda r: r["source"]["kwargs"].__setitem__("num_classes", 10**12), r"\$\.source\.kwargs\.num_classes",
     "out of range"),
    (lambda r: r["passes"][0].__setitem__("config", {"skip": _nest(40)}), r"\$", r"nests 4\d levels deep"),
    (lambda r: r["passes"][0].__setitem__("pass", 7), r"\$\.passes\[0\]\.pass", "must be string"),
    (lambda r: r["weights"].__setitem__("sha256", "abc"), r"\$\.weights\.sha256", "not a valid value"),
])
def test_tampered_recipe_is_refused_naming_the_field(artifact, tmp_path, change, where, problem):
    d = copy_artifact(artifact, tmp_path / "art")
    edit_recipe(d, change)
    before = snapshot(tmp_path)
    proc = run("verify", d, code=2)
    assert proc.stderr.startswith("error: ") and re.search(where + ": .*" + problem, proc.stderr), \
        proc.stderr
    assert snapshot(tmp_path) == before


def test_recipe_config_error_names_the_field(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    edit_recipe(d, lambda r: r["passes"][0]["config"].__setitem__("skip", 5))
    with pytest.raises(ValidationError, match=r"^\$\.passes\[0\]\.config"):
        surgery.load(d)


# --- 6. source kwargs: an allow-list, no argument that reads files ----------------------------------------


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained", "cache_dir"])
def test_file_reading_source_kwargs_are_refused(artifact, tmp_path, key):
    d = copy_artifact(artifact, tmp_path / "art")
    secret = tmp_path / "secret.pth"
    edit_recipe(d, lambda r: r["source"]["kwargs"].__setitem__(key, str(secret)))
    with pytest.raises(ValidationError, match=rf"\$\.source\.kwargs: unknown key '{key}'"):
        surgery.load(d)


def test_build_source_refuses_kwargs_outside_the_allow_list(tmp_path):
    with pytest.raises(ValidationError, match=r"\$\.source\.kwargs\.checkpoint_path: argument 'checkpoint_path'"):
        build_source({"kind": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": str(tmp_path / "x.pth")}})
    with pytest.raises(ValidationError, match="weights"):
        build_source({"kind": "torchvision", "name": "resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}})


def test_cli_refuses_a_file_reading_source_kwarg(artifact, tmp_path):
    d = copy_artifact(artifact, tmp_path / "art")
    edit_recipe(d, lambda r: r["source"]["kwargs"].__setitem__("checkpoint_path", "/etc/passwd"))
    proc = run("apply", d, "--pass", "fuse", code=2)
    assert "$.source.kwargs: unknown key 'checkpoint_path'" in proc.stderr


# --- 7. weights: dtypes and shapes as rebuilt; model.onnx under a sha256 -----------------------------------


def _resave_weights(d: Path, change) -> None:
    state = load_file(str(d / "model.safetensors"))
    change(state)
    save_file(state, str(d / "model.safetensors"))
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    edit_recipe(d, lambda r: r["weights"].__setitem__("sha256", digest))


@pytest.mark.parametrize("change,message", [
    (lambda s: s.__setitem__("fc.weight", s["fc.weight"].half()), r"fc\.weight float16 vs float32"),
    (lambda s: s.__setitem__("fc.weight", s["fc.weight"][:5]), r"fc\.weight \(5, 512\) vs \(10, 512\)"),
    (lambda s: s.pop("fc.bias"), r"missing fc\.bias"),
])
def test_weights_must_match_the_architecture(artifact, tmp_path, change, message):
    d = copy_artifact(artifact, tmp_path / "art")
    _resave_weights(d, change)
    proc = run("verify", d, code=2)
    assert re.search(message, proc.stderr), proc.stderr


def test_onnx_checksum_is_recorded_and_checked(artifact, tmp_path):
    recipe = json.loads((artifact / "recipe.json").read_text())
    assert recipe["onnx"]["sha256"] == hashlib.sha256((artifact / "model.onnx").read_bytes()).hexdigest()
    assert "model.onnx sha256 ok" in run("verify", artifact, code=0).stdout
    d = copy_artifact(artifact, tmp_path / "art")
    with open(d / "model.onnx", "ab") as f:
        f.write(b"\0")
    proc = run("verify", d, code=2)
    assert "model.onnx does not match the sha256 in its recipe ($.onnx)" in proc.stderr
    with pytest.raises(SurgeryError, match="sha256"):
        onnx_file(d)
