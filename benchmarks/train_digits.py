"""Train resnet18 on the built-in digits set, fuse it, fine-tune it with distillation.

    python benchmarks/train_digits.py [--model resnet18] [--epochs 5] [--out runs/bench-digits]

Prints a markdown table (and writes it to benchmarks/results/train_digits.md): val top-1
after training, after `fuse` (must be identical), and after a distilled fine-tune, with
wall times. The issue's bar: >= 95% val top-1 in 5 epochs at 32x32 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

import surgery
from surgery.tasks import evaluate_model, finetune, train
from surgery.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-digits")
    ap.add_argument("--results", default="benchmarks/results/train_digits.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    out = Path(args.out)

    t0 = time.perf_counter()
    base = train(args.model, "digits", TrainConfig(epochs=args.epochs), out=out / "base", force=True)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    fused = surgery.apply(str(out / "base"), ["fuse"], measure=False)
    fused.save(out / "fused", force=True)
    fuse_s = time.perf_counter() - t0
    fused_metrics = evaluate_model(str(out / "fused"), "digits")

    tuned = finetune(fused.as_loaded(), "digits", TrainConfig(epochs=args.finetune_epochs, lr=1e-3, warmup_epochs=0.0),
                     teacher=str(out / "base"), out=out / "tuned", force=True)

    rows = [
        ("train", args.epochs, base.metrics["val_top1"], base.metrics["val_loss"], train_s),
        ("fuse (no training)", 0, fused_metrics["val_top1"], fused_metrics["val_loss"], fuse_s),
        ("finetune, distilled from base", args.finetune_epochs, tuned.metrics["val_top1"], tuned.metrics["val_loss"],
         tuned.seconds),
    ]
    lines = [f"`python benchmarks/train_digits.py --model {args.model} --epochs {args.epochs}` "
             f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})",
             "", "| step | epochs | val top-1 | val loss | wall time (s) |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {ep} | {top1:.4f} | {loss:.4f} | {sec:.0f} |" for name, ep, top1, loss, sec in rows]
    per_epoch = [round(h["images_per_s"]) for h in base.history]
    lines += ["", f"training images/s per epoch: {per_epoch}",
              f"fuse changed val top-1 by {fused_metrics['val_top1'] - base.metrics['val_top1']:+.4f} "
              f"and val loss by {fused_metrics['val_loss'] - base.metrics['val_loss']:+.2e}"]
    text = "\n".join(lines)
    print(text)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "images_per_s": per_epoch}, indent=1))


if __name__ == "__main__":
    main()
