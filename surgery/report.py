"""Measurements of a model before and after surgery: params, FLOPs, latency, drift."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from .graph import compare_outputs, output_tensors

LATENCY_BATCHES = (1, 8)


def count_params(model: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


def _count(model: nn.Module, example_input: torch.Tensor) -> FlopCounterMode:
    # torch counts the CUDA attention kernels but not the CPU one that ViTs hit here.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        model(example_input)
    return counter


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2), attention included on CPU too."""
    return int(_count(model, example_input).get_total_flops())


def flops_by_child(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward per top-level child module (name -> FLOPs)."""
    counts = _count(model, example_input).get_flop_counts()
    root = type(model).__name__
    out = {}
    for name, _ in model.named_children():
        ops = counts.get(f"{root}.{name}")
        out[name] = int(sum(ops.values())) if ops else 0
    return out


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, warmup: int = 2,
                    runs: int = 7, max_seconds: float = 5.0) -> float:
    """Median wall time of one forward, in milliseconds (stops early past ``max_seconds``)."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(example_input)
        deadline = time.perf_counter() + max_seconds
        for _ in range(runs):
            start = time.perf_counter()
            model(example_input)
            times.append((time.perf_counter() - start) * 1e3)
            if time.perf_counter() > deadline and len(times) >= 3:
                break
    return statistics.median(times)


def _flat(out: Any) -> torch.Tensor:
    tensors = [t.detach().float().flatten() for t in output_tensors(out)]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def output_drift(reference: Any, candidate: Any) -> dict[str, float]:
    """How far ``candidate`` moved from ``reference``: max abs diff and cosine similarity."""
    a, b = _flat(reference), _flat(candidate)
    if a.shape != b.shape:
        return {"max_abs": math.inf, "cosine": math.nan}
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12).item() if a.numel() else 1.0
    return {"max_abs": compare_outputs(reference, candidate), "cosine": cos}


def model_stats(model: nn.Module, input_size: tuple[int, ...], *, latency: bool = True,
                seed: int = 0) -> dict[str, Any]:
    """Params, FLOPs at batch 1 and CPU latency at each of LATENCY_BATCHES."""
    model = model.eval()
    x1 = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    stats: dict[str, Any] = {"params": count_params(model), "flops": count_flops(model, x1)}
    if latency:
        stats["latency_ms"] = {
            str(b): measure_latency(model, torch.randn(b, *input_size)) for b in LATENCY_BATCHES
        }
    return stats


def compare_models(original: nn.Module, rewritten: nn.Module, input_size: tuple[int, ...],
                   new_input_size: tuple[int, ...] | None = None, *, latency: bool = True,
                   seed: int = 0) -> dict[str, Any]:
    """Before/after stats (each at its own input size) and the drift of the rewritten output.

    Drift needs one input for both models: it is None when a pass changed the input size.
    """
    new_input_size = tuple(new_input_size or input_size)
    drift = None
    if new_input_size == tuple(input_size):
        x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            drift = output_drift(original.eval()(x), rewritten.eval()(x))
    return {
        "input_size": list(input_size),
        "new_input_size": list(new_input_size),
        "before": model_stats(original, input_size, latency=latency, seed=seed),
        "after": model_stats(rewritten, new_input_size, latency=latency, seed=seed),
        "drift": drift,
    }


# --- presentation ---------------------------------------------------------------------


def human_count(n: float) -> str:
    """12,345,678 -> 12.35M: counts of params and FLOPs for tables."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.3f}x" if before else "-"


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    before, after = report["before"], report["after"]
    rows = [("", "before", "after", "ratio")]
    rows.append(("params", human_count(before["params"]), human_count(after["params"]),
                 _ratio(before["params"], after["params"])))
    rows.append(("FLOPs (batch 1)", human_count(before["flops"]), human_count(after["flops"]),
                 _ratio(before["flops"], after["flops"])))
    for b in before.get("latency_ms", {}):
        lb, la = before["latency_ms"][b], after["latency_ms"][b]
        rows.append((f"CPU latency b={b} (ms)", f"{lb:.2f}", f"{la:.2f}", _ratio(lb, la)))
    onnx = report.get("onnx")
    if onnx:
        par = onnx["parity"]
        diffs = ", ".join(f"b={k}: {v:.2e}" for k, v in par["max_abs_diff"].items())
        rows.append(("ONNX parity max|diff|", diffs, "", "ok" if par["ok"] else "FAIL"))
        lat = onnx["latency_ms"]
        rows.append(("ORT vs torch b=1 (ms)", f"{lat['torch']:.2f}", f"{lat['onnxruntime']:.2f}",
                     _ratio(lat["torch"], lat["onnxruntime"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    drift = report["drift"]
    if drift is None:
        lines.append(f"input size changed: {report['input_size']} -> {report['new_input_size']} (no drift measured)")
    else:
        lines.append(f"output drift vs original: max|diff| {drift['max_abs']:.2e}, cosine {drift['cosine']:.6f}")
    for step in report.get("passes", []):
        for note in step.get("notes", []):
            lines.append(f"[{step['pass']}] {note}")
    return "\n".join(lines)
