"""`prune` side by side with Torch-Pruning (DepGraph), on the same models at the same settings.

Torch-Pruning is a benchmark-only tool, never a dependency of surgery. Install it with

    .venv/bin/pip install torch-pruning

Two parts (both by default; results in benchmarks/results/prune_vs_torch_pruning.{json,md}):

    .venv/bin/python benchmarks/prune_vs_torch_pruning.py --part models    # success rate over timm families
    .venv/bin/python benchmarks/prune_vs_torch_pruning.py --part digits    # accuracy of a trained resnet18

**models**: the representatives of ``benchmarks/timm_families.json`` (the coverage list)
with at most ``--max-params`` parameters and inputs up to 256 px (or ``--models``), each in
its own subprocess under ``--timeout``. Both tools prune the same randomly initialised
model (seed 0, built once, copied) at ``--ratio`` of the channels, the same fraction in
every group/layer (our ``scope=uniform``, Torch-Pruning's ``global_pruning=False``), with l2
magnitude importance (``importance=l2``; ``GroupMagnitudeImportance(p=2)``), kept counts
rounded to multiples of 8 (``round_to=8`` for both). Torch-Pruning is set up as in its own
timm script (examples/timm_models/prune_timm_models.py): classifier ignored, ``num_heads``
given for every attention module with a ``qkv`` layer and written back after pruning,
``TIMM_FUSED_ATTN=0`` (both tools see that same model). Success: forward works, output
shape kept, finite output; for ours also ONNX export with parity and a save +
``surgery.load`` that reproduces the output (Torch-Pruning saves pruned models with pickle
only). Also measured: pass time (ours: trace + pass; Torch-Pruning: dependency graph +
step), FLOPs and parameters (both counted by ``surgery.report.count_flops``), and batch-1
CPU latency of original, ours and Torch-Pruning's, timed interleaved.

**digits**: resnet18 trained on ``digits`` (cached in ``runs/r18``; trained for 3 epochs
when missing), pruned to 0.5x FLOPs (ours: ``flops=0.5``; Torch-Pruning: its
``pruning_ratio`` bisected until the FLOPs are <= 0.5x), uniform and global, l2: val top-1
with no training (ours with and without ``recover=on``), then after the same short
fine-tune (``--finetune-epochs``, surgery.tasks.finetune defaults otherwise).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results"
FAMILIES = ROOT / "benchmarks" / "timm_families.json"
RESULT = "prune_vs_torch_pruning"
SEED = 0
BATCH = 2
ROUND_TO = 8
LATENCY_RUNS = 7
ONNX_BATCHES = (1, 4)
RELOAD_RTOL = 1e-5
DIGITS_RUN = ROOT / "runs" / "r18"
REASON_LEN = 160


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason if len(reason) <= REASON_LEN else reason[: REASON_LEN - 3] + "..."


def require_torch_pruning() -> Any:
    try:
        import torch_pruning as tp
    except ImportError:
        sys.exit("Torch-Pruning is not installed; run: .venv/bin/pip install torch-pruning")
    return tp


def n_params(model: Any) -> int:
    from surgery.report import count_params

    return count_params(model)


def flops_of(model: Any, x: Any) -> int | None:
    """surgery.report.count_flops without autograd: its module tracker asserts on some models
    (pit: a parameter that requires grad passed straight into a submodule)."""
    import torch

    from surgery.report import count_flops

    try:
        with torch.no_grad():
            return count_flops(model, x)
    except Exception:  # noqa: BLE001 - a counter failure must not fail the tools
        return None


def tensors(out: Any) -> list[Any]:
    from surgery.graph import output_tensors

    return output_tensors(out)


def same_shapes(ref: Any, out: Any) -> str | None:
    """Failure reason when ``out`` does not have the reference's shapes or is not finite."""
    import torch

    a, b = [tuple(t.shape) for t in tensors(ref)], [tuple(t.shape) for t in tensors(out)]
    if a != b:
        return f"output shapes {b} instead of {a}"
    if not all(bool(torch.isfinite(t).all()) for t in tensors(out) if t.is_floating_point()):
        return "output is not finite"
    return None


