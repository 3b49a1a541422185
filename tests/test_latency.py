"""Latency in the report (issue 12.4): interleaved runs, fixed threads, spread, and "noisy" instead of a ratio.

No test here times anything against a bound: the timings fed to the verdict are given.
"""

import pytest
import torch
from torch import nn

from surgery.report import compare_latency, format_table, latency_verdict

STEADY = [10.0, 10.1, 9.9, 10.0, 10.2, 9.8, 10.0, 10.1, 9.9]
HALF = [t / 2 for t in STEADY]


def test_steady_timings_give_the_median_ratio():
    v = latency_verdict(STEADY, HALF, load=0.5, cores=2)
    assert not v["noisy"] and v["why"] == ""
    assert v["ratio"] == pytest.approx(0.5) and v["before"]["median_ms"] == 10.0 and v["after"]["runs"] == 9
    assert v["before"]["spread"] == pytest.approx(0.2 / 10.0)  # IQR 9.9..10.1 over the median


def test_a_wide_spread_or_a_busy_machine_is_called_noisy():
    jumpy = [10, 30, 10, 28, 11, 31, 10, 29, 12]
    v = latency_verdict(STEADY, jumpy, load=0.5, cores=2)
    assert v["noisy"] and v["why"].startswith("after spread ")
    v = latency_verdict(STEADY, HALF, load=5.0, cores=2)
    assert v["noisy"] and v["why"] == "load average 5.0 on 2 cores"
    assert not latency_verdict(STEADY, HALF, load=None, cores=2)["noisy"]  # no load average (Windows): spread only


class Recorder(nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log, self.lin = name, log, nn.Linear(8, 8)

    def forward(self, x):
        self.log.append(self.name)
        return self.lin(x.flatten(1)[:, :8])


def test_runs_are_interleaved_with_fixed_threads_restored_after():
    log = []
    before_threads = torch.get_num_threads()
    out = compare_latency(Recorder("A", log), Recorder("B", log), (1, 4, 4), (1, 4, 4), batches=(1, 2), runs=4,
                          threads=1)
    assert torch.get_num_threads() == before_threads and out["threads"] == 1
    per_batch = log[: len(log) // 2]
    assert per_batch == ["A", "A", "B", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then ABBA
    assert set(out["batches"]) == {"1", "2"}
    assert all(v["before"]["runs"] == v["after"]["runs"] == 4 for v in out["batches"].values())


def test_the_table_says_noisy_instead_of_a_ratio():
    base = {"params": 10, "macs": 5, "flops": 10}
    noisy = {**latency_verdict(STEADY, [10, 30, 10, 28, 11, 31, 10, 29, 12], load=0.5, cores=2), "load": 0.5}
    calm = {**latency_verdict(STEADY, HALF, load=0.5, cores=2), "load": 0.5}
    report = {"before": base, "after": base, "drift": None, "input_size": [3, 8, 8], "new_input_size": [3, 4, 4],
              "latency": {"threads": 2, "cores": 2, "batches": {"1": noisy, "8": calm}}}
    table = format_table(report)
    row1 = next(line for line in table.splitlines() if line.startswith("CPU latency b=1"))
    row8 = next(line for line in table.splitlines() if line.startswith("CPU latency b=8"))
    assert row1.endswith("noisy") and "2 thr" in row1 and row8.endswith("0.500x")
    assert "latency b=1: no ratio stated, the measurement is noisy (after spread" in table


def test_the_noisy_explanation_survives_an_onnx_row():
    # The ONNX row's own latency dict once shadowed the CPU latency: the "no ratio stated" line went missing.
    base = {"params": 10, "macs": 5, "flops": 10}
    noisy = {**latency_verdict(STEADY, [10, 30, 10, 28, 11, 31, 10, 29, 12], load=0.5, cores=2), "load": 0.5}
    onnx = {"parity": {"max_abs_diff": {"1": 1e-9}, "ok": True}, "latency_ms": {"torch": 4.0, "onnxruntime": 2.0}}
    report = {"before": base, "after": base, "drift": None, "input_size": [3, 8, 8], "new_input_size": [3, 4, 4],
              "latency": {"threads": 2, "cores": 2, "batches": {"1": noisy}}, "onnx": onnx}
    table = format_table(report)
    assert "latency b=1: no ratio stated, the measurement is noisy" in table
    assert next(ln for ln in table.splitlines() if ln.startswith("ORT vs torch")).endswith("0.500x")
