"""Measurements of a model before and after surgery: params, FLOPs, latency, drift."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop, shape_wrapper

from .graph import compare_outputs, output_tensors
from .inputs import as_json, as_tuple, normalize, random_inputs
from .progress import bar

LATENCY_BATCHES = (1, 8)
DRIFT_BATCH = 4  # the inputs both models see for the output drift


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


# torch counts the CUDA attention kernels but not the CPU one that ViTs hit here.
_CPU_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop}


@contextlib.contextmanager
def _no_param_grad(model: nn.Module):
    """Parameters with requires_grad off for the count, restored after.

    FlopCounterMode's module tracker hooks autograd on module inputs that require grad; a view
    of a parameter made under no_grad (CaiT's and PiT's cls_token.expand) makes it raise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _count(model: nn.Module, example_input: torch.Tensor) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_MAPPING)
    with _no_param_grad(model), torch.no_grad(), counter:
        model(*as_tuple(example_input))
    return counter


class _OpCounter(TorchDispatchMode):
    """FlopCounterMode's per-op formulas without its module tracking (the part that breaks)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _CPU_MAPPING.items()}}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fn = self.registry.get(func._overloadpacket)
        if fn is not None:
            self.flops += int(fn(*args, **kwargs, out_val=out))
        return out


def _count_by_modules(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Conv and linear layers only, from their weights and output shapes: the last resort (name -> FLOPs)."""
    totals: dict[str, int] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                w = mod.weight  # conv: each output value takes in/groups x kernel multiply-adds
                per_out = w.shape[1] * math.prod(w.shape[2:]) if isinstance(mod, nn.modules.conv._ConvNd) \
                    else w.shape[1]
                totals[name] = totals.get(name, 0) + 2 * out.numel() * per_out
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with _no_param_grad(model), torch.no_grad():
            model(*as_tuple(example_input))
    finally:
        for h in handles:
            h.remove()
    return totals


def flops_by_node(gm: fx.GraphModule, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs of each graph node of one forward (name -> FLOPs, nodes that count none left out).

    The same per-op formulas as :func:`measure_flops` (its total, where FlopCounterMode works),
    attributed to the node that ran them: what a pass uses to predict and explain its effect.
    """
    counts: dict[str, int] = {}

    class _PerNode(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            start = ops.flops
            out = super().run_node(n)
            if ops.flops > start:
                counts[n.name] = ops.flops - start
            return out

    was_training = gm.training
    try:
        with _no_param_grad(gm), torch.no_grad(), _OpCounter() as ops:
            _PerNode(gm.eval()).run(*as_tuple(example_input))
    finally:
        gm.train(was_training)
    return counts


def measure_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """FLOPs and MACs of one forward; never raises for a model that runs.

    Convention: FLOPs as torch's FlopCounterMode counts them (convolutions, matmuls and
    attention; a multiply-add is 2 FLOPs; norms, activations and adds are not counted), and
    MACs = FLOPs / 2 (what timm and Torch-Pruning report). Where FlopCounterMode fails, the
    same formulas are applied op by op, then conv/linear layers by module hooks; such a count
    has ``estimated: true`` and says why in ``method``.
    """
    method, error = "FlopCounterMode", None
    try:
        flops = int(_count(model, example_input).get_total_flops())
    except Exception as exc:  # any failure of the counter: the report still gets a number
        error = f"FlopCounterMode failed ({type(exc).__name__}: {str(exc)[:120]})"
        try:
            with _no_param_grad(model), torch.no_grad(), _OpCounter() as ops:
                model(*as_tuple(example_input))
            flops, method = ops.flops, "per-op formulas"
        except Exception:
            flops, method = sum(_count_by_modules(model, example_input).values()), "conv/linear modules"
    out: dict[str, Any] = {"flops": flops, "macs": flops // 2, "estimated": error is not None, "method": method}
    if error:
        out["error"] = error
    return out


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward (a multiply-add counts 2), attention included on CPU too."""
    return measure_flops(model, example_input)["flops"]