class Alarm(Exception):
    pass


def with_alarm(seconds: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run fn under SIGALRM: Torch-Pruning can loop for a very long time on some models."""

    def handler(signum, frame):  # noqa: ARG001
        raise Alarm(f"did not finish in {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- Torch-Pruning, set up as its timm script does -------------------------------------------


def tp_prune(model: Any, example: Any, num_classes: int | None, *, ratio: float | None = None,
             global_pruning: bool = False, ratio_dict: dict | None = None) -> Any:
    """Prune ``model`` in place with Torch-Pruning (l2 group magnitude, classifier ignored)."""
    import torch.nn as nn

    tp = require_torch_pruning()
    ignored, num_heads = [], {}
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module) and any(True for _ in classifier.parameters()):
        ignored.append(classifier)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            ignored.append(m)
        elif isinstance(m, nn.Conv2d) and m.out_channels == num_classes:
            ignored.append(m)
        if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear):
            num_heads[m.qkv] = m.num_heads
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=global_pruning,
        pruning_ratio=ratio if ratio is not None else 0.0, ignored_layers=ignored, num_heads=num_heads,
        round_to=ROUND_TO, iterative_steps=1)
    pruner.step()
    for m in model.modules():  # what its timm script does after pruning
        if hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv in num_heads:
            m.num_heads = num_heads[m.qkv]
            if hasattr(m, "head_dim"):
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    return model


# --- one model (worker) ------------------------------------------------------------------------


def interleaved_ms(fns: list[Any], x: Any, runs: int) -> list[float]:
    """Median batch-1 latency of each model, the models run in turn so load hits all alike."""
    import torch

    times: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for f in fns:
            f(x)
        for _ in range(runs):
            for f, t in zip(fns, times):
                start = time.perf_counter()
                f(x)
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def run_worker(name: str, result_path: Path, ratio: float, threads: int, tp_timeout: int, light: bool = False) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(threads)
    import surgery
    from surgery.graph import compare_outputs
    from surgery.pipeline import example_batch

    rec: dict[str, Any] = {"model": name, "ours": {}, "tp": {}}

    def flush() -> None:
        result_path.write_text(json.dumps(rec, default=str))

    torch.manual_seed(SEED)
    loaded = surgery.load_model(name)
    model = loaded.model.eval()
    size = tuple(loaded.input_size)
    rec["input_size"] = list(size)
    x = example_batch(size, BATCH)
    x_check = example_batch(size, BATCH, seed=1)
    x1 = x_check[:1]
    with torch.no_grad():
        ref = model(x_check)
    rec["flops"] = flops_of(model, x1)
    rec["params"] = n_params(model)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and isinstance(ref, torch.Tensor) and ref.dim() == 2:
        num_classes = ref.shape[-1]  # torchvision models: the classifier is the layer that makes the logits
    pristine = copy.deepcopy(model)
    flush()

    # ours: trace + prune, then forward / shapes
    ours = rec["ours"]
    ours_model = None
    ours_result = None
    try:
        t0 = time.perf_counter()
        ours_result = surgery.apply(loaded, [f"prune:ratio={ratio},scope=uniform,importance=l2,round_to={ROUND_TO}"],
                                    example_inputs=x, measure=False)
        ours["seconds"] = round(time.perf_counter() - t0, 3)
        note = next((n for r in ours_result.report["passes"] for n in r["notes"] if n.startswith("pruned ")), "")
        ours["pass_seconds"] = float(note.rsplit(" in ", 1)[1].split()[0]) if " in " in note else None
        ours_model = ours_result.model.eval()
        with torch.no_grad():
            out = ours_model(x_check)
        ours["forward"] = True
        reason = same_shapes(ref, out)
        ours["shape_ok"] = reason is None
        if reason:
            ours["reason"] = reason
        ours["flops"] = flops_of(ours_model, x1)
        ours["params"] = n_params(ours_model)
    except Exception as exc:  # noqa: BLE001
        ours.setdefault("forward", False)
        ours["reason"] = short_reason(exc)
        ours["traceback"] = traceback.format_exc(limit=-3)
    flush()

    # Torch-Pruning on an untouched copy of the same model
    tpr = rec["tp"]
    tp_model = None
    try:
        require_torch_pruning()
        candidate = copy.deepcopy(pristine)
        t0 = time.perf_counter()
        with_alarm(tp_timeout, tp_prune, candidate, x[:1], num_classes, ratio=ratio)
        tpr["seconds"] = round(time.perf_counter() - t0, 3)
        candidate.eval()
        with torch.no_grad():
            out = candidate(x_check)
        tpr["forward"] = True
        reason = same_shapes(ref, out)
        tpr["shape_ok"] = reason is None
        if reason:
            tpr["reason"] = reason
        tpr["flops"] = flops_of(candidate, x1)
        tpr["params"] = n_params(candidate)
        tp_model = candidate
    except BaseException as exc:  # noqa: BLE001 - Alarm and any exception inside Torch-Pruning
        if isinstance(exc, KeyboardInterrupt):
            raise
        tpr.setdefault("forward", False)
        tpr["reason"] = short_reason(exc)
        tpr["traceback"] = traceback.format_exc(limit=-3)
    flush()

    if light:  # runs, shapes, FLOPs and params only (coverage.py checks ONNX and reload)
        return 0
    # latency, batch 1, interleaved: original, ours, Torch-Pruning's (when they work)
    models = {"original": pristine}
    if ours.get("shape_ok"):
        models["ours"] = ours_model
    if tpr.get("shape_ok"):
        models["tp"] = tp_model
    if len(models) > 1:
        try:
            ms = interleaved_ms(list(models.values()), x1, LATENCY_RUNS)
            rec["latency_ms"] = {k: round(v, 3) for k, v in zip(models, ms)}
        except Exception as exc:  # noqa: BLE001
            rec["latency_error"] = short_reason(exc)
    flush()

    # ours only: ONNX parity and save + surgery.load
    if ours.get("shape_ok"):
        from surgery import export as sx

        with tempfile.TemporaryDirectory(prefix="pvt-") as tmp:
            try:
                t0 = time.perf_counter()
                path = sx.export_onnx(ours_model, torch.randn(1, *size), Path(tmp) / "m.onnx")
                parity = sx.check_parity(ours_model, path, size, batch_sizes=ONNX_BATCHES)
                ours["onnx_ok"] = True
                ours["onnx_rel"] = max(parity["max_rel_diff"].values())
                ours["onnx_seconds"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # noqa: BLE001
                ours["onnx_ok"] = False
                ours["onnx_reason"] = short_reason(exc)
            flush()
            try:
                with torch.no_grad():
                    out = ours_model(x_check)
                ours_result.save(Path(tmp) / "artifact")
                again = surgery.load(Path(tmp) / "artifact")
                with torch.no_grad():
                    diff = compare_outputs(out, again.eval()(x_check))
                scale = max((float(t.abs().max()) for t in tensors(out) if t.numel()), default=0.0)
                ours["reload_diff"] = diff
                ours["reload_ok"] = diff <= RELOAD_RTOL * max(1.0, scale)
                if not ours["reload_ok"]:
                    ours["reload_reason"] = f"max|diff| {diff:.3g} after reload"
            except Exception as exc:  # noqa: BLE001
                ours["reload_ok"] = False
                ours["reload_reason"] = short_reason(exc)
    flush()
    return 0


# --- parent: the model list ---------------------------------------------------------------------


def select_models(max_params: float, max_side: int) -> list[str]:
    fam = json.loads(FAMILIES.read_text())["families"]
    size_of = {}
    cov = OUT / "coverage.json"
    if cov.is_file():
        size_of = {r["model"]: r.get("input_size") for r in json.loads(cov.read_text())["models"]}
    names = []
    for v in fam.values():
        m = v.get("model")
        if not m or v.get("params") is None or v["params"] > max_params:
            continue
        side = (size_of.get(m) or [3, 224, 224])[-1]
        if side <= max_side:
            names.append(m)
    return sorted(names)


def run_one(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    path = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result-file", str(path),
           "--ratio", str(args.ratio), "--threads", str(args.threads), "--tp-timeout", str(int(args.timeout * 0.6))] + (["--light"] if args.light else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TIMM_FUSED_ATTN": "0"}
    t0 = time.perf_counter()
    status = "done"
    log = tmp / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        rec = {"model": name, "ours": {}, "tp": {}}
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if status == "timeout" or rc != 0:
        why = f"timeout after {args.timeout:.0f} s" if status == "timeout" else f"worker exited with {rc}"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        rec["worker_error"] = why + (f": {tail[-1][:120]}" if tail and status != "timeout" else "")
        for tool in ("ours", "tp"):
            if "forward" not in rec[tool]:
                rec[tool].update(forward=False, reason=rec["worker_error"])
    return rec


def success(rec: dict[str, Any], tool: str, strict: bool) -> bool:
    r = rec.get(tool, {})
    ok = bool(r.get("forward") and r.get("shape_ok"))
    if strict and tool == "ours":
        ok = ok and bool(r.get("onnx_ok")) and bool(r.get("reload_ok"))
    return ok


def failure(rec: dict[str, Any], tool: str) -> str:
    r = rec.get(tool, {})
    if not (r.get("forward") and r.get("shape_ok")):
        return r.get("reason") or "?"
    if tool == "ours" and not r.get("onnx_ok"):
        return "onnx: " + (r.get("onnx_reason") or "not run")
    if tool == "ours" and not r.get("reload_ok"):
        return "reload: " + (r.get("reload_reason") or "not run")
    return ""


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def models_part(args: argparse.Namespace, save: Any, earlier: list[dict[str, Any]]) -> dict[str, Any]:
    """Every model in its own subprocess; with --models, rows of other models from ``earlier`` stay."""
    from tqdm import tqdm

    if args.models:
        names = args.models.split(",")
    elif args.torchvision:
        import torchvision

        names = ["torchvision:" + n for n in torchvision.models.list_models(module=torchvision.models)]
    else:
        names = select_models(args.max_params, 256)
    print(f"{len(names)} models, ratio {args.ratio}, {args.jobs} at once, timeout {args.timeout:.0f} s",
          file=sys.stderr)
    records = [r for r in earlier if r["model"] not in set(names)] if args.models else []
    part = {"ratio": args.ratio, "timeout": args.timeout, "threads": args.threads, "records": records,
            "light": args.light,
            "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="pvt-") as tmp, cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, n, args, Path(tmp)): n for n in names}
        bar = tqdm(total=len(names), unit="model", dynamic_ncols=True, desc="ours vs torch-pruning")
        for fut in cf.as_completed(futures):
            rec = fut.result()
            records.append(rec)
            bar.set_postfix_str(f"ours={sum(success(r, 'ours', not args.light) for r in records)} "
                                f"tp={sum(success(r, 'tp', False) for r in records)} last={rec['model']}",
                                refresh=False)
            bar.update(1)
            records.sort(key=lambda r: r["model"])
            part["load_average"] = os.getloadavg()
            save(part)  # after every model: an interrupted run keeps what it measured
        bar.close()
    return part


# --- digits: accuracy of a trained resnet18 ----------------------------------------------------


def digits_part(args: argparse.Namespace) -> dict[str, Any]:
    import timm
    import torch

    import surgery
    from surgery.models import LoadedModel, load_model, source_of
    from surgery.pipeline import example_batch
    from surgery.report import count_flops
    from surgery.tasks import FINETUNE_LR, evaluate_model, finetune, train
    from surgery.train import TrainConfig

    torch.set_num_threads(args.threads)
    if not (DIGITS_RUN / "recipe.json").is_file():
        train("resnet18", "digits", TrainConfig(epochs=3), out=DIGITS_RUN, force=True)
    base = load_model(str(DIGITS_RUN))
    size = tuple(base.input_size)
    x1 = example_batch(size, 1)
    base_flops = count_flops(base.model, x1)
    rows: list[dict[str, Any]] = [{"method": "unpruned", "flops_ratio": 1.0, "params": n_params(base.model),
                                   "top1": evaluate_model(base, "digits")["val_top1"]}]
    ft_cfg = TrainConfig(epochs=args.finetune_epochs, lr=FINETUNE_LR, warmup_epochs=0.0, progress=False)

    def plain_resnet() -> Any:
        # Torch-Pruning gets the eager timm model with the trained weights (it does not need fx)
        m = timm.create_model("resnet18", num_classes=10)
        m.load_state_dict(base.model.state_dict())
        return m.eval()

    def tp_at(target: float, global_pruning: bool) -> tuple[Any, float, float]:
        """Torch-Pruning's pruning_ratio bisected until FLOPs <= target (it has no FLOPs target)."""
        lo, hi, best = 0.0, 0.95, None
        t0 = time.perf_counter()
        for _ in range(12):
            mid = (lo + hi) / 2
            m = tp_prune(plain_resnet(), x1, 10, ratio=mid, global_pruning=global_pruning)
            if count_flops(m, x1) <= target * base_flops:
                hi, best = mid, m
            else:
                lo = mid
        if best is None:
            best = tp_prune(plain_resnet(), x1, 10, ratio=hi, global_pruning=global_pruning)
        return best, hi, time.perf_counter() - t0

    for scope in ("uniform", "global"):
        variants: list[tuple[str, Any, float | None, float]] = []
        for comp in (False, True):
            spec = f"prune:flops=0.5,scope={scope},importance=l2" + (",recover=on,data=digits" if comp else "")
            t0 = time.perf_counter()
            res = surgery.apply(base, [spec], measure=False)
            variants.append((f"surgery prune ({scope}{', recover' if comp else ''})", res.model,
                             res.recipe["passes"][-1]["plan"]["ratio"], time.perf_counter() - t0))
        tp_model, tp_ratio, tp_s = tp_at(0.5, scope == "global")
        variants.append((f"Torch-Pruning ({scope})", tp_model, tp_ratio, tp_s))
        for method, model, ratio, seconds in variants:
            loaded = LoadedModel(model.eval(), size, base.source if isinstance(model, torch.fx.GraphModule)
                                 else source_of(model, size))
            row = {"method": method, "ratio": ratio, "seconds": round(seconds, 2),
                   "flops_ratio": round(count_flops(model, x1) / base_flops, 4), "params": n_params(model),
                   "top1": evaluate_model(loaded, "digits")["val_top1"]}
            torch.manual_seed(SEED)
            tuned = finetune(loaded, "digits", ft_cfg)
            row["top1_finetuned"] = tuned.metrics["val_top1"]
            row["loss_finetuned"] = tuned.metrics.get("val_loss")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"finetune_epochs": args.finetune_epochs, "finetune_lr": FINETUNE_LR, "rows": rows,
            "load_average": os.getloadavg()}


