"""Recovery (surgery.recover) on trained models: accuracy with no training, and after a 1-epoch fine-tune.

    .venv/bin/python benchmarks/recover.py [--parts prune bilinear ebcle] [--seeds 0 1 2] [--update-docs]

Three parts, each selectable; each rewrites its share of benchmarks/results/recover.{json,md}
and the plot recover.png (with --update-docs also the results section of docs/recover.md):

* prune: resnet18 trained 3 epochs on digits (``runs/r18``, trained when missing), pruned to
  0.5x FLOPs (uniform and global, l2), without and with ``recover=on`` (256 calibration
  images), and Torch-Pruning at the same FLOPs (its pruning ratio bisected; install it with
  ``.venv/bin/pip install torch-pruning``). Also the recovery time alone (median of 3 runs).
* bilinear: the dense ViT of benchmarks/bilinear.py (trained there and cached in
  ``runs/bench-bilinear``; trained here when missing), every Linear but the classifier
  rewritten at rank 1 (s1) and with scale 2 on the MLPs (s2), without and with the
  ``recover`` pass (1024 calibration images, 500 distillation steps per block).
* ebcle: resnet34 trained 3 epochs on digits (``runs/r34``), collapsed to the entropy rule's
  depth, without and with ``recover=on`` (256 calibration images).

Every variant is evaluated on the digits val split (359 images: one image is 0.28%) with no
training, then fine-tuned for one epoch (SGD, surgery's fine-tune lr, distilled from the
unrewritten model) once per seed; recovery itself is repeated per seed too (the seed
draws the calibration images). Tables give the mean and the range over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bilinear_layer import cpu_name  # noqa: E402

import surgery  # noqa: E402
from surgery.models import LoadedModel, load_model  # noqa: E402
from surgery.report import count_flops, count_params  # noqa: E402
from surgery.tasks import FINETUNE_LR, evaluate_model, finetune, train  # noqa: E402
from surgery.train import TrainConfig  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "recover.md"
RUNS = ROOT / "runs"
BEGIN, END = "<!-- recover-benchmark:begin -->", "<!-- recover-benchmark:end -->"
SUMMARY = re.compile(r"on (\d+) calibration images in ([0-9.]+) s")


def stamp() -> dict[str, Any]:
    return {"date": dt.date.today().isoformat(), "load_average": [round(v, 1) for v in os.getloadavg()]}


def recover_seconds(notes: list[str]) -> float | None:
    for n in notes:
        if n.startswith("recover:") and (m := SUMMARY.search(n)):
            return float(m.group(2))
    return None


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}


def tuned(loaded: LoadedModel, teacher: LoadedModel, seeds: list[int], lr: float, clip: float | None = None
          ) -> dict[str, Any]:
    """Val top-1 after one epoch of fine-tuning (SGD at ``lr``, distilled from the teacher), once per seed."""
    out = []
    for seed in seeds:
        cfg = TrainConfig(epochs=1, lr=lr, warmup_epochs=0.0, seed=seed, clip_grad=clip, progress=False)
        model = LoadedModel(copy.deepcopy(loaded.model), loaded.input_size, loaded.source, io=loaded.io)
        out.append(finetune(model, "digits", cfg, teacher=teacher).metrics["val_top1"])
    return spread(out)


def variant(name: str, build, teacher: LoadedModel, seeds: list[int], *, seeded: bool,
            lrs: tuple[float | tuple[float, float], ...] = (FINETUNE_LR,)) -> dict[str, Any]:
    """One row: ``build(seed) -> (LoadedModel, notes)``, evaluated, then fine-tuned per seed (at each lr).

    ``seeded``: the rewrite itself depends on the seed (recovery draws its calibration images)."""
    rows, times, fine = [], [], {lr: [] for lr in lrs}
    for seed in (seeds if seeded else seeds[:1]):
        t0 = time.perf_counter()
        loaded, notes = build(seed)
        seconds = time.perf_counter() - t0
        times.append(recover_seconds(notes))
        rows.append(evaluate_model(loaded, "digits")["val_top1"])
        for lr in lrs:  # a learning rate, or (learning rate, gradient clipping norm)
            fine[lr] += tuned(loaded, teacher, [seed] if seeded else seeds, *(lr if isinstance(lr, tuple) else (lr,))
                              )["values"]
        print(f"{name} seed {seed}: top-1 {rows[-1]:.4f} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    x1 = torch.zeros(1, *loaded.input_size)
    return {"variant": name, "params": count_params(loaded.model), "flops": count_flops(loaded.model, x1),
            "top1": spread(rows), "finetuned": {tune_name(lr): spread(v) for lr, v in fine.items()},
            "recover_seconds": spread([t for t in times if t is not None]) if any(times) else None}


def tune_name(lr: float | tuple[float, float]) -> str:
    return f"lr {lr[0]:g}, clip {lr[1]:g}" if isinstance(lr, tuple) else f"lr {lr:g}"


def trained(name: str, run: Path, epochs: int = 3) -> LoadedModel:
    if not (run / "recipe.json").is_file():
        train(name, "digits", TrainConfig(epochs=epochs), out=run, force=True)
    return load_model(str(run))


def applied(base: LoadedModel, passes: list[str]) -> tuple[LoadedModel, list[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = surgery.apply(base, passes, measure=False)
    notes = [n for r in res.report["passes"] for n in r["notes"]]
    return LoadedModel(res.model.eval(), base.input_size, base.source, io=base.io), notes


# --- parts -------------------------------------------------------------------------------------


def part_prune(args) -> dict[str, Any]:
    import timm
    from prune_vs_torch_pruning import tp_prune

    start = stamp()
    base = trained("resnet18", RUNS / "r18")
    x1 = torch.zeros(1, *base.input_size)
    base_flops = count_flops(base.model, x1)
    rows = [{"variant": "unpruned", "params": count_params(base.model), "flops": base_flops,
             "top1": spread([evaluate_model(base, "digits")["val_top1"]]), "finetuned": None, "recover_seconds": None}]

    def tp_at(global_pruning: bool) -> LoadedModel:
        def pruned(ratio: float) -> Any:
            m = timm.create_model("resnet18", num_classes=10)
            m.load_state_dict(base.model.state_dict())
            return tp_prune(m.eval(), x1, 10, ratio=ratio, global_pruning=global_pruning)

        lo, hi = 0.0, 0.95
        for _ in range(12):  # its pruning_ratio bisected until FLOPs <= 0.5x: it has no FLOPs target
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if count_flops(pruned(mid), x1) <= 0.5 * base_flops else (mid, hi)
        return LoadedModel(pruned(hi), base.input_size, {"kind": "module"}, io=base.io)

    for scope in ("uniform", "global"):
        spec = f"prune:flops=0.5,scope={scope},importance=l2"
        rows.append(variant(f"prune {scope}", lambda s, spec=spec: applied(base, [spec]), base, args.seeds,
                            seeded=False))
        rec = f"{spec},recover=on,data=digits,calib=256"
        rows.append(variant(f"prune {scope} + recover", lambda s, rec=rec: applied(base, [f"{rec},seed={s}"]), base,
                            args.seeds, seeded=True))
        rows.append(variant(f"Torch-Pruning {scope}", lambda s, g=scope == "global": (tp_at(g), []), base,
                            args.seeds, seeded=False))
    # The recovery alone, three times on the same 256 images (the note's own timer).
    times = [recover_seconds(applied(base, ["prune:flops=0.5,scope=uniform,recover=on,data=digits,calib=256"])[1])
             for _ in range(3)]
    return {"start": start, "end": stamp(), "rows": rows, "recover_times": times,
            "threads": torch.get_num_threads()}


def part_bilinear(args) -> dict[str, Any]:
    import bilinear as bench

    from surgery.models import preprocess

    start = stamp()
    bench.DATA = bench.data()
    ns = argparse.Namespace(depth=4, dim=128, patch=8, epochs=16, batch_size=16, lr=0.001, seed=0,
                            work=str(RUNS / "bench-bilinear"))
    io = {"preprocess": preprocess(bench.NORM, bench.NORM)}
    keep = "keep_classifier=true,min_features=16"
    # The ViT's attention projections cannot widen: scale 2 on its MLPs, then the rest at scale 1 (bilinear.md).
    chains = {"vit": {"s1": [f"bilinear:{keep}"], "s2": [f"bilinear:scale=2,skip=*.attn.*,{keep}", f"bilinear:{keep}"]},
              "mixer": {"s1": [f"bilinear:{keep}"], "s2": [f"bilinear:scale=2,{keep}"]}}
    rec = f"recover:data=digits,calib={args.vit_calib},steps={args.vit_steps}"
    # The default collapses these networks (docs/recover.md): also with gradient clipping, and at a tenth of it.
    lrs = (FINETUNE_LR, (FINETUNE_LR, 1.0), 1e-4)
    out: dict[str, Any] = {"start": start, "recover": rec, "threads": torch.get_num_threads()}
    for arch in args.archs:
        teacher = LoadedModel(bench.trained_teacher(ns, arch), (3, bench.SIZE, bench.SIZE), {"kind": "module"},
                              io=io)
        rows = [{"variant": f"{arch} dense", "params": count_params(teacher.model),
                 "flops": count_flops(teacher.model, torch.zeros(1, 3, bench.SIZE, bench.SIZE)),
                 "top1": spread([evaluate_model(teacher, "digits")["val_top1"]]), "finetuned": None,
                 "recover_seconds": None}]

        def build(passes: list[str], teacher=teacher):
            return lambda seed: applied(teacher, [p.replace("recover:", f"recover:seed={seed},") for p in passes])

        for name, chain in chains[arch].items():
            rows.append(variant(f"{arch} bilinear {name}", build(chain), teacher, args.seeds, seeded=False, lrs=lrs))
            rows.append(variant(f"{arch} bilinear {name} + recover", build(chain + [rec]), teacher, args.seeds,
                                seeded=True, lrs=lrs))
        out["rows" if arch == "vit" else f"rows_{arch}"] = rows
    out["end"] = stamp()
    return out


def part_ebcle(args) -> dict[str, Any]:
    start = stamp()
    base = trained("resnet34", RUNS / "r34")
    rows = [{"variant": "resnet34", "params": count_params(base.model),
             "flops": count_flops(base.model, torch.zeros(1, *base.input_size)),
             "top1": spread([evaluate_model(base, "digits")["val_top1"]]), "finetuned": None, "recover_seconds": None}]
    spec = "ebcle:data=digits"
    rows.append(variant("ebcle (entropy depth)", lambda s: applied(base, [spec]), base, args.seeds, seeded=False))
    rows.append(variant("ebcle + recover", lambda s: applied(base, [f"{spec},recover=on,calib=256,seed={s}"]), base,
                        args.seeds, seeded=True))
    notes = applied(base, [spec])[1]
    return {"start": start, "end": stamp(), "rows": rows, "depth": [n for n in notes if n.startswith("depth:")],
            "threads": torch.get_num_threads()}


# --- report ------------------------------------------------------------------------------------


def label(key: str) -> str:
    """A fine-tune's column name ("lr 0.001, clip 1"; results written before clipping: the lr alone)."""
    try:
        return f"lr {float(key):g}"
    except ValueError:
        return key


