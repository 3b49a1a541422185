"""Progressive resizing (kernel rescaling) on digits: full resolution vs small-first, same epoch budget.

    python benchmarks/rescale.py [--model resnet18] [--epochs 6] [--size 32] [--factor 0.5]
                                 [--switch 1 2 3] [--reset 2] [--seeds 0 1] [--threads 1]

Trains the same model from the same initial weights (a) at full resolution throughout and
(b) progressively: the first SWITCH epochs at factor x size with rescaled kernels, then at
full size. Reports wall time (including the rescale at the switch), training images/s per
phase, final val top-1, and plots val top-1 against wall time for every run. Writes
benchmarks/results/rescale.md, rescale.json and rescale.png.

The runs are interleaved seed by seed, so a change in the machine's load hits all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from surgery.models import load_model
from surgery.schedule import ProgressiveResize, phase_summary
from surgery.tasks import data_for
from surgery.train import TrainConfig, fit


def run(model_name: str, size: int, epochs: int, seed: int, schedule: ProgressiveResize | None,
        batch_size: int, optimizer: str = "sgd", lr: float | None = None) -> dict:
    torch.manual_seed(seed)
    loaded = load_model(model_name, num_classes=10, input_size=size)
    data = data_for("digits", loaded, seed=0)  # one split for every run
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, optimizer=optimizer, lr=lr, progress=False)
    curve = []
    t0, c0 = time.perf_counter(), time.process_time()

    def on_epoch(record: dict) -> None:
        curve.append((time.perf_counter() - t0, time.process_time() - c0, record["val_top1"], record.get("phase")))

    history = fit(loaded.model, data, cfg, schedule=schedule, on_epoch=on_epoch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CPU seconds per phase (training + evaluation of its epochs), from the per-epoch marks.
    marks = [(0.0, None)] + [(c, p) for _, c, _, p in curve]
    phase_cpu: dict[str, float] = {}
    for (a, _), (b, p) in zip(marks, marks[1:]):
        phase_cpu[p or "full"] = phase_cpu.get(p or "full", 0.0) + b - a
    phases = phase_summary(history)
    for name, p in phases.items():
        p["cpu_s"] = phase_cpu.get(name, 0.0)
        p["images_per_cpu_s"] = len(data.train) * p["epochs"] / max(p["cpu_s"], 1e-9)
    return {"wall_s": wall, "cpu_s": cpu, "val_top1": history[-1]["val_top1"], "curve": curve,
            "phases": phases, "history": history,
            "switch_s": next((h.get("switch_seconds", 0.0) for h in history if h.get("switch")), 0.0),
            "at_switch": next(((history[i - 1]["val_top1"], h["val_top1_at_switch"]) for i, h in enumerate(history)
                               if h.get("switch") and i > 0 and "val_top1_at_switch" in h), ())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--factor", type=float, default=0.5)
    ap.add_argument("--switch", type=int, nargs="+", default=[1, 2, 3], help="switch epochs to try")
    ap.add_argument("--reset", type=int, nargs="*", default=[2], help="switch epochs to try with a fresh optimizer")
    ap.add_argument("--resize-only", type=int, nargs="*", default=[2],
                    help="switch epochs to try without kernel rescaling (the unchanged model on small images first)")
    ap.add_argument("--short-full", type=int, nargs="*", default=[4, 5],
                    help="also train at full size for fewer epochs (own schedule): the equal-compute baseline")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--lr", type=float, default=None, help="default: the optimizer's (surgery.train)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads ran 10x slower than 1)")
    ap.add_argument("--results", default="benchmarks/results/rescale")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from RESULTS.json")
    ap.add_argument("--merge", action="store_true", help="keep the runs in RESULTS.json, run only the missing ones")
    ap.add_argument("--skip-transfer", action="store_true", help="skip the transfer-without-training check")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[bench] %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.results)
    if args.report_only:
        saved = json.loads(out.with_suffix(".json").read_text())
        report(argparse.Namespace(**saved["args"]), saved["results"], out, saved.get("transfer"))
        return

    runs: dict[str, tuple[ProgressiveResize | None, int]] = {"full": (None, args.epochs)}
    for s in args.switch:
        # optimizer state carried over the switch ("reset-opt": fresh, the schedule's default)
        runs[f"switch@{s}"] = (ProgressiveResize(factor=args.factor, switch_epoch=s, reset_optimizer=False),
                               args.epochs)
    for s in args.reset:
        runs[f"switch@{s} reset-opt"] = (ProgressiveResize(factor=args.factor, switch_epoch=s, reset_optimizer=True),
                                         args.epochs)
    for s in args.resize_only:
        runs[f"resize-only@{s}"] = (ProgressiveResize(factor=args.factor, switch_epoch=s, rescale_kernels=False,
                                                      reset_optimizer=False), args.epochs)
    for e in args.short_full:
        runs[f"full {e} epochs"] = (None, e)
    saved = json.loads(out.with_suffix(".json").read_text()) if args.merge else {"results": {}}
    results: dict[str, list[dict]] = {name: saved["results"].get(name, []) for name in runs}
    for seed in args.seeds:
        for name, (schedule, epochs) in runs.items():
            if args.merge and len(results[name]) == len(args.seeds):
                continue
            r = run(args.model, args.size, epochs, seed, schedule, args.batch_size, args.optimizer, args.lr)
            results[name].append(r)
            print(f"seed {seed} {name:>18}: wall {r['wall_s']:6.1f}s  cpu {r['cpu_s']:6.1f}s  "
                  f"val top-1 {r['val_top1']:.4f}", flush=True)
    saved["args"], saved["results"] = vars(args), results
    if not args.skip_transfer:
        saved["transfer"] = transfer(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    report(args, results, out, saved.get("transfer"))


def _large_kernel_cnn(k: int) -> torch.nn.Module:
    """Every spatial kernel k x k (so every one rescales at 0.5), one 2x2 pool, a fixed 4x4 adaptive pool."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, k, padding=k // 2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, k, padding=k // 2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10))