# --- report ------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def render_models(part: dict[str, Any], title: str) -> list[str]:
    """The success table and per-model rows of one model list."""
    lines: list[str] = []
    recs = part["records"]
    strict = not part.get("light")  # ours: ONNX parity and reload too, where this run checked them
    n = len(recs)
    ours_fs = sum(success(r, "ours", False) for r in recs)
    ours_strict = sum(success(r, "ours", True) for r in recs)
    tp_ok = sum(success(r, "tp", False) for r in recs)
    both = [r for r in recs if success(r, "ours", False) and success(r, "tp", False)]

    def shrank(tool: str, strict: bool) -> int:
        return sum(success(r, tool, strict) and (r[tool].get("flops") or 0) < 0.99 * (r.get("flops") or 0)
                   for r in recs)

    lines += [
        f"## Success over {n} {title}", "",
        f"Ratio {part['ratio']} of the channels of every group / layer (uniform), l2 magnitude, round_to 8, "
        f"random weights, {part['threads']} thread(s) per model, load average at the end "
        f"{', '.join(f'{v:.1f}' for v in part['load_average'])}.", "",
        "| | ours (surgery `prune`) | Torch-Pruning |", "|---|---|---|",
        f"| forward + output shape kept | **{ours_fs}/{n}** ({100 * ours_fs / n:.0f}%) | "
        f"**{tp_ok}/{n}** ({100 * tp_ok / n:.0f}%) |",
        (f"| ... and ONNX parity + save/`surgery.load` | {ours_strict}/{n} ({100 * ours_strict / n:.0f}%) | "
         "not offered (pickle only) |") if not part.get("light") else
        "| ... and ONNX parity + save/`surgery.load` | not run here: `benchmarks/coverage.py` checks both | "
        "not offered (pickle only) |",
        f"| successes that removed FLOPs (< 0.99x) | {shrank('ours', not part.get('light'))}/{n} | "
        f"{shrank('tp', False)}/{n} |",
    ]
    if both:
        def med(key_fn: Any) -> float | None:
            vals = [v for v in (key_fn(r) for r in both) if v is not None]
            return statistics.median(vals) if vals else None

        def rel(r: dict, tool: str, key: str) -> float | None:
            return r[tool][key] / r[key] if r[tool].get(key) and r.get(key) else None

        lines += [
            f"| median FLOPs ratio (the {len(both)} models both prune) | "
            f"{fmt(med(lambda r: rel(r, 'ours', 'flops')))} | "
            f"{fmt(med(lambda r: rel(r, 'tp', 'flops')))} |",
            f"| median params ratio | {fmt(med(lambda r: rel(r, 'ours', 'params')))} | "
            f"{fmt(med(lambda r: rel(r, 'tp', 'params')))} |",
            f"| median pass seconds | {fmt(med(lambda r: r['ours'].get('seconds')), '.2f')} "
            f"(pass alone {fmt(med(lambda r: r['ours'].get('pass_seconds')), '.2f')}) | "
            f"{fmt(med(lambda r: r['tp'].get('seconds')), '.2f')} |",
            "| geometric mean latency ratio, batch 1 | "
            f"{fmt(geomean([r['latency_ms']['ours'] / r['latency_ms']['original'] for r in both if 'latency_ms' in r]))} | "  # noqa: E501
            f"{fmt(geomean([r['latency_ms']['tp'] / r['latency_ms']['original'] for r in both if 'latency_ms' in r]))} |",  # noqa: E501
        ]
    lines += ["", "Per model (ratios to the original; latency: batch 1, median of "
              f"{LATENCY_RUNS} interleaved runs; '-': that tool failed):", "",
              "| model | ours | TP | FLOPs ours / TP | params ours / TP | pass s ours / TP | latency ours / TP | "
              "ours: ONNX rel, reload |",
              "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        o, t = r.get("ours", {}), r.get("tp", {})

        def ratio(tool: dict, key: str, base: Any) -> str:
            return f"{tool[key] / base:.2f}" if tool.get(key) is not None and base else "-"

        lat = r.get("latency_ms", {})
        lat_o = f"{lat['ours'] / lat['original']:.2f}" if "ours" in lat else "-"
        lat_t = f"{lat['tp'] / lat['original']:.2f}" if "tp" in lat else "-"
        deep = "-" if strict else "not run"
        if o.get("shape_ok") and strict:
            deep = (f"{o['onnx_rel']:.0e}" if o.get("onnx_ok") else "**FAIL**") + ", " + \
                   ("exact" if o.get("reload_diff") == 0 else ("ok" if o.get("reload_ok") else "**FAIL**"))
        lines.append(
            f"| `{r['model']}` | {'ok' if success(r, 'ours', strict) else '**FAIL**'} | "
            f"{'ok' if success(r, 'tp', False) else '**FAIL**'} | "
            f"{ratio(o, 'flops', r.get('flops'))} / {ratio(t, 'flops', r.get('flops'))} | "
            f"{ratio(o, 'params', r.get('params'))} / {ratio(t, 'params', r.get('params'))} | "
            f"{fmt(o.get('seconds'), '.2f')} / {fmt(t.get('seconds'), '.2f')} | {lat_o} / {lat_t} | {deep} |")
    lines += ["", "Failures:", ""]
    for tool, label in (("ours", "ours"), ("tp", "Torch-Pruning")):
        bad = [(r["model"], failure(r, tool)) for r in recs if not success(r, tool, tool == "ours" and strict)]
        lines.append(f"- {label}: " + ("none" if not bad else "; ".join(
            f"`{m}`: {why.replace('|', '/')}" for m, why in bad)))
    lines.append("")
    return lines


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    lines = ["# prune vs Torch-Pruning", "",
             f"{meta['date']} · torch {meta['torch']} · timm {meta['timm']} · torch-pruning {meta['torch_pruning']} · "
             f"{meta['machine']}. Regenerate: `.venv/bin/python benchmarks/prune_vs_torch_pruning.py` "
             "(see its docstring for the settings).", ""]
    for key, title in (("models", "timm families"), ("torchvision", "torchvision's classification models")):
        if data.get(key):
            lines += render_models(data[key], title)
    part = data.get("digits")
    if part:
        lines += ["## Accuracy on digits (resnet18 trained 3 epochs, pruned to 0.5x FLOPs)", "",
                  "Val top-1 on the digits val split (359 images: one image is 0.28%). "
                  f"Fine-tune: {part['finetune_epochs']} epoch(s) of "
                  f"`surgery.tasks.finetune` (SGD, lr {part['finetune_lr']:g}, no teacher), the same for every row. "
                  "ratio: our ratio from the FLOPs search, or Torch-Pruning's pruning_ratio after bisection. "
                  "seconds: the whole pruning (ours: trace + pass + compensation; Torch-Pruning: all 12 bisection "
                  "steps).", "",
                  "| method | ratio | FLOPs ratio | params | seconds | top-1, no training | "
                  "top-1 after fine-tune |", "|---|---|---|---|---|---|---|"]
        for r in part["rows"]:
            lines.append(f"| {r['method']} | {fmt(r.get('ratio'))} | {r['flops_ratio']:.3f} "
                         f"| {r['params'] / 1e6:.2f}M | "
                         f"{fmt(r.get('seconds'), '.1f')} | {r['top1']:.4f} | {fmt(r.get('top1_finetuned'), '.4f')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["models", "digits", "all"], default="all")
    p.add_argument("--models", help="comma-separated timm names (default: the coverage list, filtered)")
    p.add_argument("--torchvision", action="store_true",
                   help="the models part over every torchvision classification model (kept apart in the results)")
    p.add_argument("--max-params", type=float, default=5.6e6, help="largest representative to include")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tp-timeout", type=int, default=120, help=argparse.SUPPRESS)
    p.add_argument("--light", action="store_true",
                   help="models part without latency, ONNX and reload (runs, shapes, FLOPs, params only)")
    args = p.parse_args()
    if args.worker:
        return run_worker(args.worker, args.result_file, args.ratio, args.threads, args.tp_timeout, args.light)
    if args.render:
        (OUT / f"{RESULT}.md").write_text(render(json.loads((OUT / f"{RESULT}.json").read_text())))
        return 0
    tp = require_torch_pruning()
    os.environ["TIMM_FUSED_ATTN"] = "0"
    import timm
    import torch

    path = OUT / f"{RESULT}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["meta"] = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                    "timm": timm.__version__, "torch_pruning": getattr(tp, "__version__", "?"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
                    "command": " ".join(sys.argv)}
    OUT.mkdir(parents=True, exist_ok=True)

    def save(key: str, part: dict[str, Any]) -> None:
        data[key] = part
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        (OUT / f"{RESULT}.md").write_text(render(data))

    if args.part in ("models", "all"):
        key = "torchvision" if args.torchvision else "models"
        earlier = data.get(key, {}).get("records", [])
        save(key, models_part(args, lambda part: save(key, part), earlier))
    if args.part in ("digits", "all"):
        save("digits", digits_part(args))
    print(f"wrote {OUT / RESULT}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