def fmt(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    if len(s["values"]) == 1:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} ({s['min']:.4f}-{s['max']:.4f})"


def table(rows: list[dict[str, Any]]) -> list[str]:
    base = rows[0]
    lrs = list(next((r["finetuned"] for r in rows if r["finetuned"]), {}))
    head = "".join(f" after 1 epoch, {label(lr)} |" for lr in lrs)
    lines = [f"| variant | params | FLOPs | vs first | val top-1, no training |{head} recovery (s) |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(lrs) + "---:|"]
    for r in rows:
        t = r.get("recover_seconds")
        tuned = "".join(f" {fmt((r['finetuned'] or {}).get(lr))} |" for lr in lrs)
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['flops'] / 1e6:.1f}M | "
                     f"{r['flops'] / base['flops']:.3f}x | {fmt(r['top1'])} |{tuned} "
                     f"{'-' if not t else format(t['mean'], '.2f')} |")
    return lines


def when(part: dict[str, Any]) -> str:
    return (f"seeds {', '.join(map(str, part.get('seeds', [])))}; {part['start']['date']}; load average "
            f"{part['start']['load_average']} at the start, {part['end']['load_average']} at the end")


def render(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    lines = [f"Measured on {m.get('cpu')}, {m.get('cpus')} logical CPUs shared with other work, torch "
             f"{m.get('torch')}. Val top-1 on digits (359 images; one image is 0.28%). Seeds (listed per part): "
             "a recovered row is recovered once per seed (the "
             "seed draws the calibration images) and fine-tuned with that seed; other rows are built once and "
             "fine-tuned once per seed. Mean (min-max) over the seeds. Fine-tune: 1 epoch, SGD, "
             f"lr {FINETUNE_LR} (surgery finetune's default; bilinear also with --clip-grad 1 and at 1e-4), distilled "
             "from the unrewritten "
             "model.", ""]
    if "prune" in results:
        p = results["prune"]
        times = ", ".join(f"{t:.2f}" for t in p["recover_times"] if t is not None)
        lines += [f"**prune** ({when(p)}): resnet18 trained 3 epochs on digits (`runs/r18`), "
                  "0.5x FLOPs, l2; `recover=on,data=digits,calib=256`; Torch-Pruning's ratio bisected to "
                  "<= 0.5x FLOPs.", "", *table(p["rows"]), "",
                  f"Recovery alone (the note's timer), three runs on the same 256 images: {times} s.", ""]
    if "bilinear" in results:
        b = results["bilinear"]
        lines += [f"**bilinear** ({when(b)}): the dense digits ViT of docs/bilinear.md, every Linear "
                  "but the classifier at rank 1 (s1), and with scale 2 on the MLPs (s2); recovery is the "
                  f"`{b['recover']}` pass after the chain.", "", *table(b["rows"]), ""]
        if b.get("rows_mixer"):
            lines += ["The MLP-Mixer of docs/bilinear.md, the same way (scale 2 in one pass: it has only MLPs).", "",
                      *table(b["rows_mixer"]), ""]
    if "ebcle" in results:
        e = results["ebcle"]
        lines += [f"**ebcle** ({when(e)}): resnet34 trained 3 epochs on digits (`runs/r34`), "
                  f"`ebcle:data=digits` ({'; '.join(e['depth'])}); `recover=on,calib=256`.", "",
                  *table(e["rows"]), ""]
    lines.append("Regenerate: `python benchmarks/recover.py --update-docs` (or `--parts prune` and so on).")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    from surgery.plots import _pyplot

    plt = _pyplot()
    panels = [(k, results[k][key]) for k, key in (("prune", "rows"), ("bilinear", "rows"), ("bilinear", "rows_mixer"),
                                                    ("ebcle", "rows")) if k in results and results[k].get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (part, all_rows) in zip(axes[0], panels):
        rows = all_rows[1:]
        names = [r["variant"].replace(" + recover", "\n+ recover") for r in rows]
        xs = range(len(rows))
        lrs = list(rows[0]["finetuned"])
        width = 0.8 / (1 + len(lrs))
        ax.bar([x - 0.4 + width / 2 for x in xs], [r["top1"]["mean"] for r in rows], width, label="no training",
               color="#7f7f7f")
        for i, (lr, color) in enumerate(zip(lrs, ["#1f77b4", "#ff7f0e", "#2ca02c"])):
            ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], [r["finetuned"][lr]["mean"] for r in rows], width,
                   label=f"1 epoch, {label(lr)}", color=color)
        first = all_rows[0]
        ax.axhline(first["top1"]["mean"], color="k", lw=0.8, ls="--", label=first["variant"])
        ax.set_xticks(list(xs), names, fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(part if part != "bilinear" else f"bilinear ({all_rows[0]['variant'].split()[0]})")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val top-1 (digits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["prune", "bilinear", "ebcle"]
    ap.add_argument("--parts", nargs="+", choices=parts, default=parts)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--vit-calib", type=int, default=1024)
    ap.add_argument("--vit-steps", type=int, default=500)
    ap.add_argument("--archs", nargs="+", choices=["vit", "mixer"], default=["vit", "mixer"],
                    help="bilinear part: the digits ViT and MLP-Mixer of docs/bilinear.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SURGERY_PROGRESS", "0")
    path = OUT / "recover.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"cpu": cpu_name(), "cpus": os.cpu_count(),
                          "torch": torch.__version__}
    for part in args.parts:
        # Merged into the part's earlier results: a run of one model (--archs mixer) keeps the other's rows.
        results[part] = {**results.get(part, {}),
                         **{"prune": part_prune, "bilinear": part_bilinear, "ebcle": part_ebcle}[part](args)}
        results[part]["seeds"] = args.seeds
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)
    text = render(results)
    (OUT / "recover.md").write_text(text + "\n")
    plot(results, OUT / "recover.png")
    if args.update_docs and DOC.is_file():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(text)


if __name__ == "__main__":
    main()
