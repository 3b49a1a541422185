"""Progress of long work and where the time went (issue 12.5)."""

import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

import surgery
from surgery import progress


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


APPLY = ("apply", "resnet18", "--input-size", "32", "--no-latency", "--pass", "fuse", "--pass", "prune:flops=0.5")


def test_apply_shows_a_bar_over_its_steps_when_asked():
    proc = cli(*APPLY, env={"SURGERY_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.replace("\r", "\n")
    assert "apply resnet18: 0/5 steps" in err and "apply resnet18: 5/5 steps" in err
    for step in ("trace", "count", "fuse", "prune", "drift"):
        assert f", {step}" in err, step
    assert "prune: FLOPs search (counted)" in err  # the inner loop has its own bar
    # The table says where the time went, step by step.
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("time: "))
    assert [part.split(" ")[0] for part in line[6:].split(", ")] == ["trace", "count", "fuse", "prune", "drift"]


def test_quiet_and_a_pipe_show_no_bar():
    quiet = cli("-q", *APPLY, env={"SURGERY_PROGRESS": "1"})  # -q wins over the environment
    piped = cli(*APPLY, env={"SURGERY_PROGRESS": ""})  # stderr is a pipe here: off by default
    for proc in (quiet, piped):
        assert proc.returncode == 0, proc.stderr
        assert "steps |" not in proc.stderr and "FLOPs search" not in proc.stderr
    assert quiet.stderr == ""


def test_report_seconds_cover_every_step(monkeypatch):
    monkeypatch.setenv("SURGERY_PROGRESS", "0")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    result = surgery.apply(net, ["fuse", "fuse"], example_inputs=torch.randn(2, 3, 8, 8), latency=False)
    seconds = result.report["seconds"]
    assert list(seconds) == ["trace", "count", "fuse", "fuse #2", "drift"]
    assert all(isinstance(t, float) and t >= 0 for t in seconds.values())
    json.dumps(result.report)  # stays JSON


def test_steps_tick_while_a_step_runs(capsys):
    progress.set_enabled(True)
    try:
        with progress.Steps("job", 1) as steps, steps.step("slow"):
            time.sleep(1.2)
    finally:
        progress.set_enabled(None)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "slow 1s" in err  # the running step's own clock, refreshed without an update
    assert steps.timings[0][0] == "slow" and steps.timings[0][1] >= 1.2