def transfer(args: argparse.Namespace) -> list[dict]:
    """Train at full size, then evaluate at factor x size without training: rescaled vs unchanged kernels."""
    from surgery.models import LoadedModel
    from surgery.pipeline import apply
    from surgery.schedule import resized_data
    from surgery.train import evaluate

    rows = []
    cases = [(f"cnn, all kernels {k}x{k}", lambda k=k: LoadedModel(_large_kernel_cnn(k), (3, args.size, args.size),
                                                                     {"kind": "module", "class": "cnn"}), 4)
             for k in (7, 9)]
    cases.append((args.model, lambda: load_model(args.model, num_classes=10, input_size=args.size), 3))
    for name, build, epochs in cases:
        torch.manual_seed(0)
        loaded = build()
        data = data_for("digits", loaded, seed=0)
        history = fit(loaded.model, data, TrainConfig(epochs=epochs, batch_size=args.batch_size, progress=False))
        small = apply(loaded, [f"rescale:factor={args.factor}"], measure=False)
        low = resized_data(data, small.input_size[1])
        rows.append({"model": name, "epochs": epochs, "full": history[-1]["val_top1"],
                     "rescaled": evaluate(small.model, low)["val_top1"],
                     "unchanged": evaluate(loaded.model, low)["val_top1"],
                     "notes": small.report["passes"][0]["notes"]})
        print(f"transfer {name}: {rows[-1]['full']:.3f} at full size, {rows[-1]['rescaled']:.3f} rescaled, "
              f"{rows[-1]['unchanged']:.3f} unchanged at the low size", flush=True)
    return rows


def training_flops(args: argparse.Namespace) -> dict[str, float]:
    """Forward FLOPs per image: full size, rescaled model at the low size, unchanged model at the low size."""
    from surgery.pipeline import apply
    from surgery.report import count_flops

    loaded = load_model(args.model, num_classes=10, input_size=args.size)
    small = apply(loaded, [f"rescale:factor={args.factor}"], measure=False)
    low = small.input_size[1]
    return {"full": count_flops(loaded.model, torch.randn(1, 3, args.size, args.size)),
            "rescaled": count_flops(small.model, torch.randn(1, 3, low, low)),
            "resize_only": count_flops(loaded.model, torch.randn(1, 3, low, low))}


