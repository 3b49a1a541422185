"""Reproduction of the bilinear-projection paper (Yu et al., TNNLS 2021) on this project's CPU.

    python benchmarks/bilinear.py [--parts scratch kron resnet50] [--epochs 12] [--depth 4] [--dim 128]
                                  [--ft-epochs 3] [--threads 1] [--seed 0] [--update-docs]

Three parts, each selectable with --parts; each writes its results into
benchmarks/results/bilinear.json (other parts' results are kept) and the whole table is
rewritten into benchmarks/results/bilinear.md (and, with --update-docs, into the
"Reproduction" section of docs/bilinear.md):

* scratch: the paper's setting. A small ViT and an MLP-Mixer (32x32, patch 8) trained on
  `digits` from the same initial weights, dense and with every hidden Linear replaced by a
  random-init bilinear layer (`init=random`) at scale 1 and scale 2, same epochs and lr:
  params, FLOPs, CPU latency at batch 1 and 64, training time, val top-1.
* kron: the dense ViT from `scratch` (trained again if not cached in --work), rewritten
  with `init=kron-svd` at rank 1/2/4; val top-1 before and after a short fine-tune
  distilled from the dense model (surgery.tasks.finetune's defaults: SGD, lr 1e-3, no
  warm-up), with three controls at rank 1: random init and norm-matched kron-svd under the
  same fine-tune, and AdamW.
* resnet50: params and FLOPs (224x224) with `targets=linear`, `linear+conv1x1` and
  `linear+conv1x1+conv` (no training; random weights, so the approximation error means
  nothing here).

The classifier stays dense in the scratch and kron parts (keep_classifier=true): on 10
classes it is ~1% of the parameters, and a rank-1 Kronecker head (grid 2x5) is a bottleneck
we do not want to measure. Latency: one thread, all models of a part measured interleaved
round by round (median), so a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import surgery
from surgery.data import load_data
from surgery.report import count_flops, count_params
from surgery.tasks import FINETUNE_LR
from surgery.train import TrainConfig, evaluate, fit

log = logging.getLogger("bench")

PARTS = ("scratch", "kron", "resnet50")
NORM = (0.5, 0.5, 0.5)  # timm's ViT / Mixer normalisation
SIZE = 32
DOC = Path("docs/bilinear.md")
DOC_BEGIN, DOC_END = "<!-- bilinear-reproduction:begin -->", "<!-- bilinear-reproduction:end -->"
# Mixer token MLPs at patch 8 have 16 inputs: min_features=16 keeps them in (ViT layers are all >= 128).
KEEP = "keep_classifier=true,min_features=16"


# --- models -------------------------------------------------------------------------------------


def build(arch: str, depth: int, dim: int, patch: int, seed: int) -> nn.Module:
    """A small ViT or MLP-Mixer for 32x32 inputs ((32 / patch)^2 tokens), seeded."""
    import timm
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(seed)
    if arch == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=SIZE,
                                 patch_size=patch, embed_dim=dim, depth=depth, num_heads=max(1, dim // 32))
    # mixer_s16_224 fixes patch_size in its factory: build the class with the same defaults.
    return MlpMixer(num_classes=10, img_size=SIZE, patch_size=patch, embed_dim=dim, num_blocks=depth)


def scratch_passes(arch: str, scale: int) -> list[str]:
    """Pass specs of the from-scratch bilinear variant: all hidden Linear layers, random init."""
    if scale == 1:
        return [f"bilinear:init=random,{KEEP}"]
    if arch == "vit":
        # Attention projections feed a residual add or the attention op: scale cannot widen them,
        # so they are rewritten at scale 1 by a second pass.
        return [f"bilinear:init=random,scale={scale},skip=*.attn.*,{KEEP}", f"bilinear:init=random,{KEEP}"]
    return [f"bilinear:init=random,scale={scale},{KEEP}"]


def example() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def rewrite(model: nn.Module, passes: list[str]) -> tuple[nn.Module, list[dict[str, Any]]]:
    """surgery.apply on an nn.Module; returns the GraphModule and the pass records (plans, notes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = surgery.apply(model, passes, example_inputs=example(), measure=False)
    return res.model, res.report["passes"]


def layer_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    layers = [e for r in records if r["pass"] == "bilinear" for e in r["plan"].get("layers", [])]
    errors = [e["rel_error"] for e in layers if e.get("rel_error") is not None]
    return {"layers": len(layers), "params_before": sum(e["params_before"] for e in layers),
            "params_after": sum(e["params_after"] for e in layers),
            "rel_error_mean": statistics.mean(errors) if errors else None,
            "rel_error_max": max(errors) if errors else None,
            "notes": [n for r in records for n in r["notes"][:3]]}


def data() -> Any:
    return load_data("digits", image_size=SIZE, mean=NORM, std=NORM)


def train_run(name: str, model: nn.Module, cfg: TrainConfig, teacher: nn.Module | None = None) -> dict[str, Any]:
    """fit() with one progress bar over the run's epochs; wall and CPU time of the whole run."""
    bar = tqdm(total=cfg.epochs, desc=name, unit="epoch", dynamic_ncols=True, file=sys.stderr)

    def on_epoch(rec: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{rec['val_top1']:.3f}", s=f"{rec['seconds']:.0f}")

    t0, c0 = time.perf_counter(), time.process_time()
    history = fit(model, DATA, cfg, teacher=teacher, on_epoch=on_epoch)
    bar.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    log.info("%s: val top-1 %.4f in %.0f s", name, history[-1]["val_top1"], wall)
    return {"val_top1": history[-1]["val_top1"], "val_loss": history[-1]["val_loss"],
            "best_val_top1": max(h["val_top1"] for h in history), "train_wall_s": wall, "train_cpu_s": cpu,
            "curve": [round(h["val_top1"], 4) for h in history]}


# --- measurement ----------------------------------------------------------------------------------


def interleaved_latency(models: dict[str, nn.Module], input_size: tuple[int, ...], batch: int,
                        rounds: int) -> dict[str, float]:
    """Median ms of one forward per model, the models taking turns in every round."""
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(2):
                m(x)
        for _ in tqdm(range(rounds), desc=f"latency batch {batch}", leave=False, file=sys.stderr):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def stats(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    x = torch.randn(1, *input_size)
    return {"params": count_params(model), "flops": count_flops(model.eval(), x)}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0], "python": platform.python_version()}


def stamp() -> dict[str, Any]:
    return {"date": dt.date.today().isoformat(), "loadavg": [round(v, 1) for v in os.getloadavg()]}


# --- parts ------------------------------------------------------------------------------------------


def teacher_path(args, arch: str = "vit") -> Path:
    return Path(args.work) / (f"{arch}_d{args.depth}_w{args.dim}_p{args.patch}_e{args.epochs}_b{args.batch_size}"
                              f"_lr{args.lr}_s{args.seed}.pt")


def part_scratch(args) -> dict[str, Any]:
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, seed=args.seed,
                      progress=False)
    start = stamp()
    rows, models = [], {}
    for arch in args.archs:
        for variant, scale in (("dense", None), ("bilinear s1", 1), ("bilinear s2", 2)):
            name = f"{arch} {variant}"
            dense = build(arch, args.depth, args.dim, args.patch, args.seed)
            torch.manual_seed(args.seed + 1)  # the bilinear factors' random init
            if scale is None:
                model, summary, passes = surgery.trace(dense, example()), None, []
            else:
                passes = scratch_passes(arch, scale)
                model, records = rewrite(dense, passes)
                summary = layer_summary(records)
            row = {"arch": arch, "variant": variant, "passes": passes, **stats(model, (3, SIZE, SIZE))}
            if summary:
                row["rewritten"] = summary
            row.update(train_run(name, model, cfg))
            if arch == "vit" and scale is None:
                teacher_path(args).parent.mkdir(parents=True, exist_ok=True)
                torch.save(dense_state(model), teacher_path(args))
            rows.append(row)
            models[name] = model
    lat = {b: interleaved_latency(models, (3, SIZE, SIZE), b, r) for b, r in ((1, 100), (64, 15))}
    for row in rows:
        name = f"{row['arch']} {row['variant']}"
        row["latency_ms"] = {str(b): lat[b][name] for b in lat}
    return {"config": {"epochs": args.epochs, "optimizer": "adamw", "lr": args.lr, "batch_size": cfg.batch_size,
                       "depth": args.depth, "dim": args.dim, "seed": args.seed, "image_size": SIZE,
                       "patch": args.patch},
            "start": start, "end": stamp(), "rows": rows}


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_teacher(args, arch: str = "vit") -> nn.Module:
    """The dense model (ViT, or MLP-Mixer) of the scratch part: cached in --work, trained again when missing."""
    model = surgery.trace(build(arch, args.depth, args.dim, args.patch, args.seed), example())
    path = teacher_path(args, arch)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("dense %s from %s", arch, path)
        return model.eval()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=args.lr, seed=args.seed,
                      progress=False)
    train_run(f"{arch} dense (teacher)", model, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dense_state(model), path)
    return model.eval()


