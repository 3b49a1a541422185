"""Training runs that survive their user: seeded, resumable after SIGKILL or Ctrl-C, and a
checkpoint is validated and matched to the run before --resume uses it (issue 11: 8, 10).

The CLI runs are real subprocesses (OMP_NUM_THREADS=1, so every run computes alike); the
refusals that need no process boundary call cli.main in-process to stay fast.
"""

import hashlib
import json
import os
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

from surgery.checkpoint import CONFIG_KEYS, OPTIONAL_CONFIG_KEYS
from surgery.cli import main
from surgery.data import load_data
from surgery.errors import Interrupted, SurgeryError
from surgery.train import TrainConfig, fit, run_config

from conftest import snapshot

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
MODEL = "test_resnet"  # timm's 0.4M-parameter test net
# 24 batches an epoch: long enough to be killed mid-epoch, short enough for a 2-core box.
# Runs whose checkpoint the tests resume from or check: kept after they finish.
RUN = ["train", MODEL, "--input-size", "16", "--limit", "384", "--batch-size", "16", "--epochs", "3",
       "--keep-checkpoints"]
SMALL = ["train", MODEL, "--input-size", "16", "--limit", "64", "--batch-size", "16", "--epochs", "1",
         "--keep-checkpoints"]
TIMING = ("seconds", "images_per_s")


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "surgery", "-q", *RUN, "--out", str(out), *extra], env=ENV,
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(out: Path, *extra: str, args: list[str] = RUN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", "-q", *args, "--out", str(out), *extra], env=ENV,
                          cwd=out.parent, capture_output=True, text=True, timeout=300)


def wait_for_epoch(out: Path, proc: subprocess.Popen, epoch: int) -> None:
    """Until the run's checkpoint has ``epoch`` epochs done."""
    deadline = time.monotonic() + 240
    while True:
        try:
            if state(out)["epoch"] >= epoch:
                return
        except (OSError, ValueError):
            pass  # not written yet
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} after 240 s"
        time.sleep(0.02)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def history(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in json.loads((out / "history.json").read_text())]


