"""Does `prune` turn fewer FLOPs into lower CPU latency? (issue 5, benchmark 1)

For each model and FLOPs target: the pass time, the FLOPs ratio, the measured latency
ratio (torch eager and ONNX Runtime, CPU, each batch size) and their quotient

    efficiency = (latency speedup) / (FLOPs speedup) = (FLOPs ratio) / (latency ratio)

1.0 means every FLOP removed is time saved. The original and the pruned model are timed
interleaved (a, b, a, b, ...) so that load from other processes hits both alike; the
median and the minimum of the runs are both kept (the minimum is the least disturbed).

    .venv/bin/python benchmarks/prune_latency.py                       # full table (slow)
    .venv/bin/python benchmarks/prune_latency.py --models resnet50 --targets 0.5 --batches 8

Results: benchmarks/results/prune_latency.{json,md} (merged by model, target and batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery import passes as registry  # noqa: E402
from surgery.export import export_onnx  # noqa: E402
from surgery.graph import trace  # noqa: E402
from surgery.models import load_model  # noqa: E402
from surgery.pipeline import example_batch  # noqa: E402
from surgery.report import count_flops  # noqa: E402

MODELS = ["resnet50", "convnext_tiny", "efficientnet_b0", "vit_small_patch16_224"]
TARGETS = [0.75, 0.5, 0.25]
BATCHES = [1, 16]
OUT = ROOT / "benchmarks" / "results"


def paired(fa, fb, runs: int, warmup: int = 2) -> dict[str, float]:
    """Interleaved wall times (ms) of two callables: median and min of each."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(runs):
        for f, t in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            f()
            t.append((time.perf_counter() - start) * 1e3)
    return {"a_median": statistics.median(ta), "b_median": statistics.median(tb), "a_min": min(ta), "b_min": min(tb)}


def torch_runner(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def ort_runner(path: Path, x: torch.Tensor, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name, feed = session.get_inputs()[0].name, x.numpy()
    return lambda: session.run(None, {name: feed})


_ORIGINAL: dict[str, tuple] = {}  # model name -> (model, size, traced graph, ONNX path): built once per run


def original(name: str, args) -> tuple:
    if name not in _ORIGINAL:
        torch.manual_seed(0)  # random weights, but the same ones (and the same plan) on every run
        loaded = load_model(name, input_size=args.input_size)
        size = tuple(loaded.input_size)
        model = loaded.model.eval()
        gm = trace(model, example_batch(size))
        path = None
        if not args.no_onnx:
            path = export_onnx(model, torch.randn(1, *size), Path(tempfile.mkdtemp(prefix="prune-bench-")) / "a.onnx")
        _ORIGINAL[name] = (model, size, gm, path)
    return _ORIGINAL[name]


def bench(name: str, target: float, args) -> list[dict]:
    model, size, gm, original_onnx = original(name, args)
    example = example_batch(size)
    info = registry.get("prune")
    cfg = registry.make_config("prune", {"flops": target, **dict(o.split("=", 1) for o in args.option)})
    ctx = registry.PassContext(example_inputs=(example,))
    start = time.perf_counter()
    pruned = info.run(gm, cfg, ctx)
    pass_s = time.perf_counter() - start
    x1 = torch.randn(1, *size)
    flops_ratio = count_flops(pruned, x1) / count_flops(model, x1)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    onnx_paths = None
    if not args.no_onnx:
        onnx_paths = (original_onnx, export_onnx(pruned, x1, tmp / "b.onnx"))
    for batch in args.batches:
        x = torch.randn(batch, *size)
        runtimes = {"torch": (torch_runner(model, x), torch_runner(pruned, x))}
        if onnx_paths:
            runtimes["onnxruntime"] = tuple(ort_runner(p, x, args.threads) for p in onnx_paths)
        for runtime, (fa, fb) in runtimes.items():
            t = paired(fa, fb, args.runs)
            lat_med, lat_min = t["b_median"] / t["a_median"], t["b_min"] / t["a_min"]
            rows.append({
                "model": name, "target": target, "batch": batch, "runtime": runtime, "input": list(size),
                "runs": args.runs,
                "pass_s": round(pass_s, 3), "flops_ratio": round(flops_ratio, 4),
                "latency_ms": {k: round(v, 2) for k, v in t.items()},
                "latency_ratio_median": round(lat_med, 4), "latency_ratio_min": round(lat_min, 4),
                "efficiency_median": round(flops_ratio / lat_med, 3), "efficiency_min": round(flops_ratio / lat_min, 3),
                "options": args.option,
            })
            tqdm.write(json.dumps(rows[-1]))
    return rows


def write(rows: list[dict], args) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "prune_latency.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda r: (r["model"], r["target"], r["batch"], r["runtime"])  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    rows = sorted(merged.values(), key=key)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "command": " ".join(sys.argv),
            "load_average": [round(v, 2) for v in os.getloadavg()]}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# prune: FLOPs vs CPU latency", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; load average after the last run "
        f"{meta['load_average']}. Regenerate: "
        "`.venv/bin/python benchmarks/prune_latency.py` (see its docstring for subsets).", "",
        "efficiency = FLOPs ratio / latency ratio (1.0: every removed FLOP is saved time). Median and min of "
        "interleaved runs; the machine may be shared, so trust min more than median.", "",
        "| model | input | FLOPs target | pass s | FLOPs ratio | runtime | batch | ms original -> pruned (median) "
        "| latency ratio (median / min) | efficiency (median / min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "x".join(map(str, r.get("input", [])[1:])) or "?"
        ms = r["latency_ms"]
        lines.append(f"| {r['model']} | {size} | {r['target']} | {r['pass_s']:.2f} | {r['flops_ratio']:.3f} "
                     f"| {r['runtime']} | {r['batch']} | {ms['a_median']:.1f} -> {ms['b_median']:.1f} "
                     f"| {r['latency_ratio_median']:.3f} / {r['latency_ratio_min']:.3f} "
                     f"| {r['efficiency_median']:.2f} / {r['efficiency_min']:.2f} |")
    (OUT / "prune_latency.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--targets", nargs="+", type=float, default=TARGETS)
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--input-size", default=None, help="e.g. 160 or 3x160x160 (default: each model's own)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--option", action="append", default=[], help="extra prune option key=value (repeatable)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    jobs = [(name, target) for name in args.models for target in args.targets]
    for name, target in tqdm(jobs, desc="prune latency", unit="model x target", dynamic_ncols=True):
        rows += bench(name, target, args)
    if not args.no_write:
        write(rows, args)


if __name__ == "__main__":
    main()