def flops_by_child(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward per top-level child module (name -> FLOPs); conv/linear layers only
    (an estimate) where FlopCounterMode fails."""
    try:
        counts = _count(model, example_input).get_flop_counts()
    except Exception:  # the counter's failure must not end the run
        out = dict.fromkeys((name for name, _ in model.named_children()), 0)
        for name, flops in _count_by_modules(model, example_input).items():
            top = name.split(".")[0]
            if top in out:
                out[top] += flops
        return out
    root = type(model).__name__
    out = {}
    for name, _ in model.named_children():
        ops = counts.get(f"{root}.{name}")
        out[name] = int(sum(ops.values())) if ops else 0
    return out


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


def count_model(model: nn.Module, input_size: tuple[int, ...], *, seed: int = 0) -> dict[str, Any]:
    """Params, MACs and FLOPs at batch 1: the one counter of the report and of every pass's effect.

    FLOPs as :func:`measure_flops` counts them; MACs = FLOPs / 2. ``flops_estimated`` is true
    where FlopCounterMode failed and a fallback counted (``flops_method`` says which).
    """
    was_training = model.training
    x1 = random_inputs(input_size, 1, seed)
    try:
        f = measure_flops(model.eval(), x1)
    finally:
        model.train(was_training)  # apply() leaves the caller's model as it was
    out: dict[str, Any] = {"params": count_params(model), "macs": f["macs"], "flops": f["flops"],
                           "flops_estimated": f["estimated"], "flops_method": f["method"]}
    if "error" in f:
        out["flops_error"] = f["error"]
    return out


MAX_SPREAD = 0.20  # relative interquartile range above which a latency ratio is not stated as fact


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def latency_verdict(before: list[float], after: list[float], *, load: float | None, cores: int) -> dict[str, Any]:
    """Median and spread of each side's timings and whether their ratio can be trusted.

    Spread is the interquartile range over the median; the ratio is "noisy" when either
    side's spread exceeds MAX_SPREAD or the 1-minute load average exceeds the cores.
    """
    sides = {}
    for name, times in (("before", before), ("after", after)):
        q1, median, q3 = _quartiles(times)
        sides[name] = {"median_ms": median, "spread": (q3 - q1) / median if median > 0 else 0.0,
                       "runs": len(times)}
    why = [f"{name} spread {v['spread']:.0%}" for name, v in sides.items() if v["spread"] > MAX_SPREAD]
    if load is not None and load > cores:
        why.append(f"load average {load:.1f} on {cores} cores")
    ratio = sides["after"]["median_ms"] / sides["before"]["median_ms"] if sides["before"]["median_ms"] else None
    return {**sides, "ratio": ratio, "noisy": bool(why), "why": "; ".join(why)}


def compare_latency(original: nn.Module, rewritten: nn.Module, input_size: tuple[int, ...],
                    new_input_size: tuple[int, ...], *, batches: Sequence[int] = LATENCY_BATCHES, runs: int = 9,
                    threads: int | None = None, max_seconds: float = 10.0, seed: int = 0) -> dict[str, Any]:
    """CPU latency of both models, interleaved run by run so that a change in machine load hits both.

    Torch's intra-op threads are fixed for the measurement (``threads``, default the current
    setting) and stated; each batch size gets ``runs`` timed forwards per model (fewer, but at
    least 5, once ``max_seconds`` is spent), in ABBA order to cancel drift.
    """
    cores = os.cpu_count() or 1
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "cores": cores, "batches": {}}
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode():
            for b in batches:
                xs = (as_tuple(random_inputs(input_size, b, g)), as_tuple(random_inputs(new_input_size, b, g)))
                models = (original.eval(), rewritten.eval())
                for m, x in zip(models, xs):  # warm-up: allocator, caches, lazy init
                    m(*x)
                    m(*x)
                times: tuple[list[float], list[float]] = ([], [])
                deadline = time.perf_counter() + max_seconds
                for r in bar(range(runs), f"latency b={b}", unit="run"):
                    for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                        start = time.perf_counter()
                        models[i](*xs[i])
                        times[i].append((time.perf_counter() - start) * 1e3)
                    if time.perf_counter() > deadline and r + 1 >= 5:
                        break
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                out["batches"][str(b)] = {**latency_verdict(*times, load=load, cores=cores), "load": load}
    finally:
        torch.set_num_threads(previous)
    return out


def compare_models(original: nn.Module, rewritten: nn.Module, input_size: tuple[int, ...],
                   new_input_size: tuple[int, ...] | None = None, *, latency: bool = True,
                   seed: int = 0, counts: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """Before/after stats (each at its own input size) and the drift of the rewritten output.

    ``counts``: the (before, after) :func:`count_model` results when the caller has them
    (the pipeline's pass effects), so that the totals are the same numbers, counted once.
    Drift needs one input for both models: it is None when a pass changed the input size.
    """
    input_size = normalize(input_size)
    new_input_size = normalize(new_input_size or input_size)
    drift = None
    if new_input_size == input_size:
        x = as_tuple(random_inputs(input_size, DRIFT_BATCH, seed))
        with torch.no_grad():
            drift = output_drift(original.eval()(*x), rewritten.eval()(*x))
    before, after = counts if counts is not None else (None, None)
    report = {
        "input_size": as_json(input_size),
        "new_input_size": as_json(new_input_size),
        "before": dict(before) if before is not None else count_model(original.eval(), input_size, seed=seed),
        "after": dict(after) if after is not None else count_model(rewritten.eval(), new_input_size, seed=seed),
        "drift": drift,
    }
    if latency:
        lat = compare_latency(original, rewritten, input_size, new_input_size, seed=seed)
        report["latency"] = lat
        for side in ("before", "after"):  # the medians, where readers of earlier reports look
            report[side]["latency_ms"] = {b: v[side]["median_ms"] for b, v in lat["batches"].items()}
    return report


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
    rows = [("FLOPs = 2 x MACs", "before", "after", "ratio")]
    rows.append(("params", human_count(before["params"]), human_count(after["params"]),
                 _ratio(before["params"], after["params"])))
    estimated = ", estimated" if before.get("flops_estimated") or after.get("flops_estimated") else ""
    for key, label in (("macs", "MACs"), ("flops", "FLOPs")):
        if key in before and key in after:
            rows.append((f"{label} (batch 1{estimated})", human_count(before[key]), human_count(after[key]),
                         _ratio(before[key], after[key])))
    lat = report.get("latency")
    for b, v in (lat or {}).get("batches", {}).items():
        lb, la = v["before"]["median_ms"], v["after"]["median_ms"]
        rows.append((f"CPU latency b={b} (ms, {lat['threads']} thr)", f"{lb:.2f}", f"{la:.2f}",
                     "noisy" if v["noisy"] else _ratio(lb, la)))
    onnx = report.get("onnx")
    if onnx:
        par = onnx["parity"]
        diffs = ", ".join(f"b={k}: {v:.2e}" for k, v in par["max_abs_diff"].items())
        rows.append(("ONNX parity max|diff|", diffs, "", "ok" if par["ok"] else "FAIL"))
        ort = onnx["latency_ms"]  # not `lat`: the noisy-latency lines below read the CPU latency
        rows.append(("ORT vs torch b=1 (ms)", f"{ort['torch']:.2f}", f"{ort['onnxruntime']:.2f}",
                     _ratio(ort["torch"], ort["onnxruntime"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for b, v in (lat or {}).get("batches", {}).items():
        if v["noisy"]:
            lines.append(f"latency b={b}: no ratio stated, the measurement is noisy ({v['why']}; median of "
                         f"{v['before']['runs']} interleaved runs each)")
    drift = report["drift"]
    if drift is None:
        lines.append(f"input size changed: {report['input_size']} -> {report['new_input_size']} (no drift measured)")
    else:
        lines.append(f"output drift vs original: max|diff| {drift['max_abs']:.2e}, cosine {drift['cosine']:.6f}")
    for side in ("before", "after"):
        if report[side].get("flops_estimated"):
            lines.append(f"FLOPs {side} estimated: {report[side].get('flops_error', 'FlopCounterMode failed')}; "
                         f"counted by {report[side].get('flops_method')}")
    lines += accuracy_lines(report.get("accuracy"))
    if report.get("seconds"):
        lines.append("time: " + ", ".join(f"{name} {t:.1f} s" for name, t in report["seconds"].items()))
    for step in report.get("passes", []):
        effect = step.get("effect")
        if effect:
            lines.append(f"[{step['pass']}] {effect_line(effect)}")
        for note in step.get("notes", []):
            lines.append(f"[{step['pass']}] {note}")
        lines += [f"[{step['pass']}] {line}" for line in recovery_lines(step.get("recovery"))]
    return "\n".join(lines)


def recovery_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """Every fit of a recovery: its node, how it was fitted, its relative activation error before -> after."""
    if not rows:
        return []
    table = [("recovered node", "fit", "error before", "after", "")]
    table += [(r["node"], r["kind"], f"{r['before']:.4f}", f"{r['after']:.4f}", "" if r["kept"] else "undone")
              for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    return ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in table]


ACCURACY_ROWS = (("original", "original"), ("rewritten", "rewritten"), ("finetuned", "fine-tuned"))


def accuracy_lines(accuracy: dict[str, Any] | None) -> list[str]:
    """Top-1, top-5 and loss of the original, rewritten and fine-tuned models, on one val split."""
    if not accuracy:
        return []
    rows = [(label, accuracy[key]) for key, label in ACCURACY_ROWS if key in accuracy]
    images = next((m["val_images"] for _, m in rows if "val_images" in m), None)
    head = f"accuracy on {accuracy['data']} val" + (f" ({images} images)" if images is not None else "")
    table = [(head, "top-1", "top-5", "loss")]
    notes = []
    for label, m in rows:
        if "skipped" in m:
            table.append((label, "-", "-", "-"))
            notes.append(f"{label} not evaluated: {m['skipped']}")
        else:
            table.append((label, f"{m['val_top1']:.4f}", f"{m['val_top5']:.4f}", f"{m['val_loss']:.4f}"))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    return lines[:1] + ["-" * len(lines[0])] + lines[1:] + notes


def effect_line(effect: dict[str, Any]) -> str:
    """One line for a pass's measured effect: "no change: <reason>" or what it changed."""
    if not effect["changed"]:
        return f"no change: {effect.get('reason', '')}"
    b, a, r = effect["before"], effect["after"], effect["rewritten"]
    counts = ", ".join(f"{label} {human_count(b[k])} -> {human_count(a[k])}"
                       for k, label in (("params", "params"), ("macs", "MACs"), ("flops", "FLOPs")))
    nodes = ", ".join(f"{sign}{r[k]} nodes" for k, sign in (("nodes_added", "+"), ("nodes_removed", "-"),
                                                             ("nodes_changed", "~")) if r[k])
    text = f"changed: {counts}; {r['modules']} module(s) rewritten" + (f", {nodes}" if nodes else "")
    if "input_size" in effect:
        old, new = ("x".join(map(str, size)) for size in effect["input_size"])
        text += f"; input {old} -> {new}"
    if effect.get("target"):
        text += "; " + target_line(effect["target"])
    return text


_BOUND_WORDS = {"equal": "expected", "at_most": "expected at most", "less": "expected below",
                "more": "expected above"}


def target_line(target: dict[str, Any]) -> str:
    """What a pass was asked for against what the report's counter measured, and why it fell short."""
    text = f"target {target['kind']}={target['requested']}"
    if "reached_flops" in target:
        text += (f": FLOPs {target['reached_flops']:.3f}x by this counter, "
                 f"{_BOUND_WORDS[target['bound']]} {target['expected_flops']:.3f}x")
    text += " (met)" if target["met"] else " MISSED"
    if not target["met"] and target.get("cause"):
        text += f": {target['cause']}"
    return text
