"""The CLI verbs, run as a user runs them: in a subprocess."""

import json
import subprocess
import sys

import pytest
import torch

import surgery


def run(*args, check_code=0):
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == check_code, proc.stderr
    return proc


def test_help_lists_every_verb():
    out = run("--help").stdout
    for verb in ("apply", "passes", "inspect", "export"):
        assert verb in out
    for verb in ("apply", "passes", "inspect", "export"):
        assert "usage: surgery " + verb in run(verb, "--help").stdout


def test_passes_lists_options_from_the_dataclasses():
    out = run("passes").stdout
    assert "fuse: Fold BatchNorm" in out and "skip (list[str], default [])" in out
    data = {p["name"]: p for p in json.loads(run("passes", "--json").stdout)}
    assert data["fuse"]["options"][0]["name"] == "skip"


def test_apply_writes_all_four_files_and_they_reload(tmp_path):
    out = tmp_path / "r18"
    proc = run("apply", "resnet18", "--pass", "fuse", "--input-size", "64", "--num-classes", "10",
               "--out", str(out), "--onnx", "--json", "--no-latency")
    report = json.loads(proc.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.safetensors", "recipe.json", "report.json",
                                                     "report.png"]
    assert report["drift"]["max_abs"] <= 1e-5
    assert report["onnx"]["parity"]["ok"] and set(report["onnx"]["parity"]["max_abs_diff"]) == {"1", "4"}
    assert json.loads((out / "report.json").read_text())["onnx"]["parity"]["ok"]
    model = surgery.load(out)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # The artifact is a model spec too: export it again on its own.
    proc = run("export", str(out), "--out", str(tmp_path / "again.onnx"), "--json")
    assert json.loads(proc.stdout)["parity"]["ok"]


def test_apply_prints_a_table(tmp_path):
    proc = run("apply", "resnet18", "--pass", "fuse", "--input-size", "32")
    assert "params" in proc.stdout and "CPU latency b=1" in proc.stdout and "folded 20 BatchNorm" in proc.stdout


def test_inspect_summarises_stages():
    data = json.loads(run("inspect", "resnet18", "--input-size", "32", "--json").stdout)
    names = [s["name"] for s in data["stages"]]
    assert names[:2] == ["conv1", "bn1"] and "layer4" in names
    assert sum(s["params"] for s in data["stages"]) == data["params"] == 11689512
    layer1 = next(s for s in data["stages"] if s["name"] == "layer1")
    assert layer1["flops"] == 4 * 2 * 64 * 64 * 9 * 8 * 8  # 4 convs 3x3 64->64 at 8x8
    assert data["module_types"]["BatchNorm2d"] == 20


@pytest.mark.parametrize("args,message", [
    (["apply", "resnet5O", "--pass", "fuse"], "unknown model 'resnet5O'; did you mean resnet50"),
    (["apply", "resnet18", "--pass", "fusion"], "unknown pass 'fusion'"),
    (["apply", "resnet18", "--pass", "fuse:skp=a"], "no option 'skp'"),
    (["apply", "resnet18", "--pass", "fuse", "--input-size", "big"], "bad input size"),
    (["apply", "resnet18", "--pass", "fuse", "--weights", "/nope.safetensors"], "not found"),
    (["apply", "resnet18", "--pass", "fuse", "--onnx"], "--onnx writes model.onnx"),
    (["inspect", "vit_tiny_patch16_224", "--input-size", "3x8x8"], "input 3x8x8 does not fit VisionTransformer"),
    (["export", "/no/such/artifact/", "--out", "x.onnx"], "not found"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_existing_out_dir_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run("apply", "resnet18", "--pass", "fuse", "--input-size", "32", "--out", str(out), check_code=2)
    assert "not empty" in proc.stderr and (out / "keep.txt").read_text() == "precious"


def test_cli_and_api_agree(tmp_path):
    run("apply", "resnet18", "--pass", "fuse", "--input-size", "32", "--out", str(tmp_path / "cli"), "--no-latency")
    api = surgery.apply("resnet18", ["fuse"], input_size="32", measure=False)
    cli_recipe = json.loads((tmp_path / "cli" / "recipe.json").read_text())
    assert cli_recipe["passes"] == api.recipe["passes"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        # Same spec, different random init: the architecture matches, the weights need not.
        assert surgery.load(tmp_path / "cli")(x).shape == api.model(x).shape


def test_train_fuse_evaluate_finetune_chain(tmp_path):
    base, fused, tuned = tmp_path / "base", tmp_path / "fused", tmp_path / "tuned"
    quick = ["--limit", "96", "--input-size", "16", "--batch-size", "32"]
    trained = json.loads(run("train", "resnet18", "--data", "digits", "--epochs", "1", "--out", str(base),
                             "--json", *quick).stdout)
    assert (base / "history.json").is_file() and trained["history"][0]["epoch"] == 1
    run("apply", str(base), "--pass", "fuse", "--out", str(fused), "--no-latency")
    before = json.loads(run("evaluate", str(base), "--limit", "96", "--json").stdout)
    after = json.loads(run("evaluate", str(fused), "--limit", "96", "--json").stdout)
    assert after["val_top1"] == before["val_top1"]  # fuse keeps the accuracy exactly
    assert abs(after["val_loss"] - before["val_loss"]) < 1e-4
    out = json.loads(run("finetune", str(fused), "--teacher", str(base), "--epochs", "1", "--out", str(tuned),
                         "--json", "--limit", "96", "--batch-size", "32").stdout)
    assert out["history"][0]["distill_loss"] > 0
    assert json.loads((tuned / "recipe.json").read_text())["passes"][0]["pass"] == "fuse"


@pytest.mark.parametrize("args,message", [
    (["train", "resnet18", "--data", "no/such/folder"], "data 'no/such/folder' not found"),
    (["evaluate", "resnet18", "--data", "digits", "--num-classes", "5"], "has 5 outputs but digits has 10"),
    (["finetune", "resnet18", "--out", "x", "--resume"], "holds no checkpoint"),
])
def test_training_bad_input(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
