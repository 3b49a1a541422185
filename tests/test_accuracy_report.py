"""Accuracy before and after surgery in the report, and the artifact's figures (issue 13.2)."""

import json
import os
import subprocess
import sys

from surgery.plots import report_panels

PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "SURGERY_PROGRESS": "0"})


def test_apply_with_data_reports_original_rewritten_and_finetuned_on_one_split(tmp_path):
    out = tmp_path / "art"
    proc = cli("apply", "resnet18", "--input-size", "32", "--num-classes", "10", "--pass", "prune:flops=0.5",
               "--data", "digits", "--finetune-epochs", "1", "--limit", "120", "--no-latency", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["data"] == "digits"
    for key in ("original", "rewritten", "finetuned"):
        m = acc[key]
        assert 0.0 <= m["val_top1"] <= m["val_top5"] <= 1.0 and m["val_loss"] > 0
        assert m["val_images"] == acc["original"]["val_images"] > 0  # the same val split for all three
    # "before" of the fine-tune is the rewritten model as apply left it, not its first epoch
    assert report["finetune"]["before"] == acc["rewritten"] and report["finetune"]["after"] == acc["finetuned"]
    assert len(report["finetune"]["history"]) == 1
    table = proc.stdout
    header = next(ln for ln in table.splitlines() if ln.startswith("accuracy on digits val"))
    assert f"({acc['original']['val_images']} images)" in header
    for label, key in (("original", "original"), ("rewritten", "rewritten"), ("fine-tuned", "finetuned")):
        row = next(ln for ln in table.splitlines() if ln.startswith(label + " "))
        assert row.split()[1:] == [f"{acc[key][k]:.4f}" for k in ("val_top1", "val_top5", "val_loss")]
    assert (out / "report.png").read_bytes()[:8] == PNG
    assert "report.png" in table


def test_a_head_that_does_not_fit_the_data_is_skipped_with_the_reason():
    proc = cli("apply", "resnet18", "--input-size", "32", "--pass", "fuse", "--data", "digits", "--limit", "40",
               "--no-latency", "--json")
    assert proc.returncode == 0, proc.stderr
    acc = json.loads(proc.stdout)["accuracy"]
    for key in ("original", "rewritten"):
        assert "1000" in acc[key]["skipped"] and "10" in acc[key]["skipped"]


def test_training_run_writes_its_curves(tmp_path):
    out = tmp_path / "run"
    proc = cli("-q", "train", "resnet10t", "--data", "digits", "--epochs", "2", "--limit", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_report_figure_draws_only_what_was_measured():
    report = {"before": {"params": 2_000_000, "macs": 5e8}, "after": {"params": 1_000_000, "macs": 2.5e8},
              "latency": {"batches": {"1": {"before": {"median_ms": 4.0}, "after": {"median_ms": 3.0},
                                            "noisy": True}}},
              "accuracy": {"data": "digits", "original": {"val_top1": 0.9},
                           "rewritten": {"skipped": "head does not fit"}}}
    panels = report_panels(report)
    assert [p[0] for p in panels] == ["params (M)", "MACs (batch 1) (M)", "CPU latency b=1 (ms) - noisy",
                                      "top-1 on digits"]
    assert panels[0][2] == [2.0, 1.0] and panels[1][2] == [500.0, 250.0]
    assert panels[3][1:3] == (["original"], [0.9])  # the skipped model has no bar
    assert report_panels({"before": {}, "after": {}}) == []


def test_a_figure_that_fails_does_not_cost_the_artifact(tmp_path, caplog):
    from torch import nn

    from surgery.artifact import write_artifact
    from surgery.recipe import RECIPE_FORMAT

    def fail(path):
        raise RuntimeError("no fonts")

    net = nn.Linear(2, 2)
    recipe = {"format": RECIPE_FORMAT, "source": {"kind": "module", "class": "torch.nn.Linear"},
              "input_size": [3, 8, 8], "passes": []}
    write_artifact(tmp_path / "a", net, recipe, {"model": "x"}, figures={"report.png": fail})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors", "recipe.json", "report.json"]
    assert "could not draw report.png" in caplog.text