def state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "state.json").read_text())["state"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every interrupted run must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "a"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    return out


# --- (10) seeds, SIGKILL, Ctrl-C ------------------------------------------------------------------------


def test_two_runs_with_the_same_seed_give_bit_identical_weights(reference, tmp_path):
    proc = run(tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    same_tensors(reference / "model.safetensors", tmp_path / "b" / "model.safetensors")
    same_tensors(reference / "checkpoint" / "optimizer.safetensors",
                 tmp_path / "b" / "checkpoint" / "optimizer.safetensors")
    assert history(reference) == history(tmp_path / "b")


def test_the_seed_decides_the_initial_weights(tmp_path, capsys):
    for seed in ("0", "1"):
        assert main(["-q", *SMALL, "--epochs", "0", "--seed", seed, "--out", str(tmp_path / seed)]) == 0
    a, b = (load_file(str(tmp_path / s / "model.safetensors")) for s in ("0", "1"))
    assert not torch.equal(a["conv1.0.weight"], b["conv1.0.weight"])
    assert main(["-q", *SMALL, "--epochs", "0", "--out", str(tmp_path / "again")]) == 0
    same_tensors(tmp_path / "0" / "model.safetensors", tmp_path / "again" / "model.safetensors")


def test_ctrl_c_then_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "run"
    # Ctrl-C in epoch 2: a checkpoint saved there (mid-epoch), exit 130, one line.
    proc = start(out)
    wait_for_epoch(out, proc, 1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = one_line(err)
    saved = state(out)
    assert line == (f"interrupted at epoch {saved['epoch'] + 1}, step {saved['step']}; checkpoint saved in "
                    f"{out / 'checkpoint'}, continue with --resume")
    assert saved["step"] > 24  # past the first epoch's 24 batches

    # --resume, then SIGKILL in epoch 3 (as soon as epoch 2's checkpoint is there: on an idle machine
    # an epoch of this net can take less than the 0.3 s this once waited): the epoch-2 checkpoint stays.
    proc = start(out, "--resume")
    wait_for_epoch(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert state(out)["epoch"] == 2 and not (out / "model.safetensors").exists()  # killed before the end

    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same_tensors(reference / "model.safetensors", out / "model.safetensors")
    # Each epoch's record (its losses and val metrics fingerprint that epoch's weights), the last
    # checkpoint's weights and optimizer tensors: all equal to the uninterrupted run's.
    assert history(out) == history(reference)
    for name in ("model.safetensors", "optimizer.safetensors"):
        same_tensors(reference / "checkpoint" / name, out / "checkpoint" / name)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers


def tiny_cnn(num_classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(256, num_classes))


FAST = dict(epochs=3, batch_size=32, progress=False, lr=0.05)


@pytest.fixture(scope="module")
def tiny_reference():
    """tiny_cnn (with dropout) trained 3 epochs on 128 digits, uninterrupted: weights and history."""
    model = tiny_cnn()
    history = fit(model, load_data("digits", image_size=16, limit=128), TrainConfig(**FAST))
    return model.state_dict(), history


def assert_equal_run(reference, model, history) -> None:
    for (k, a), b in zip(reference[0].items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in drop} for h in history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in reference[1]]


def sigint_at(data, *calls: int) -> None:
    """Send this process SIGINT when the training transform runs for the calls-th time (mid-batch fetch)."""
    inner, count = data.train.dataset.transform, [0]

    def transform(img):
        count[0] += 1
        if count[0] in calls:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(img)

    data.train.dataset.transform = transform


def test_ctrl_c_mid_epoch_resumes_exactly_with_dropout_and_augmentation(tiny_reference, tmp_path):
    data = load_data("digits", image_size=16, limit=128)  # 4 batches an epoch
    sigint_at(data, 128 + 40)  # epoch 2, while fetching batch 1
    with pytest.raises(Interrupted, match=r"interrupted at epoch 2, step 5; checkpoint saved in .*--resume"):
        fit(tiny_cnn(), data, TrainConfig(**FAST), out_dir=tmp_path)
    saved = state(tmp_path)
    assert (saved["epoch"], saved["batches_in_epoch"]) == (1, 1)  # mid-epoch: one batch of epoch 2 done
    resumed = tiny_cnn()
    history = fit(resumed, data, TrainConfig(**FAST), out_dir=tmp_path, resume=True)
    assert_equal_run(tiny_reference, resumed, history)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    data = load_data("digits", image_size=16, limit=128)
    sigint_at(data, 128 + 40, 128 + 41)
    with pytest.raises(Interrupted, match="at once .not saved.; the last checkpoint in .* is intact"):
        fit(tiny_cnn(), data, TrainConfig(**FAST), out_dir=tmp_path)
    assert state(tmp_path)["epoch"] == 1 and state(tmp_path)["batches_in_epoch"] == 0


def test_a_save_killed_between_its_renames_is_recovered_on_resume(tiny_reference, tmp_path):
    data = load_data("digits", image_size=16, limit=128)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        fit(tiny_cnn(), data, TrainConfig(**FAST), out_dir=tmp_path, on_epoch=stop_after_first)
    # What safeio's two-rename path leaves when killed between them: the checkpoint moved aside,
    # plus a half-written partial of the next save. Both named after a process that is gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".checkpoint.old-{dead.pid}-x"
    aside.mkdir()
    (tmp_path / "checkpoint").rename(aside / "checkpoint")
    partial = tmp_path / f".checkpoint.partial-{dead.pid}-y"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    resumed = tiny_cnn()
    history = fit(resumed, data, TrainConfig(**FAST), out_dir=tmp_path, resume=True)
    assert_equal_run(tiny_reference, resumed, history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# --- (8) checkpoints validated and matched to the run ----------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A finished 1-epoch run of SMALL: its checkpoint is what the refusals below are shown."""
    out = tmp_path_factory.mktemp("small") / "run"
    assert main(["-q", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def ckpt(one_epoch, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    return out


def refused(out: Path, capsys, *extra: str, args: list[str] = SMALL) -> str:
    before = snapshot(out)
    assert main(["-q", *args, "--out", str(out), "--resume", *extra]) == 2
    assert snapshot(out) == before  # nothing of the user's run was touched
    return one_line(capsys.readouterr().err)


def test_other_options_are_refused_naming_each_difference(ckpt):
    before = snapshot(ckpt)
    proc = run(ckpt, "--resume", "--lr", "0.05", "--label-smoothing", "0", args=SMALL)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == (
        f"error: checkpoint in {ckpt / 'checkpoint'} was written with other training options (checkpoint vs now): "
        "lr 0.1 vs 0.05, label_smoothing 0.1 vs 0.0; rerun with the same options or add --resume-anyway")
    assert snapshot(ckpt) == before


def test_more_epochs_need_resume_anyway_which_then_continues(ckpt, capsys, caplog):
    line = refused(ckpt, capsys, "--epochs", "2", "--lr", "0.05")
    assert "(checkpoint vs now): epochs 1 vs 2 (more epochs stretch the learning-rate schedule: allowed only " \
           "with --resume-anyway), lr 0.1 vs 0.05; rerun with the same options or add --resume-anyway" in line
    assert main(["-q", *SMALL, "--out", str(ckpt), "--epochs", "2", "--lr", "0.05", "--resume-anyway"]) == 0
    assert [h["epoch"] for h in json.loads((ckpt / "history.json").read_text())] == [1, 2]
    assert json.loads((ckpt / "report.json").read_text())["config"]["lr"] == 0.05
    assert "other than the checkpoint's (--resume-anyway): epochs 1 vs 2, lr 0.1 vs 0.05" in caplog.text


def test_structural_options_are_refused_even_with_resume_anyway(ckpt, capsys):
    line = refused(ckpt, capsys, "--optimizer", "adamw", "--resume-anyway")
    assert "optimizer sgd vs adamw" in line and "optimizer cannot change within a run" in line


def test_a_checkpoint_of_another_model_or_data_is_refused(ckpt, capsys):
    other = [a if a != MODEL else "test_efficientnet" for a in SMALL]
    line = refused(ckpt, capsys, "--resume-anyway", args=other)
    assert line.startswith(f"error: checkpoint in {ckpt / 'checkpoint'} was written for another model")
    assert "source name test_resnet vs test_efficientnet" in line and "start without --resume" in line
    line = refused(ckpt, capsys, "--limit", "32")
    assert "written for other data (checkpoint vs now): train_images 64 vs 32" in line


def test_another_head_is_named_by_its_tensors(tmp_path):
    data = load_data("digits", image_size=16, limit=64)
    fit(tiny_cnn(), data, TrainConfig(epochs=1, batch_size=32, progress=False), out_dir=tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SurgeryError, match=r"another model .*: 9.bias 10:float32 vs 12:float32, "
                                           r"9.weight 10x256:float32 vs 12x256:float32"):
        fit(tiny_cnn(12), data, TrainConfig(epochs=1, batch_size=32, progress=False), out_dir=tmp_path,
            resume=True, resume_anyway=True)
    assert snapshot(tmp_path) == before


def test_a_checkpoint_from_before_clip_grad_is_read_with_it_off(ckpt, capsys):
    tamper(ckpt, lambda d: d["config"].pop("clip_grad"))
    line = refused(ckpt, capsys, "--lr", "0.05")  # read: the only difference named is the one given
    assert "(checkpoint vs now): lr 0.1 vs 0.05; rerun" in line and "clip_grad" not in line
    tamper(ckpt, lambda d: d["config"].update(clip_grad="1"))
    assert "$.config.clip_grad: must be a number" in refused(ckpt, capsys)


def tamper(out: Path, change) -> None:
    path = out / "checkpoint" / "state.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["state"].update(epoch="1"), "$.state.epoch: must be an integer, not a string"),
    (lambda d: d["state"].update(extra=1), "$.state.extra: unknown key"),
    (lambda d: d["state"].update(epoch=7), "$.state.epoch: 7 is out of range 0..1"),
    (lambda d: d["config"].update(seed=True), "$.config.seed: must be an integer, not a boolean"),
    (lambda d: d["state"]["history"][0].update(val_top1=[1]), "$.state.history[0].val_top1: must be a number"),
    (lambda d: d["files"]["model.safetensors"].update(sha256="0" * 64), "does not match the size and sha256"),
    (lambda d: d["optimizer"]["groups"].pop(), "$.optimizer.groups: hold [16] parameters, this model's [16, 31]"),
    (lambda d: d.pop("format"), "holds a checkpoint of an older surgery (with optimizer.pt)"),
], ids=["wrong-type", "unknown-key", "epoch-out-of-range", "bool-for-int", "nested-record", "sha256", "groups",
        "old-format"])
def test_a_tampered_state_json_is_refused_naming_the_field(ckpt, capsys, change, message):
    tamper(ckpt, change)
    line = refused(ckpt, capsys)
    assert message in line and "Traceback" not in line, line


def test_a_too_deep_state_json_is_refused(ckpt, capsys):
    tamper(ckpt, lambda d: d["state"]["history"][0].update(deep=json.loads("[" * 40 + "]" * 40)))
    assert refused(ckpt, capsys) == (
        f"error: {ckpt / 'checkpoint' / 'state.json'}: $: state.json nests 44 levels deep (at most 8); "
        "this checkpoint cannot be resumed (start without --resume)")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda c: (c / "state.json").write_text('{"format": '), "state.json: $: state.json is not valid JSON"),
    (lambda c: (c / "state.json").write_bytes(b"\xff\xfe"), "state.json: $: is not UTF-8 text"),
    (lambda c: (c / "optimizer.safetensors").unlink(), "lacks optimizer.safetensors"),
    (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors does not match the size and sha256"),
], ids=["bad-json", "not-utf8", "missing-file", "truncated-weights"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(ckpt, capsys, damage, message):
    damage(ckpt / "checkpoint")
    line = refused(ckpt, capsys)
    assert message in line and "start without --resume" in line, line


def test_optimizer_tensors_are_checked_against_their_parameters(ckpt, capsys):
    opt = ckpt / "checkpoint" / "optimizer.safetensors"
    tensors = load_file(str(opt))
    tensors["state.0.momentum_buffer"] = torch.zeros(3)
    save_file(tensors, str(opt))
    digest = hashlib.sha256(opt.read_bytes()).hexdigest()
    tamper(ckpt, lambda d: d["files"]["optimizer.safetensors"].update(sha256=digest, bytes=opt.stat().st_size))
    line = refused(ckpt, capsys)
    assert "tensor 'state.0.momentum_buffer': has shape (3,), parameter 0's is (16, 3, 3, 3)" in line
    opt.write_bytes(b"\0" * 16)  # not safetensors at all
    tamper(ckpt, lambda d: d["files"]["optimizer.safetensors"].update(
        sha256=hashlib.sha256(b"\0" * 16).hexdigest(), bytes=16))
    assert "optimizer.safetensors cannot be loaded" in refused(ckpt, capsys)


def test_the_checkpoint_config_validator_knows_every_option():
    assert set(run_config(TrainConfig(), amp=False, channels_last=False)) == CONFIG_KEYS | OPTIONAL_CONFIG_KEYS