def part_kron(args) -> dict[str, Any]:
    start = stamp()
    teacher = trained_teacher(args)
    base = evaluate(teacher, DATA)
    rows = [{"variant": "dense (teacher)", "rank": None, "init": None, "finetune": None,
             **stats(teacher, (3, SIZE, SIZE)), "before": base["val_top1"], "after": None}]
    sgd = TrainConfig(epochs=args.ft_epochs, lr=FINETUNE_LR, warmup_epochs=0.0, seed=args.seed, progress=False)
    adamw = TrainConfig(epochs=args.ft_epochs, optimizer="adamw", lr=1e-3, warmup_epochs=0.0, seed=args.seed,
                        progress=False)
    runs = [(r, "kron-svd", sgd) for r in args.ranks] + [(1, "random", sgd), (1, "kron-svd norm-matched", sgd),
                                                        (1, "kron-svd", adamw)]
    for rank, init, cfg in runs:
        torch.manual_seed(args.seed + 1)
        model, records = rewrite(teacher, [f"bilinear:rank={rank},init={init.split()[0]},{KEEP}"])
        if init.endswith("norm-matched"):
            match_norms(model, teacher)
        summary = layer_summary(records)
        before = evaluate(model, DATA)["val_top1"]
        ft = f"{cfg.optimizer} lr {cfg.resolved_lr():g}, {cfg.epochs} ep, distilled"
        name = f"rank {rank} {init} + {cfg.optimizer}"
        res = train_run(name, model, cfg, teacher=copy.deepcopy(teacher))
        rows.append({"variant": name, "rank": rank, "init": init, "finetune": ft, **stats(model, (3, SIZE, SIZE)),
                     "rewritten": summary, "before": before, "after": res["val_top1"], "train": res})
    return {"config": {"teacher_epochs": args.epochs, "ft_epochs": args.ft_epochs, "depth": args.depth,
                       "dim": args.dim, "seed": args.seed, "distill_weight": sgd.distill_weight,
                       "distill_temperature": sgd.distill_temperature},
            "start": start, "end": stamp(), "rows": rows}


