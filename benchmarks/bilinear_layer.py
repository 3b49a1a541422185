"""Latency of a bilinear projection vs the dense layer it replaces (torch CPU and ONNX Runtime).

Run by hand (not part of pytest)::

    python benchmarks/bilinear_layer.py                    # print the markdown table
    python benchmarks/bilinear_layer.py --update-docs      # also rewrite the table in docs/bilinear.md
    python benchmarks/bilinear_layer.py --threads 2 --runs 50

Layers: nn.Linear(2048, 2048) vs BilinearProjection(2048, 2048, rank=r) for r in 1, 2, 4, on
inputs (1, 2048), (64, 2048) and ViT-like tokens (8, 197, 2048); plus a 1x1 and a 3x3
convolution (BilinearConv2d) where the picture differs. Each candidate is timed in
interleaved rounds (one call of each per round) so that load from other processes hits
them alike; the table gives the median over the rounds, in milliseconds. ONNX files come
from ``surgery.export.export_onnx`` (dynamic batch); ORT runs with the same thread count.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from surgery.export import export_onnx, select_providers  # noqa: E402
from surgery.nn import BilinearConv2d, BilinearProjection  # noqa: E402

DOCS = ROOT / "docs" / "bilinear.md"
BEGIN, END = "<!-- bilinear-layer-benchmark:begin -->", "<!-- bilinear-layer-benchmark:end -->"
D = K = 2048
RANKS = (1, 2, 4)
LINEAR_INPUTS = {"(1, 2048)": (1, D), "(64, 2048)": (64, D), "(8, 197, 2048)": (8, 197, D)}
# (label, dense conv, input shape): a resnet50-like pointwise conv and a 3x3 conv
CONVS = [
    ("1x1 conv 1024->256, (8, 1024, 14, 14)", (1024, 256, 1, 0), (8, 1024, 14, 14)),
    ("3x3 conv 256->256, (8, 256, 14, 14)", (256, 256, 3, 1), (8, 256, 14, 14)),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def interleaved_median_ms(fns: dict[str, Any], warmup: int, runs: int) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=select_providers())


def onnx_ops(path: Path) -> str:
    import onnx

    counts = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return " ".join(f"{op}" if n == 1 else f"{op} x{n}" for op, n in counts.items())


class EinsumProjection(BilinearProjection):
    """The same layer with one einsum instead of two matmuls (the formulation we did not pick)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = x.unflatten(-1, [self.d1, self.d2])
        y = torch.einsum("...ij,ria,rjb->...ab", X, self.U, self.V).flatten(-2)
        return y + self.bias


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def linear_flops(layer: nn.Module, tokens: int) -> int:
    """Multiply-adds x 2 of one call on ``tokens`` rows."""
    if isinstance(layer, nn.Linear):
        return 2 * tokens * layer.in_features * layer.out_features
    r = layer.rank
    return 2 * tokens * (layer.d1 * layer.d2 * r * layer.o2 + layer.o1 * layer.d1 * r * layer.o2)


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def bench_group(modules: dict[str, nn.Module], shape: tuple[int, ...], tmp: Path, threads: int, warmup: int,
                runs: int, onnx: bool, tag: str) -> dict[str, dict[str, Any]]:
    """Torch and ORT latency of each module on one input shape."""
    x = torch.randn(*shape)
    out: dict[str, dict[str, Any]] = {k: {} for k in modules}
    with torch.inference_mode():
        torch_ms = interleaved_median_ms({k: (lambda m=m: m(x)) for k, m in modules.items()}, warmup, runs)
    for k, v in torch_ms.items():
        out[k]["torch_ms"] = v
    if onnx:
        feeds, sessions = {}, {}
        for k, m in modules.items():
            path = tmp / f"{tag}_{re.sub(r'[^a-z0-9]+', '_', k.lower())}_{len(shape)}d.onnx"
            if not path.exists():
                example = torch.randn(2, *shape[1:])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_onnx(m, example, path)
            sessions[k] = ort_session(path, threads)
            feeds[k] = {sessions[k].get_inputs()[0].name: x.numpy()}
            out[k]["ops"] = onnx_ops(path)
            got = sessions[k].run(None, feeds[k])[0]
            with torch.inference_mode():
                ref = m(x).numpy()
            out[k]["ort_max_rel_diff"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
        ort_ms = interleaved_median_ms({k: (lambda s=sessions[k], f=feeds[k]: s.run(None, f)) for k in modules},
                                       warmup, runs)
        for k, v in ort_ms.items():
            out[k]["ort_ms"] = v
    return out


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = []
    header = ("| layer | input | params | FLOPs | torch ms | vs dense | ORT ms | vs dense |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    ops_seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bilinear-bench-") as tmp_name:
        tmp = Path(tmp_name)
        linears: dict[str, nn.Module] = {"nn.Linear(2048, 2048)": nn.Linear(D, K).eval()}
        for r in RANKS:
            linears[f"Bilinear rank {r}"] = BilinearProjection(D, K, rank=r).eval()
        lines.append(header)
        for label, shape in LINEAR_INPUTS.items():
            res = bench_group(linears, shape, tmp, args.threads, args.warmup, args.runs, not args.no_onnx, "linear")
            tokens = int(np.prod(shape[:-1]))
            base = res["nn.Linear(2048, 2048)"]
            for name, m in linears.items():
                r = res[name]
                ops_seen.setdefault(name, r.get("ops", ""))
                lines.append(_row(name, label, params(m), linear_flops(m, tokens), r, base))
        convs_md = [header.replace("| layer |", "| conv |")]
        for i, (label, (cin, cout, k, pad), shape) in enumerate(CONVS):
            mods: dict[str, nn.Module] = {"nn.Conv2d": nn.Conv2d(cin, cout, k, padding=pad).eval()}
            for r in (1, 2):
                mods[f"BilinearConv2d rank {r}"] = BilinearConv2d(cin, cout, k, padding=pad, rank=r).eval()
            res = bench_group(mods, shape, tmp, args.threads, args.warmup, args.runs, not args.no_onnx, f"conv{i}")
            base = res["nn.Conv2d"]
            hw = shape[0] * shape[2] * shape[3]
            for name, m in mods.items():
                r = res[name]
                ops_seen.setdefault(f"{name} {k}x{k}", r.get("ops", ""))
                if isinstance(m, nn.Conv2d):
                    flops = 2 * hw * cin * k * k * cout
                elif m.pointwise:
                    flops = 2 * hw * (m.d1 * m.d2 * m.rank * m.o2 + m.o1 * m.d1 * m.rank * m.o2)
                else:
                    flops = 2 * hw * cin * k * k * cout  # the kernel is rebuilt, then a dense conv
                convs_md.append(_row(name, label, params(m), flops, r, base))
        forms_md = [header.replace("| layer |", "| formulation |")]
        for label in ("(64, 2048)", "(8, 197, 2048)"):
            shape = LINEAR_INPUTS[label]
            forms: dict[str, nn.Module] = {}
            for r in (1, 4):
                forms[f"matmul rank {r}"] = BilinearProjection(D, K, rank=r).eval()
                forms[f"einsum rank {r}"] = EinsumProjection(D, K, rank=r).eval()
                forms[f"einsum rank {r}"].load_state_dict(forms[f"matmul rank {r}"].state_dict())
            res = bench_group(forms, shape, tmp, args.threads, args.warmup, args.runs, not args.no_onnx, "form")
            tokens = int(np.prod(shape[:-1]))
            for name, m in forms.items():
                base = res[name.replace("einsum", "matmul")]
                ops_seen.setdefault(name, res[name].get("ops", ""))
                forms_md.append(_row(name, label, params(m), linear_flops(m, tokens), res[name], base)
                                .replace("vs dense", "vs matmul"))
    when = dt.datetime.now().strftime("%Y-%m-%d")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    env = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} thread(s) for torch and ORT; "
           f"torch {torch.__version__.split('+')[0]}, onnxruntime {_ort_version()}; median of {args.runs} "
           f"interleaved rounds; load average {load} at the end (other work shares the CPU); {when}.")
    ops = "\n".join(f"- {k}: {v}" for k, v in ops_seen.items() if v)
    forms = chr(10).join(forms_md).replace("vs dense", "vs matmul")
    return (f"Measured on {env}\n\n{chr(10).join(lines)}\n\n{chr(10).join(convs_md)}\n\n"
            f"Forward formulation (same weights; ratios against the matmul form we use):\n\n{forms}\n\n"
            f"ONNX ops per layer (in order of first use):\n\n{ops}\n")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _row(name: str, label: str, n_params: int, flops: int, r: dict[str, Any], base: dict[str, Any]) -> str:
    t, tb = r["torch_ms"], base["torch_ms"]
    cells = [name, label, f"{n_params:,}", human(flops), f"{t:.3f}", f"{tb / t:.2f}x"]
    if "ort_ms" in r:
        cells += [f"{r['ort_ms']:.3f}", f"{base['ort_ms'] / r['ort_ms']:.2f}x"]
    else:
        cells += ["-", "-"]
    return "| " + " | ".join(cells) + " |"


def update_docs(table: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS} lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-onnx", action="store_true", help="torch only")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {DOCS.relative_to(ROOT)}")
    args = p.parse_args(argv)
    table = run(args)
    print(table)
    if args.update_docs:
        update_docs(table)
        print(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
