"""EBCLE on `digits`: a depth sweep of a ResNet trained with one budget, and the bound checked.

    OMP_NUM_THREADS=1 python benchmarks/ebcle.py                 # resnet34 at 16x16, 6 epochs, ~20 min on 1 core
    python benchmarks/ebcle.py --model resnet18 --size 32 --epochs 3 --seeds 1   # quicker

For every depth from one block per stage to all (``ebcle:keep=...,select=position`` on the
untrained model: the same initial weights, the last blocks of each stage collapsed), train
from scratch with the same recipe (surgery.train.fit, TrainConfig defaults, same epochs,
same seed) and record val top-1 and the training wall time. The depth the pass picks from
the data set's entropy (the EBCLE bound) is marked. The full and the EBCLE models are then
trained again with ``--seeds`` extra seeds (interleaved, so that load on the machine hits
both alike) to compare training time and accuracy: the paper claims 25-79% less training
time at the same accuracy. Last, the trained full model's blocks are scored by how close
they are to the identity (||f(x)|| / ||x|| on 64 training images), the paper's mechanism.

Writes benchmarks/results/ebcle.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import surgery
from surgery.blocks import find_structure, identity_scores
from surgery.data import load_calibration, load_data
from surgery.entropy import MAX_NATS, dataset_entropy
from surgery.passes.ebcle import spread
from surgery.report import count_flops, count_params
from surgery.train import TrainConfig, fit

RESULTS = Path(__file__).resolve().parent / "results"


def build(model: str, size: int, keep: list[int], seed: int, classes: int = 10) -> torch.fx.GraphModule:
    """The model at ``keep`` blocks per stage (the last ones of each stage go), from seeded initial weights."""
    torch.manual_seed(seed)
    loaded = surgery.load_model(model, num_classes=classes, input_size=f"3x{size}x{size}")
    spec = "ebcle:select=position,keep=" + "+".join(map(str, keep))
    return surgery.apply(loaded, [spec], measure=False).model


def find_counts(loaded, size: int) -> list[int]:
    gm = surgery.trace(loaded.model, torch.randn(1, 3, size, size))
    return find_structure(gm).counts


def train_one(gm: torch.nn.Module, data, epochs: int, seed: int) -> dict:
    cfg = TrainConfig(epochs=epochs, seed=seed, progress=False)
    t0 = time.perf_counter()
    history = fit(gm, data, cfg)
    wall = time.perf_counter() - t0
    last = history[-1]
    return {"val_top1": last["val_top1"], "val_loss": last["val_loss"], "train_s": wall,
            "train_epoch_s": sum(h["seconds"] for h in history),
            "images_per_s": statistics.median(h["images_per_s"] for h in history)}


def plot(rows: list[dict], bound: int, total: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = [r["blocks"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    ax.plot(depths, [100 * r["val_top1"] for r in rows], "o-", color="#4c72b0", label="val top-1 (%)")
    ax.set_xlabel(f"residual blocks kept (of {total})")
    ax.set_ylabel("val top-1 (%)", color="#4c72b0")
    ax2 = ax.twinx()
    ax2.plot(depths, [r["train_s"] for r in rows], "s--", color="#dd8452", label="training wall time (s)")
    ax2.set_ylabel("training wall time (s)", color="#dd8452")
    ax2.set_ylim(bottom=0)
    ax.axvline(bound, color="#c44e52", linestyle=":", label=f"EBCLE bound ({bound} blocks)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet34")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2, help="extra seeds for the full vs EBCLE comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--data", default="digits", help="digits or an ImageFolder (python -m surgery.photos builds one)")
    ap.add_argument("--name", default="ebcle", help="results file stem in --out")
    ap.add_argument("--plot-only", action="store_true", help="draw NAME.png from NAME.json in --out")
    args = ap.parse_args()
    if args.plot_only:
        return plot_only(args.out, args.name)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    stats = dataset_entropy(args.data)
    data = load_data(args.data, image_size=args.size)
    label = "digits" if args.data == "digits" else Path(args.data).name
    classes = data.num_classes
    probe = surgery.load_model(args.model, num_classes=classes, input_size=f"3x{args.size}x{args.size}")
    counts = find_counts(probe, args.size)
    total = sum(counts)
    ebcle_run = surgery.apply(probe, [f"ebcle:entropy={stats.mean},select=position"], measure=False)
    plan = ebcle_run.recipe["passes"][-1]["plan"]
    bound, bound_keep = plan["bound"], plan["keep"]
    print(f"{label} entropy {stats.mean:.4f} nats -> EBCLE bound {bound} of {total} blocks, keep {bound_keep}")

    depths = sorted({len(counts), bound, total} | set(range(len(counts), total + 1, 2)))
    rows = []
    x = torch.randn(1, 3, args.size, args.size)
    for n in depths:
        keep = spread(counts, n)
        gm = build(args.model, args.size, keep, seed=0, classes=classes)
        row = {"blocks": n, "keep": keep, "params": count_params(gm), "flops": count_flops(gm, x),
               **train_one(gm, data, args.epochs, seed=0)}
        rows.append(row)
        print(f"blocks {n:2d} keep {'+'.join(map(str, keep)):>9}  val top-1 {row['val_top1']:.4f}  "
              f"train {row['train_s']:.0f} s  ({row['images_per_s']:.0f} img/s)", flush=True)
        if n == total:
            full_trained = gm

    # The trained full model: how close to the identity is each block (the paper's mechanism)?
    calib = load_calibration(args.data, x.expand(2, -1, -1, -1), 64, seed=0)
    full_trained.to(x.device)
    full_trained.eval()
    scores = identity_scores(full_trained, find_structure(full_trained),
                             [b[0] for b in calib.batches])
    blocks_scores = {k: round(v["branch"], 4) for k, v in scores.items()}

    # Full vs EBCLE, repeated with other seeds, interleaved.
    pairs = {"full": [r for r in rows if r["blocks"] == total][:1],
             "ebcle": [r for r in rows if r["blocks"] == bound][:1]}
    for seed in range(1, args.seeds + 1):
        for name, keep in (("full", counts), ("ebcle", bound_keep)):
            gm = build(args.model, args.size, keep, seed=seed, classes=classes)
            pairs[name].append({"seed": seed, **train_one(gm, data, args.epochs, seed=seed)})
            print(f"{name} seed {seed}: val top-1 {pairs[name][-1]['val_top1']:.4f}  "
                  f"train {pairs[name][-1]['train_s']:.0f} s", flush=True)
    summary = {}
    for name, runs in pairs.items():
        summary[name] = {"val_top1": [r["val_top1"] for r in runs], "train_s": [r["train_s"] for r in runs],
                         "mean_val_top1": statistics.mean(r["val_top1"] for r in runs),
                         "mean_train_s": statistics.mean(r["train_s"] for r in runs)}
    reduction = 1 - summary["ebcle"]["mean_train_s"] / summary["full"]["mean_train_s"]
    acc_diff = summary["ebcle"]["mean_val_top1"] - summary["full"]["mean_val_top1"]
    row_full = next(r for r in rows if r["blocks"] == total)
    row_bound = next(r for r in rows if r["blocks"] == bound)
    flops_reduction = 1 - row_bound["flops"] / row_full["flops"]

    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.model} on {label} {args.size}x{args.size}, {args.epochs} epochs each; "
             f"entropy {stats.mean:.2f} nats")
    cmd = (f"OMP_NUM_THREADS={args.threads} python benchmarks/ebcle.py --model {args.model} --size {args.size} "
           f"--epochs {args.epochs} --seeds {args.seeds}"
           + (f" --data {args.data} --name {args.name}" if args.data != "digits" else ""))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{args.threads} CPU thread(s)"
    lines = [
        f"`{cmd}` ({platform.machine()}, {device}, torch {torch.__version__}; "
        f"{(time.perf_counter() - t_start) / 60:.0f} min; wall times are noisy, FLOPs are exact)", "",
        f"{label} entropy: {stats.mean:.4f} nats (max ln 256 = {MAX_NATS:.3f}); rule `linear` -> keep "
        f"{bound} of {total} blocks ({'+'.join(map(str, bound_keep))} of {'+'.join(map(str, counts))}).", "",
        "| blocks kept | per stage | params | FLOPs / image | val top-1 | training wall time (s) | images/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mark = " **(EBCLE bound)**" if r["blocks"] == bound else (" (full)" if r["blocks"] == total else "")
        lines.append(f"| {r['blocks']}{mark} | {'+'.join(map(str, r['keep']))} | {r['params'] / 1e6:.2f}M | "
                     f"{r['flops'] / 1e6:.1f}M | {r['val_top1']:.4f} | {r['train_s']:.0f} | "
                     f"{r['images_per_s']:.0f} |")
    n_runs = len(pairs["full"])
    lines += [
        "", f"Full vs EBCLE model, {n_runs} seed(s) each (seed 0 from the sweep, then interleaved runs):", "",
        "| model | val top-1 per seed | mean val top-1 | training time per seed (s) | mean (s) |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for name in ("full", "ebcle"):
        s = summary[name]
        lines.append(f"| {name} | {', '.join(f'{v:.4f}' for v in s['val_top1'])} | {s['mean_val_top1']:.4f} | "
                     f"{', '.join(f'{v:.0f}' for v in s['train_s'])} | {s['mean_train_s']:.0f} |")
    verdict = "inside" if 0.25 <= reduction <= 0.79 else ("above" if reduction > 0.79 else "below")
    lines += [
        "",
        f"Training time reduction of the EBCLE model: **{reduction:.1%}** measured (FLOPs per image "
        f"-{flops_reduction:.1%}), {verdict} the paper's 25-79% range; val top-1 difference "
        f"**{acc_diff:+.4f}** (EBCLE - full).",
        "",
        "Identity scores ||f(x)|| / ||x|| of the trained full model's blocks (64 training images; low = "
        "near-identity, heads not listed):", "",
        ", ".join(f"{k} {v:.3f}" for k, v in blocks_scores.items()),
    ]
    text = "\n".join(lines)
    print(text)
    (args.out / f"{args.name}.md").write_text(text + "\n")
    (args.out / f"{args.name}.json").write_text(json.dumps({
        "command": cmd, "model": args.model, "size": args.size, "epochs": args.epochs,
        "entropy": stats.to_dict(), "counts": counts, "bound": bound, "bound_keep": bound_keep,
        "sweep": rows, "pairs": pairs, "summary": summary, "train_time_reduction": reduction,
        "flops_reduction": flops_reduction, "val_top1_difference": acc_diff, "identity_scores": blocks_scores,
        "title": title,
    }, indent=1) + "\n")
    try:  # last: a machine without matplotlib (a GPU box) still writes the numbers; --plot-only draws later
        plot(rows, bound, total, args.out / f"{args.name}.png", title)
    except ImportError as exc:
        print(f"no plot: {exc}; draw it with --plot-only")


def plot_only(out: Path, name: str) -> None:
    saved = json.loads((out / f"{name}.json").read_text())
    plot(saved["sweep"], saved["bound"], sum(saved["counts"]), out / f"{name}.png", saved["title"])


if __name__ == "__main__":
    main()