@torch.no_grad()
def match_norms(model: nn.Module, dense: nn.Module) -> None:
    """Scale each bilinear layer's factors so that its weight keeps the dense weight's Frobenius norm.

    A control, not a pass option: kron-svd keeps only the leading Kronecker component, so on
    unstructured weights it also shrinks them (to sqrt(1 - err^2) of their norm).
    """
    from surgery.nn.bilinear import BilinearProjection

    weights = dict(dense.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, BilinearProjection):
            k = (weights[name].weight.norm() / m.to_dense_weight().norm()).sqrt()
            m.U.mul_(k)
            m.V.mul_(k)


def part_resnet50(args) -> dict[str, Any]:
    start = stamp()
    size = (3, 224, 224)
    loaded = surgery.load_model("resnet50")
    rows = [{"targets": None, **stats(loaded.model, size), "pass_s": 0.0}]
    models = {"dense": surgery.trace(loaded.model, torch.randn(1, *size))}
    for targets in ("linear", "linear+conv1x1", "linear+conv1x1+conv"):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = surgery.apply(loaded, [f"bilinear:targets={targets}"], measure=False)
        seconds = time.perf_counter() - t
        summary = layer_summary(res.report["passes"])
        rows.append({"targets": targets, **stats(res.model, size), "pass_s": seconds, "rewritten": summary})
        models[targets] = res.model
        log.info("resnet50 targets=%s: %s", targets, summary["notes"][0])
    lat = interleaved_latency(models, size, 1, args.r50_rounds)
    for row in rows:
        row["latency_ms"] = {"1": lat[row["targets"] or "dense"]}
    return {"config": {"input_size": list(size), "init": "kron-svd (default; random weights)"},
            "start": start, "end": stamp(), "rows": rows}


# --- tables -------------------------------------------------------------------------------------------


def _n(v: float) -> str:
    from surgery.report import human_count

    return human_count(v)


def _x(dense: float, other: float) -> str:
    return f"{dense / other:.2f}x" if other else "-"


def _when(p: dict[str, Any]) -> str:
    a, b = p["start"]["loadavg"], p["end"]["loadavg"]
    return (f"{p['end']['date']}; load average {' / '.join(map(str, a))} at the start, "
            f"{' / '.join(map(str, b))} at the end")


def command(p: dict[str, Any], part: str, argv: str) -> str:
    return f"`python benchmarks/bilinear.py --parts {part}{argv} --update-docs`"