def report(args: argparse.Namespace, results: dict[str, list[dict]], out: Path,
           transfer_rows: list[dict] | None = None) -> None:
    flops = training_flops(args)
    full_wall = statistics.mean(r["wall_s"] for r in results["full"])
    full_cpu = statistics.mean(r["cpu_s"] for r in results["full"])
    low = round(args.size * args.factor)

    def flops_ratio(name: str) -> float:
        """Training compute of a run relative to the full run: epochs x forward FLOPs (backward ~2x forward)."""
        if name == "full":
            return 1.0
        if name.startswith("full "):
            return int(name.split()[1]) / args.epochs
        switch = int(name.split("@")[1].split()[0])
        f_low = flops["resize_only" if name.startswith("resize-only") else "rescaled"]
        return (switch * f_low + (args.epochs - switch) * flops["full"]) / (args.epochs * flops["full"])

    lines = [f"`python benchmarks/rescale.py --model {args.model} --epochs {args.epochs} --size {args.size} "
             f"--factor {args.factor} --switch {' '.join(map(str, args.switch))} --reset "
             f"{' '.join(map(str, args.reset))} --resize-only {' '.join(map(str, args.resize_only))} "
             f"--short-full {' '.join(map(str, getattr(args, 'short_full', [])))} "
             f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
             + (f" --optimizer {args.optimizer}" if getattr(args, "optimizer", "sgd") != "sgd" else "")
             + (f" --lr {args.lr:g}" if getattr(args, "lr", None) else "") + "`",
             "", f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__.split('+')[0]}; "
             f"digits at {args.size}x{args.size} (low phase {low}x{low}), batch {args.batch_size}, "
             f"{getattr(args, 'optimizer', 'sgd').upper()}"
             + (f" lr {args.lr:g}" if getattr(args, "lr", None) else "") + ", "
             f"one cosine schedule over {args.epochs} epochs; mean over seeds {args.seeds}. "
             "CPU time is the training process's (time.process_time: training, evaluation and the switch); "
             "images/CPU-s counts training images over the CPU seconds of the phase's epochs. "
             "At switch: val top-1 at the end of the low phase (small images) -> of the grown model at full "
             "size before any full-size step. FLOPs: training compute relative to the full run, from the "
             f"forward FLOPs per image ({flops['full'] / 1e6:.1f} M at {args.size}x{args.size}, "
             f"{flops['rescaled'] / 1e6:.1f} M rescaled at {low}x{low}, {flops['resize_only'] / 1e6:.1f} M "
             "unchanged at the low size).", "",
             "| run | FLOPs vs full | CPU time (s) | vs full | wall time (s) | vs full | images/CPU-s low "
             "| images/CPU-s full | images/s (wall) low / full | switch (s) | at switch | val top-1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, rs in results.items():
        wall = statistics.mean(r["wall_s"] for r in rs)
        cpu = statistics.mean(r["cpu_s"] for r in rs)
        top1 = [r["val_top1"] for r in rs]

        def per_phase(key: str, rs=rs) -> list[str]:
            return [f"{statistics.mean(r['phases'][p][key] for r in rs):.0f}" if p in rs[0]["phases"] else "-"
                    for p in ("low", "full")]

        spread = f" ± {statistics.stdev(top1):.4f}" if len(top1) > 1 else ""
        at_switch = "-"
        if any(r["at_switch"] for r in rs):
            at_switch = (f"{statistics.mean(r['at_switch'][0] for r in rs):.3f} -> "
                         f"{statistics.mean(r['at_switch'][1] for r in rs):.3f}")
        cells = [name, f"{100 * (flops_ratio(name) - 1):+.0f}%", f"{cpu:.1f}", f"{100 * (cpu / full_cpu - 1):+.0f}%",
                 f"{wall:.1f}",
                 f"{100 * (wall / full_wall - 1):+.0f}%", *per_phase("images_per_cpu_s"),
                 " / ".join(per_phase("images_per_s")),
                 f"{statistics.mean(r['switch_s'] for r in rs):.1f}", at_switch,
                 f"{statistics.mean(top1):.4f}{spread} ({', '.join(f'{t:.4f}' for t in top1)})"]
        lines.append("| " + " | ".join(cells) + " |")
    if transfer_rows:
        low_t = round(args.size * args.factor)
        lines += ["", f"Transfer without training: trained at {args.size}x{args.size} (seed 0), then evaluated at "
                  f"{low_t}x{low_t} after `rescale:factor={args.factor}` (rescaled) or as it is (unchanged).", "",
                  f"| model | epochs | val top-1 at {args.size} | rescaled, at {low_t} | unchanged, at {low_t} "
                  "| what rescale changed |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {r['model']} | {r['epochs']} | {r['full']:.3f} | {r['rescaled']:.3f} | {r['unchanged']:.3f} "
                  f"| {r['notes'][0].split('; ', 1)[1]} |" for r in transfer_rows]
    text = "\n".join(lines)
    print(text)
    out.with_suffix(".md").write_text(text + "\n")
    plot(results, out.with_suffix(".png"), f"{args.model} on digits {args.size}x{args.size}, {args.epochs} epochs")
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, index, label in ((axes[0], 0, "wall time (s)"), (axes[1], 1, "CPU time of the training process (s)")):
        for k, (name, rs) in enumerate(results.items()):
            for i, r in enumerate(rs):
                t = [c[index] for c in r["curve"]]
                acc = [c[2] for c in r["curve"]]
                grays = ["dimgray", "darkgray", "silver"]
                color = ("black" if name == "full" else grays[sum(n.startswith("full ") for n in list(results)[:k]) % 3]
                         if name.startswith("full ") else colors[k % len(colors)])
                ax.plot(t, acc, "-" if i == 0 else ":", marker="o", markersize=3,
                        label=name if i == 0 else None, color=color)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1")
    axes[1].legend(loc="lower right")
    fig.suptitle(title + " (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