def table_scratch(p: dict[str, Any]) -> list[str]:
    c = p["config"]
    out = [f"**From scratch** ({_when(p)}): depth {c['depth']}, width {c['dim']}, "
           f"{c['image_size']}x{c['image_size']} input, patch {c['patch']} ({(c['image_size'] // c['patch']) ** 2} "
           f"tokens); AdamW lr {c['lr']:g}, "
           f"batch {c['batch_size']}, {c['epochs']} epochs, cosine schedule, seed {c['seed']}, the same initial "
           "weights for the three variants of a model. Latency: ms per forward, median of interleaved rounds "
           "(100 at batch 1, 15 at batch 64). `vs dense`: dense / bilinear (above 1: bilinear is better).",
           "", "| model | variant | params | FLOPs | latency b1 (ms) | vs dense | latency b64 (ms) | vs dense "
           "| train time (s) | val top-1 | vs dense |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    dense = {}
    for r in p["rows"]:
        d = dense.setdefault(r["arch"], r)
        l1, l64 = r["latency_ms"]["1"], r["latency_ms"]["64"]
        out.append(f"| {r['arch']} | {r['variant']} | {r['params']:,} | {_n(r['flops'])} | {l1:.2f} | "
                   f"{_x(d['latency_ms']['1'], l1)} | {l64:.1f} | {_x(d['latency_ms']['64'], l64)} | "
                   f"{r['train_wall_s']:.0f} | {r['val_top1']:.4f} | {r['val_top1'] - d['val_top1']:+.4f} |")
    out += ["", "Passes: " + "; ".join(f"{r['arch']} {r['variant']}: `{' -> '.join(r['passes'])}` "
                                         f"({r['rewritten']['layers']} layers, {r['rewritten']['params_before']:,} "
                                         f"-> {r['rewritten']['params_after']:,} params)"
                                         for r in p["rows"] if r.get("rewritten"))]
    out += ["", "Val top-1 per epoch: " + "; ".join(f"{r['arch']} {r['variant']}: {r['curve']}" for r in p["rows"])]
    return out


def table_kron(p: dict[str, Any]) -> list[str]:
    c = p["config"]
    out = [f"**From trained weights** ({_when(p)}): the dense ViT of the first table (depth {c['depth']}, width "
           f"{c['dim']}, {c['teacher_epochs']} epochs) rewritten with `bilinear:rank=R,init=INIT,{KEEP}`, then "
           f"fine-tuned {c['ft_epochs']} epochs distilled from it (weight {c['distill_weight']}, temperature "
           f"{c['distill_temperature']:g}; SGD lr {FINETUNE_LR:g} without warm-up is `surgery finetune`'s default). "
           "Rel. error: mean ||W - W_hat|| / ||W|| over the rewritten layers. Controls: `random` is "
           "`init=random`; `norm-matched` rescales the kron-svd factors so that each layer keeps the dense "
           "weight's Frobenius norm (done in this script, not a pass option).",
           "", "| variant | params | FLOPs | rel. error | val top-1 before | after fine-tune | fine-tune | time (s) |",
           "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in p["rows"]:
        err = r.get("rewritten", {}).get("rel_error_mean")
        after = f"{r['after']:.4f}" if r["after"] is not None else "-"
        secs = f"{r['train']['train_wall_s']:.0f}" if r.get("train") else "-"
        out.append(f"| {r['variant']} | {r['params']:,} | {_n(r['flops'])} | {f'{err:.3f}' if err is not None else '-'}"
                   f" | {r['before']:.4f} | {after} | {r['finetune'] or '-'} | {secs} |")
    return out


def table_resnet50(p: dict[str, Any]) -> list[str]:
    out = [f"**resnet50** ({_when(p)}): 224x224, 1000 classes, random weights, default options otherwise "
           "(`init=kron-svd`, rank 1, `min_features=64`, classifier rewritten). Latency: batch 1, median of "
           "interleaved rounds.",
           "", "| targets | layers rewritten | params | vs dense | FLOPs | vs dense | latency b1 (ms) | vs dense "
           "| pass time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    d = p["rows"][0]
    for r in p["rows"]:
        layers = r.get("rewritten", {}).get("layers", 0)
        lat, dl = r["latency_ms"]["1"], d["latency_ms"]["1"]
        out.append(f"| {r['targets'] or 'dense'} | {layers} | {r['params']:,} | {r['params'] / d['params']:.1%} | "
                   f"{_n(r['flops'])} | {r['flops'] / d['flops']:.1%} | {lat:.0f} | {_x(dl, lat)} | "
                   f"{r['pass_s']:.1f} |")
    notes = [n for r in p["rows"] for n in r.get("rewritten", {}).get("notes", [])[:1]]
    out += ["", "Pass summaries: " + " / ".join(f"`{n}`" for n in notes)]
    return out


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [f"Measured on {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs shared with other work, "
             f"{m.get('threads')} torch thread(s); torch {m.get('torch')}, Python {m.get('python')}. "
             "Data: `digits` (scikit-learn, 1,438 train / 359 val images upscaled to 32x32; one val image is "
             "0.28%, and a single seed is run: differences under about 1.5 points are noise).", ""]
    argv = results.get("argv", {})
    for part, fn in (("scratch", table_scratch), ("kron", table_kron), ("resnet50", table_resnet50)):
        if part in results:
            lines += fn(results[part])
            lines += ["", "Regenerate: " + command(results[part], part, argv.get(part, "")), ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Val top-1 per epoch of the from-scratch runs (left) and of the kron fine-tunes (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"dense": "-", "bilinear s1": "--", "bilinear s2": ":"}
    for r in results.get("scratch", {}).get("rows", []):
        axes[0].plot(range(1, len(r["curve"]) + 1), r["curve"], styles[r["variant"]],
                     color="C0" if r["arch"] == "vit" else "C1", label=f"{r['arch']} {r['variant']}")
    axes[0].set(title="from scratch (digits, 32x32)", xlabel="epoch", ylabel="val top-1")
    for i, r in enumerate(results.get("kron", {}).get("rows", [])):
        if r.get("train"):
            axes[1].plot(range(0, len(r["train"]["curve"]) + 1), [r["before"], *r["train"]["curve"]], "o-",
                         color=f"C{i}", label=r["variant"])
        else:
            axes[1].axhline(r["before"], color="k", lw=0.8, label=r["variant"])
    axes[1].set(title="kron-svd from the trained dense ViT, distilled fine-tune", xlabel="fine-tune epoch",
                ylabel="val top-1")
    for ax in axes:
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_docs(text: str) -> None:
    doc = DOC.read_text()
    block = f"{DOC_BEGIN}\n{text}{DOC_END}"
    if DOC_BEGIN not in doc:
        raise SystemExit(f"{DOC} has no {DOC_BEGIN} marker: add it to the Reproduction section first")
    doc = re.sub(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), lambda _: block, doc, flags=re.S)
    DOC.write_text(doc)


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--archs", nargs="+", choices=("vit", "mixer"), default=["vit", "mixer"])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--patch", type=int, default=8,
                    help="patch size (8: 16 tokens; patch 4 ran 2.5x slower here for the same accuracy per epoch)")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16,
                    help="from-scratch batch (16: 90 steps an epoch; at 64 the ViT reached 47%% in 11 epochs)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of the from-scratch runs")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--r50-rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench-bilinear", help="cache of the trained dense ViT")
    ap.add_argument("--results", default="benchmarks/results/bilinear")
    ap.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {DOC}")
    ap.add_argument("--report-only", action="store_true", help="rewrite the tables from RESULTS.json only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    logging.getLogger("surgery").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    json_path, md_path = Path(args.results + ".json"), Path(args.results + ".md")
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if not args.report_only:
        global DATA
        DATA = data()
        results["machine"] = machine()
        shared = (f" --depth {args.depth} --dim {args.dim} --patch {args.patch} --epochs {args.epochs} "
                  f"--batch-size {args.batch_size} --lr {args.lr:g} --seed {args.seed}")
        argv = {"scratch": f"{shared} --archs {' '.join(args.archs)}",
                "kron": f"{shared} --ft-epochs {args.ft_epochs} --ranks {' '.join(map(str, args.ranks))}",
                "resnet50": f" --r50-rounds {args.r50_rounds}"}
        if args.threads != 1:
            argv = {k: v + f" --threads {args.threads}" for k, v in argv.items()}
        for part in args.parts:
            results[part] = {"scratch": part_scratch, "kron": part_kron, "resnet50": part_resnet50}[part](args)
            results.setdefault("argv", {})[part] = argv[part]
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(results, indent=1))  # after each part: a later crash keeps it
    text = render(results)
    md_path.write_text(text)
    if "scratch" in results or "kron" in results:
        plot(results, md_path.with_suffix(".png"))
    print(text)
    if args.update_docs:
        update_docs(text)


DATA: Any = None

if __name__ == "__main__":
    main()
