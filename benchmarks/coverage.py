"""Coverage of surgery over timm: does every model family trace, pass and export?

Run by hand (not part of pytest)::

    python benchmarks/coverage.py                       # smallest model of every timm family
    python benchmarks/coverage.py --models resnet18,vit_tiny_patch16_224 --no-onnx
    python benchmarks/coverage.py --models convnext_atto --merge   # update one row of the last run
    python benchmarks/coverage.py --torchvision --passes prune --set prune:flops=0.5   # torchvision's zoo

``--torchvision`` runs every classification builder of ``torchvision.models`` instead (random
weights, each at its own input size: 224, inception_v3 299) and writes to
``results/torchvision/`` unless ``--out`` says otherwise. ``--set prune:flops=0.5`` replaces
a pass's options for the run (recorded in the table's header).

A family is a timm model module (``timm.list_modules()``); its representative is its
smallest model by parameter count, counted on the meta device and cached in
``benchmarks/timm_families.json`` (``--refresh-families`` recounts).

Each model runs in its own subprocess (``--worker NAME``) under ``--timeout``, so a crash
or hang costs one row, not the run. Stages per model:

* trace: ``surgery.trace`` (graph output must equal eager within 1e-5);
* one column per registered pass (``surgery.passes.available()``), each run separately on
  the traced graph with its default options via ``surgery.apply``; a function-preserving
  pass (``fuse``) must match the eager model within PRESERVING_RTOL * max(1, max|output|),
  any other pass must keep the output's structure and shapes and stay finite;
* onnx: ``surgery.export.export_onnx`` of the rewritten (fused) model, then
  ``check_parity`` against onnxruntime at batch 1 and 4.

Deep passes (``--deep``, default ``prune``) must also survive what a user does next with the
result: its own ONNX export with parity at batch 1 and 4, and ``save`` to a temporary
folder then ``surgery.load`` (a rebuild from the recipe) that gives the same output
(RELOAD_RTOL). ``--passes prune --no-onnx --merge`` reruns one column and keeps the other
columns of the existing rows as they were.

Writes ``coverage.md`` (table, summary, failures grouped by reason) and ``coverage.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAMILIES_FILE = Path(__file__).resolve().parent / "timm_families.json"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

BATCH = 2  # trace / pass-check batch, as surgery.apply uses
CHECK_SEED = 1  # the pass check uses another input than the one the trace verified on
WEIGHT_SEED = 0  # random init of the timm model: results do not depend on the run
PRESERVING_RTOL = 1e-4  # function-preserving passes: max|diff| <= this * max(1, max|out|)
# Passes known to keep the function of the model (checked against PRESERVING_RTOL); a
# pass whose config doc says "function-preserving" is treated the same way. Any other
# pass must run, keep the batch size of every output tensor and stay finite; passes
# listed in SHAPE_CHECKS also get a specific check of the output (head: last dim).
PRESERVING_PASSES = {"fuse"}
# Options a pass needs to run at all on a random model (ebcle: an entropy source; position needs no calibration).
PASS_OPTIONS: dict[str, dict[str, Any]] = {"ebcle": {"data": "digits", "select": "position"}}
DEEP_PASSES = ("prune",)  # default of --deep: checked for ONNX parity and save/load too
RELOAD_RTOL = 1e-5  # surgery.load(saved) vs the saved model: max|diff| <= this * max(1, max|out|)
ONNX_FROM_PASS = "fuse"  # the ONNX column exports the graph this pass produced
ONNX_BATCHES = (1, 4)
REASON_LEN = 160
CELL_REASON_LEN = 70


# --- helpers shared by parent and worker ----------------------------------------------


def short_reason(exc: BaseException) -> str:
    """'ExcType: first line of the message', shortened."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason if len(reason) <= REASON_LEN else reason[: REASON_LEN - 3] + "..."


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def pass_column(name: str) -> str:
    return f"pass:{name}"


# --- family selection -------------------------------------------------------------------


def count_params_meta(name: str) -> int:
    import timm
    import torch

    from surgery.report import count_params

    with torch.device("meta"):
        return count_params(timm.create_model(name, pretrained=False))


def compute_families() -> dict[str, Any]:
    """The smallest buildable model of every timm module, by parameter count."""
    import logging
    import warnings

    import timm
    from tqdm import tqdm

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    families: dict[str, Any] = {}
    modules = timm.list_modules()
    names = [(m, n) for m in modules for n in timm.list_models(module=m)]
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    failed: dict[str, list[str]] = defaultdict(list)
    for module, name in tqdm(names, desc="counting params on meta", unit="model", dynamic_ncols=True):
        try:
            counts[module][name] = count_params_meta(name)
        except Exception as exc:  # noqa: BLE001 - any model may fail to build
            failed[module].append(f"{name}: {short_reason(exc)}")
    for module in modules:
        entry: dict[str, Any] = {"n_models": len(timm.list_models(module=module)),
                                 "n_unbuildable": len(failed[module])}
        if counts[module]:
            model, params = min(counts[module].items(), key=lambda kv: (kv[1], kv[0]))
            entry.update(model=model, params=params)
        else:
            entry.update(model=None, params=None, errors=failed[module][:5])
        families[module] = entry
    logging.disable(logging.NOTSET)
    return {"timm_version": timm.__version__, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "families": families}


def load_families(refresh: bool) -> dict[str, Any]:
    import timm

    if not refresh and FAMILIES_FILE.is_file():
        data = json.loads(FAMILIES_FILE.read_text())
        if data.get("timm_version") == timm.__version__ and set(data["families"]) == set(timm.list_modules()):
            return data
        print(f"{FAMILIES_FILE.name} is for timm {data.get('timm_version')}, "
              f"have {timm.__version__}: recounting", file=sys.stderr)
    data = compute_families()
    FAMILIES_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


TORCHVISION = "torchvision:"


def torchvision_names() -> list[str]:
    """Every classification builder of torchvision.models, as surgery names them."""
    import torchvision

    return [TORCHVISION + n for n in torchvision.models.list_models(module=torchvision.models)]


def known_model(name: str) -> bool:
    import timm

    return name in torchvision_names() if name.startswith(TORCHVISION) else timm.is_model(name)


def parse_set(specs: list[str]) -> dict[str, dict[str, str]]:
    """``["prune:flops=0.5,scope=global"]`` -> ``{"prune": {"flops": "0.5", "scope": "global"}}``."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        items = [i.strip() for i in rest.split(",") if i.strip()]
        if not name or not items or any("=" not in i for i in items):
            raise ValueError(f"--set {spec!r}: write PASS:key=value,...")
        out.setdefault(name.strip(), {}).update(dict(i.split("=", 1) for i in items))
    return out


def family_of(names: list[str]) -> dict[str, str]:
    import timm

    out = {}
    for module in timm.list_modules():
        for n in timm.list_models(module=module):
            out[n] = module
    import torchvision

    for n in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(n)
        out[TORCHVISION + n] = "torchvision." + builder.__module__.rsplit(".", 1)[-1]
    return {n: out.get(n, "?") for n in names}


# --- worker: one model, all stages --------------------------------------------------------


class Progress:
    """The worker's result, written to disk after every stage so a kill loses one stage."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, default=str))
        os.replace(tmp, self.path)

    def start(self, stage: str) -> float:
        self.record["stages"][stage] = {"status": "running"}
        self.flush()
        return time.perf_counter()

    def finish(self, stage: str, t0: float, status: str, **extra: Any) -> None:
        self.record["stages"][stage] = {"status": status, "seconds": round(time.perf_counter() - t0, 3),
                                        **extra}
        self.flush()


def output_scale(out: Any) -> float:
    from surgery.graph import output_scale

    return output_scale(out)


def all_finite(out: Any) -> bool:
    return all(bool(t.isfinite().all()) for t in flat_tensors(out) if t.is_floating_point())


def flat_tensors(out: Any) -> list[Any]:
    from surgery.graph import output_tensors

    return output_tensors(out)


def _head_check(cfg: Any, reference: Any, out: Any) -> str | None:
    shapes = [tuple(t.shape) for t in flat_tensors(out)]
    if not shapes or any(s[-1] != cfg.num_classes for s in shapes):
        return f"output shapes {shapes} do not end in num_classes={cfg.num_classes}"
    return None


SHAPE_CHECKS = {"head": (_head_check, "output (B, num_classes)")}


def is_preserving(info: Any) -> bool:
    doc = (info.config_cls.__doc__ or "").lower()
    return info.name in PRESERVING_PASSES or "function-preserving" in doc


def expectation(info: Any, deep: bool = False) -> str:
    """What the pass column checks, in words, for the table header."""
    if is_preserving(info):
        text = f"output within {PRESERVING_RTOL:g} · max(1, max|out|) of the eager model"
    else:
        extra = SHAPE_CHECKS.get(info.name, (None, ""))[1]
        text = "runs, keeps the batch size, finite output" + (f", {extra}" if extra else "")
    if deep:
        text += (f"; then its own ONNX export with parity at batch {' and '.join(map(str, ONNX_BATCHES))} "
                 f"(cell: exporter, max relative diff) and save + surgery.load giving the same output "
                 f"(within {RELOAD_RTOL:g} · max(1, max|out|))")
    return text


def deep_check(result: Any, x: Any, out: Any, size: tuple, extra: dict[str, Any]) -> str | None:
    """ONNX parity and save/load of a pass result; the failure reason, or None. Fills ``extra``."""
    import torch

    import surgery
    from surgery import export as sx
    from surgery.graph import compare_outputs

    with tempfile.TemporaryDirectory(prefix="coverage-deep-") as tmp:
        t0 = time.perf_counter()
        path = Path(tmp) / "model.onnx"
        try:
            sx.export_onnx(result.model, torch.randn(1, *size), path)
        except Exception as exc:  # noqa: BLE001
            return f"onnx export: {short_reason(exc)}"
        extra["onnx_exporter"] = onnx_exporter(path)
        try:
            parity = sx.check_parity(result.model, path, size, batch_sizes=ONNX_BATCHES)
        except Exception as exc:  # noqa: BLE001 - ParityError or an onnxruntime failure
            extra["parity"] = getattr(exc, "report", None)
            return f"onnx parity: {short_reason(exc)}"
        extra["onnx_rel"] = max(parity["max_rel_diff"].values())
        extra["onnx_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        try:
            result.save(Path(tmp) / "artifact")
            model = surgery.load(Path(tmp) / "artifact")
            with torch.no_grad():
                again = model.eval()(x)
        except Exception as exc:  # noqa: BLE001
            return f"reload: {short_reason(exc)}"
        diff = compare_outputs(out, again)
        extra["reload_diff"] = diff
        extra["reload_seconds"] = round(time.perf_counter() - t0, 3)
        tol = RELOAD_RTOL * max(1.0, output_scale(out))
        if not diff <= tol:
            return f"reload: surgery.load gives another output (max|diff| {diff:.3g} > tol {tol:.3g})"
    return None


def effect_summary(effect: dict[str, Any] | None) -> dict[str, Any]:
    """The pass's measured effect, as the report counted it: changed, FLOPs and params ratios, target."""
    from surgery.report import target_line

    if effect is None:
        return {"changed": False, "reason": "no effect recorded", "target": None}
    b, a = effect["before"], effect["after"]
    out: dict[str, Any] = {
        "changed": effect["changed"], "reason": effect.get("reason"),
        "flops": a["flops"] / b["flops"] if b["flops"] else None,
        "params": a["params"] / b["params"] if b["params"] else None,
        "estimated": bool(b.get("flops_estimated") or a.get("flops_estimated")),
        "modules": effect["rewritten"]["modules"], "target": None,
    }
    target = effect.get("target")
    if target:
        out["target"] = {"met": target["met"], "line": target_line(target)}
    return out


def check_changed(info: Any, cfg: Any, reference: Any, out: Any) -> str | None:
    """Failure reason for a pass that may change the function, or None when it is fine."""
    ref_t, out_t = flat_tensors(reference), flat_tensors(out)
    if len(ref_t) != len(out_t):
        return f"output has {len(out_t)} tensors, the original {len(ref_t)}"
    if any(o.dim() == 0 or o.shape[0] != r.shape[0] for r, o in zip(ref_t, out_t)):
        return "batch size of the output changed"
    if not all_finite(out):
        return "output is not finite"
    check = SHAPE_CHECKS.get(info.name)
    return check[0](cfg, reference, out) if check else None


def unzero(model: Any) -> list[str]:
    """Weight matrices that start all zero (torchvision's ViT heads) drawn from N(0, 0.02) instead,
    seeded: with a zero classifier every output is 0 and the parity and reload checks compare zeros."""
    import torch

    names = []
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                names.append(name)
    return names


def run_worker(name: str, result_path: Path, onnx: bool, threads: int, only: list[str] | None = None,
               deep: tuple[str, ...] = DEEP_PASSES, options: dict[str, dict[str, Any]] | None = None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    import surgery
    from surgery import passes as registry
    from surgery.errors import SurgeryError
    from surgery.graph import block_names, compare_outputs, timm_notrace_blocks
    from surgery.models import LoadedModel
    from surgery.pipeline import example_batch
    from surgery.report import count_params

    options = {**PASS_OPTIONS, **(options or {})}
    selected = [p for p in registry.available() if not only or p in only]
    record: dict[str, Any] = {"model": name, "stages": {}, "pass_order": selected,
                              "weight_seed": WEIGHT_SEED}
    prog = Progress(result_path, record)

    # build: timm model, default input size from its pretrained_cfg (kept even above 256)
    t0 = prog.start("build")
    try:
        torch.manual_seed(WEIGHT_SEED)
        loaded = surgery.load_model(name, batch=BATCH)  # the memory check at the batch this harness runs
    except Exception as exc:  # noqa: BLE001
        prog.finish("build", t0, "fail", reason=short_reason(exc), traceback=traceback.format_exc(limit=-3))
        return 0
    model = loaded.model.eval()
    record["reinitialized"] = unzero(model)
    size = tuple(loaded.input_size)
    record["input_size"] = list(size)
    record["params"] = count_params(model)
    prog.finish("build", t0, "ok")

    # trace
    x = example_batch(size, BATCH)
    t0 = prog.start("trace")
    try:
        gm = surgery.trace(model, x)
    except Exception as exc:  # noqa: BLE001
        prog.finish("trace", t0, "fail", reason=short_reason(exc), traceback=traceback.format_exc(limit=-3))
        gm = None
    else:
        info = gm.meta["surgery"]
        prog.finish("trace", t0, "ok", leaf_fallbacks=list(info.leaf_fallbacks),
                    max_abs_diff=info.max_abs_diff, nodes=len(gm.graph.nodes))

    # every registered pass, each on its own from the traced graph
    x_check = example_batch(size, BATCH, seed=CHECK_SEED)
    reference, eager_error = None, None
    if gm is not None:
        try:
            with torch.no_grad():
                reference = model(x_check)
        except Exception as exc:  # noqa: BLE001
            eager_error = f"eager model fails on the check input ({short_reason(exc)})"
    scale = output_scale(reference)
    rewritten: dict[str, Any] = {}
    for pass_name in selected:
        info = registry.available()[pass_name]
        stage = pass_column(pass_name)
        if gm is None or eager_error:
            record["stages"][stage] = ({"status": "skip", "reason": "trace failed"} if gm is None
                                       else {"status": "fail", "reason": eager_error})
            prog.flush()
            continue
        t0 = prog.start(stage)
        try:
            cfg = registry.make_config(pass_name, options.get(pass_name, {}))
        except Exception as exc:  # noqa: BLE001 - a pass without defaults cannot be benchmarked blind
            prog.finish(stage, t0, "skip", reason=f"needs options ({short_reason(exc)})")
            continue
        try:
            subject: Any = gm
            if registry.get(pass_name).resizes_input and block_names(model, timm_notrace_blocks()):
                # as `surgery apply MODEL --pass rescale` does: timm's blocks that compute sizes from
                # the input's shape stay modules (traced through, they are fixed at this size)
                subject = loaded
            elif pass_name in deep:
                # the traced graph with the timm source, so that the saved recipe rebuilds by name
                fallbacks = list(gm.meta["surgery"].leaf_fallbacks)
                subject = LoadedModel(gm, size,
                                      {**loaded.source, **({"leaf_modules": fallbacks} if fallbacks else {})})
            result = surgery.apply(subject, [(pass_name, cfg)], example_inputs=x, measure=False)
            # a pass may change the input size (rescale): check at the size it reports
            new_size = tuple(result.input_size)
            x_new = x_check if new_size == size else example_batch(new_size, BATCH, seed=CHECK_SEED)
            with torch.no_grad():
                out = result.model.eval()(x_new)
        except SurgeryError as exc:  # the pass said, in one line, why it does not apply here
            prog.finish(stage, t0, "refused", reason=str(exc).splitlines()[0][:REASON_LEN])
            continue
        except Exception as exc:  # noqa: BLE001
            prog.finish(stage, t0, "fail", reason=short_reason(exc), traceback=traceback.format_exc(limit=-3))
            continue
        diff = compare_outputs(reference, out)
        notes = [n for r in result.report.get("passes", []) for n in r.get("notes", [])]
        effect = effect_summary(result.report["passes"][-1].get("effect"))
        extra: dict[str, Any] = {"max_abs_diff": diff, "output_scale": scale, "notes": notes[:3], "effect": effect}
        if new_size != size:
            extra["input_size"] = list(new_size)
        if is_preserving(info):
            tol = PRESERVING_RTOL * max(1.0, scale)
            extra.update(expect="preserving", tolerance=tol)
            ok = diff <= tol  # NaN or inf fails
            reason = None if ok else f"output differs: max|diff| {diff:.3g} > tol {tol:.3g}"
        else:
            extra.update(expect=expectation(info),
                         output_shapes=[list(t.shape) for t in flat_tensors(out)])
            reason = check_changed(info, cfg, reference, out)
            ok = reason is None
        if ok and pass_name in deep and effect["changed"]:  # a missed target still gets its ONNX and reload
            extra["deep"] = True
            reason = deep_check(result, x_new, out, new_size, extra)
            ok = reason is None
        if ok and effect["target"] and not effect["target"]["met"]:
            ok, reason = False, f"target missed: {effect['target']['line']}"
        if ok:
            rewritten[pass_name] = result.model
            # A pass that ran clean but changed nothing is a no-op, not a success.
            prog.finish(stage, t0, "ok" if effect["changed"] else "noop",
                        **({} if effect["changed"] else {"reason": effect["reason"]}), **extra)
        else:
            rewritten[pass_name] = result.model  # still worth exporting: the graph is valid
            prog.finish(stage, t0, "fail", reason=reason, **extra)

    # onnx: export the fused graph and check it against onnxruntime
    if not onnx:
        return 0
    if gm is None:
        record["stages"]["onnx"] = {"status": "skip", "reason": "trace failed"}
        prog.flush()
        return 0
    source = ONNX_FROM_PASS if ONNX_FROM_PASS in rewritten else "trace"
    export_model = rewritten.get(ONNX_FROM_PASS, gm)
    t0 = prog.start("onnx")
    try:
        from surgery import export as sx
    except ImportError as exc:
        prog.finish("onnx", t0, "skip", reason=f"surgery.export not available ({short_reason(exc)})",
                    exported="none")
        return 0
    # export_onnx logs (INFO) why the dynamo exporter failed before it falls back
    export_log = ExportLog()
    logging.getLogger("surgery.export").addHandler(export_log)
    logging.getLogger("surgery.export").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="coverage-onnx-") as tmp:
        path = Path(tmp) / f"{name}.onnx"
        try:
            sx.export_onnx(export_model, torch.randn(1, *size), path)
        except Exception as exc:  # noqa: BLE001
            prog.finish("onnx", t0, "fail", phase="export", exported=source, reason=short_reason(exc),
                        detail=str(exc)[:2000], traceback=traceback.format_exc(limit=-3))
            return 0
        t_export = time.perf_counter() - t0
        exporter = onnx_exporter(path)
        if export_log.failures:
            record["onnx_fallback"] = export_log.failures
        try:
            parity = sx.check_parity(export_model, path, size, batch_sizes=ONNX_BATCHES)
        except Exception as exc:  # noqa: BLE001 - ParityError or an onnxruntime failure
            phase = "parity" if type(exc).__name__ == "ParityError" else "onnxruntime"
            prog.finish("onnx", t0, "fail", phase=phase, exported=source, exporter=exporter,
                        reason=short_reason(exc), detail=str(exc)[:2000],
                        parity=getattr(exc, "report", None), export_seconds=round(t_export, 3),
                        traceback=traceback.format_exc(limit=-3))
            return 0
    prog.finish("onnx", t0, "ok", exported=source, exporter=exporter, export_seconds=round(t_export, 3),
                parity=parity if isinstance(parity, (dict, list, float, int, type(None))) else str(parity))
    return 0


class ExportLog:
    """A logging handler that keeps the 'X exporter failed: ...' records of surgery.export."""

    level = 0

    def __init__(self) -> None:
        self.failures: list[str] = []

    def handle(self, record: Any) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if "exporter failed" in msg:
            self.failures.append(msg.splitlines()[0][:REASON_LEN * 2])
        return True


def onnx_exporter(path: Path) -> str | None:
    """Which torch exporter wrote the file (surgery stamps it into the metadata)."""
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}.get("surgery.exporter")
    except Exception:  # noqa: BLE001 - only informative
        return None


# --- parent: run the workers ------------------------------------------------------------


def run_one(name: str, args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    result_path = tmpdir / f"{name}.json"
    log_path = tmpdir / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result-file", str(result_path),
           "--threads", str(args.threads)]
    if args.no_onnx:
        cmd.append("--no-onnx")
    if args.passes:
        cmd += ["--passes", args.passes]
    cmd += ["--deep", args.deep]
    for spec in args.set:
        cmd += ["--set", spec]
    env = dict(os.environ)
    if args.threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    t0 = time.perf_counter()
    status, rc = "done", None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
            proc.wait()
    wall = time.perf_counter() - t0
    try:
        record = json.loads(result_path.read_text())
    except (OSError, ValueError):
        record = {"model": name, "stages": {}}
    record["wall_seconds"] = round(wall, 2)
    record["returncode"] = rc
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.exists() else []
    running = [s for s, v in record["stages"].items() if v.get("status") == "running"]
    order = ["build", *stage_columns(list(record.get("pass_order", [])), not args.no_onnx)]
    missing = [s for s in order if s not in record["stages"]]
    if status == "timeout":
        stage = running[0] if running else (missing[0] if missing else "worker")
        record["stages"][stage] = {"status": "timeout", "reason": f"timeout after {args.timeout:.0f}s",
                                   "seconds": None}
    elif rc != 0 or running:
        stage = running[0] if running else (missing[0] if missing else "worker")
        if rc is not None and rc < 0:
            sig = f"killed by signal {-rc}"
            if -rc == signal.SIGKILL:
                sig += " (not by us: most likely the kernel's OOM killer, see dmesg)"
        else:
            sig = f"worker exited with code {rc}"
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        reason = f"{sig}: {last[:100]}" if last else sig
        record["stages"][stage] = {"status": "crash", "reason": reason, "seconds": None}
    if status != "done" or rc != 0:
        record["log_tail"] = tail
    return record


def stage_columns(passes: list[str], onnx: bool) -> list[str]:
    return ["trace"] + [pass_column(p) for p in passes] + (["onnx"] if onnx else [])


def column_status(record: dict[str, Any], col: str) -> tuple[str, str | None]:
    """(status, reason) of one column; a build failure shows up in the trace column."""
    stages = record.get("stages", {})
    build = stages.get("build", {})
    if build.get("status") not in (None, "ok") and col == "trace":
        return build["status"], f"build: {build.get('reason')}"
    if build.get("status") != "ok":
        return "skip", "build failed"
    st = stages.get(col)
    if st is None:
        upstream = [c for c in ("trace",) if stages.get(c, {}).get("status") in ("timeout", "crash")]
        return "skip", f"{upstream[0]} did not finish" if upstream else "not run"
    return st.get("status", "?"), st.get("reason")


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def cell(record: dict[str, Any], col: str) -> str:
    status, reason = column_status(record, col)
    st = record.get("stages", {}).get(col, {})
    if status == "ok":
        if col == "trace":
            leaves = len(st.get("leaf_fallbacks", []))
            return f"ok ({leaves} leaf fallback{'s' if leaves != 1 else ''})" if leaves else "ok"
        if col.startswith("pass:"):
            parts = effect_parts(st.get("effect"))
            if st.get("deep"):
                parts.append(f"onnx {st.get('onnx_exporter') or '?'} rel {st.get('onnx_rel', 0):.0e}")
                diff = st.get("reload_diff")
                parts.append("reload exact" if diff == 0 else f"reload {diff:.0e}")
            elif st.get("expect") != "preserving":
                size = st.get("input_size")
                parts += [f"input {'x'.join(map(str, size[1:]))}"] if size else []
            else:
                m = re.search(r"folded (\d+)", " ".join(st.get("notes", [])))
                parts += ([f"{m.group(1)} folded"] if m else []) + [f"{st.get('max_abs_diff', 0):.1e}"]
            return f"ok ({', '.join(parts)})" if parts else "ok"
        if col == "onnx":
            notes = [st.get("exporter") or "?"]
            if st.get("exported") != ONNX_FROM_PASS:
                notes.append(f"from {st.get('exported')}")
            rel = (st.get("parity") or {}).get("max_rel_diff") or {}
            if rel:
                notes.append(f"rel {max(rel.values()):.0e}")
            return f"ok ({', '.join(notes)})"
    text = md_escape(reason or status)
    if status in ("noop", "refused"):  # ran clean: no change (with why), or a clear refusal
        short = text[:CELL_REASON_LEN - 3] + "..." if len(text) > CELL_REASON_LEN else text
        return f"{'no-op' if status == 'noop' else 'refused'} ({short})"
    if status == "skip":
        if not reason or reason in ("trace failed", "build failed"):
            return "-"
        return f"- ({text[:CELL_REASON_LEN - 3] + '...' if len(text) > CELL_REASON_LEN else text})"
    if len(text) > CELL_REASON_LEN:
        text = text[: CELL_REASON_LEN - 3] + "..."
    label = {"fail": "FAIL", "timeout": "TIMEOUT", "crash": "CRASH"}.get(status, status.upper())
    if col == "onnx" and st.get("phase"):
        label += f" [{st['phase']}]"
    return f"**{label}** {text}"


def effect_parts(effect: dict[str, Any] | None) -> list[str]:
    """The measured effect in a cell: FLOPs and params after / before (~ where the FLOPs are estimated)."""
    if not effect:
        return []
    mark = "~" if effect.get("estimated") else ""
    return [f"{label} {mark}{effect[key]:.2f}x" for key, label in (("flops", "FLOPs"), ("params", "params"))
            if effect.get(key) is not None]


def seconds_cell(record: dict[str, Any], passes: list[str], onnx: bool) -> str:
    stages = record.get("stages", {})
    parts = []
    for col, short in [("trace", "t")] + [(pass_column(p), p[:4]) for p in passes] + [("onnx", "onnx")]:
        s = stages.get(col, {}).get("seconds")
        if s is not None:
            parts.append(f"{short} {s:.1f}")
    wall = record.get("wall_seconds")
    total = f"{wall:.1f}" if wall is not None else "?"
    return f"{total} ({', '.join(parts)})" if parts else total


def group_key(reason: str) -> str:
    """Failure reasons up to numbers and quoted names, so that alike causes group."""
    key = reason.split(" (")[0]  # details in parentheses (sizes, numbers) do not split groups
    key = re.sub(r": (node )?\S+ cannot ", ": <module> cannot ", key)
    key = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", key)
    key = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", key)
    return key


def summarize(records: list[dict[str, Any]], passes: list[str], onnx: bool) -> dict[str, Any]:
    cols = stage_columns(passes, onnx)
    n = len(records)
    summary: dict[str, Any] = {"models": n, "columns": {}}
    prev_ok: set[str] | None = None
    for col in cols:
        ok = {r["model"] for r in records if column_status(r, col)[0] == "ok"}
        attempted = {r["model"] for r in records if column_status(r, col)[0] not in ("skip",)}
        entry = {"ok": len(ok), "attempted": len(attempted), "percent": round(100 * len(ok) / n, 1) if n else 0.0}
        if col.startswith("pass:"):  # ok = ran and changed the model; the rest, apart
            for status in ("noop", "refused"):
                entry[status] = sum(column_status(r, col)[0] == status for r in records)
            entry["failed"] = len(attempted) - len(ok) - entry["noop"] - entry["refused"]
        if col != "trace" and prev_ok is not None:
            entry["ok_of_traced"] = len(ok & prev_ok)
            entry["traced"] = len(prev_ok)
        summary["columns"][col] = entry
        if col == "trace":
            prev_ok = ok
    for kind in ("failures", "noop", "refused"):
        summary[kind] = _by_reason(records, cols, kind)
    return summary


def _by_reason(records: list[dict[str, Any]], cols: list[str], kind: str) -> dict[str, dict[str, list]]:
    """Per column, the models of one kind (failures, noop, refused), grouped by alike reasons."""
    failures: dict[str, dict[str, list]] = {}
    for col in cols:
        groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for r in records:
            status, reason = column_status(r, col)
            if (status in ("ok", "skip", "noop", "refused")) if kind == "failures" else status != kind:
                continue
            detail = r.get("stages", {}).get(col, {}).get("detail")
            if detail:  # the exporter's message names both exporters' errors: keep more of it
                first = detail.strip().splitlines()[0]
                reason = f"{(reason or '').split(':')[0]}: {first[:400]}"
            label = status if status not in ("fail", "noop", "refused") else ""
            full = f"{label.upper()}: {reason}" if label else (reason or "?")
            groups[group_key(full)].append((r["model"], full))
        failures[col] = {k: v for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))}
    return failures


def render_md(data: dict[str, Any]) -> str:
    meta, records = data["meta"], data["models"]
    passes, onnx = meta["passes"], meta["onnx"]
    summary = summarize(records, passes, onnx)
    cols = stage_columns(passes, onnx)
    tv = all(r["model"].startswith(TORCHVISION) for r in records) and bool(records)
    opts = meta.get("options") or {}
    lines = [
        "# surgery coverage over " + ("torchvision's classification models" if tv else "timm"),
        "",
        f"{meta['date']} · torch {meta['torch']} · timm {meta['timm']} · onnxruntime {meta.get('onnxruntime')} · "
        f"{meta['selection']} · timeout {meta['timeout']:.0f}s per model · "
        f"`python benchmarks/coverage.py {meta.get('argv', '')}`".rstrip(),
        "",
        "Columns: **trace**: `surgery.trace` at batch " f"{BATCH}, graph equal to eager within 1e-5 "
        "(leaf fallbacks = submodules kept opaque). "
        + " ".join(
            f"**{p}**: `surgery.apply(gm, ['{p}'])` with "
            + (", ".join(f"{k}={v}" for k, v in opts[p].items()) if p in opts else "default options")
            + " from the traced graph; "
            + md_escape(meta.get("expectations", {}).get(p, "runs"))
            + (" (cell: BatchNorms folded, max\\|diff\\|)." if p == "fuse" else ".")
            for p in passes
        )
        + (f" **onnx**: `export_onnx` of the {ONNX_FROM_PASS}-rewritten graph, then `check_parity` "
           f"against onnxruntime at batch {' and '.join(map(str, ONNX_BATCHES))}." if onnx else "")
        + (" **input**: the size of the model's torchvision weights transform (224; inception_v3 299). " if tv
           else " **input**: the model's pretrained_cfg size (kept even above 256). ")
        + "**seconds**: worker wall time (per-stage seconds). "
        "A pass cell is **ok** only where the pass changed the model, with its measured effect (FLOPs and "
        "params after / before, by the report's counter; ~: estimated where FlopCounterMode failed); "
        "**no-op** (reason): ran clean and changed nothing; **refused** (reason): the pass declined with a "
        "one-line error; **FAIL**: an exception, a failed check or a missed target.",
        "",
    ]
    head = ["family", "model", "params", "input", "trace"]
    head += [f"{p} (tol {PRESERVING_RTOL:g}·max(1,\\|out\\|))" if p in meta.get("preserving", []) else p
             for p in passes]
    head += (["onnx (b=" + ",".join(map(str, ONNX_BATCHES)) + ")"] if onnx else []) + ["seconds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(records, key=lambda r: (r.get("family", ""), r["model"])):
        size = r.get("input_size")
        row = [r.get("family", "?"), f"`{r['model']}`", human(r.get("params")),
               "x".join(map(str, size[1:])) if size else "?"]
        row += [cell(r, c) for c in cols]
        row.append(seconds_cell(r, passes, onnx))
        lines.append("| " + " | ".join(row) + " |")
    n = summary["models"]
    parts = []
    for col in cols:
        e = summary["columns"][col]
        name = col.removeprefix("pass:")
        text = f"**{name}** {e['ok']}/{n} ({e['percent']:.1f}%)"
        if "noop" in e:
            text = (f"**{name}** changed {e['ok']}/{n} ({e['percent']:.1f}%), {e['noop']} no-op, "
                    f"{e['refused']} refused, {e['failed']} failed")
        elif "traced" in e and e["traced"]:
            text += f", {e['ok_of_traced']}/{e['traced']} of traced ({100 * e['ok_of_traced'] / e['traced']:.1f}%)"
        if e["attempted"] < n:
            text += f", {n - e['attempted']} not run"
        parts.append(text)
    lines += ["", f"**Summary** over {n} models: " + " · ".join(parts) + ".", ""]
    for kind, title in (("failures", "Failures"), ("noop", "No-ops"), ("refused", "Refused")):
        lines += [f"## {title} by reason", ""] + _reason_sections(summary[kind], cols)
    runs = meta.get("runs") or []
    if len(runs) > 1:
        lines += ["Rows come from these runs (a later run replaced the rows of the models it names, "
                  "or only its passes' columns when it ran fewer passes):", ""]
        lines += [f"- {r.get('date')}: {r.get('selection')} · passes {', '.join(r.get('passes') or [])} · "
                  f"`python benchmarks/coverage.py {r.get('argv', '')}`" for r in runs]
        lines.append("")
    unselected = meta.get("families_without_model") or []
    if unselected:
        lines += ["Families with no buildable model: " + ", ".join(unselected), ""]
    return "\n".join(lines)


def _reason_sections(by_col: dict[str, dict[str, list]], cols: list[str]) -> list[str]:
    lines: list[str] = []
    for col in cols:
        groups = by_col[col]
        if not groups:
            continue
        total = sum(len(v) for v in groups.values())
        lines += [f"### {col.removeprefix('pass:')} ({total})", ""]
        for key, items in groups.items():
            reasons = {reason for _, reason in items}
            if len(reasons) == 1:
                models = ", ".join(f"`{m}`" for m, _ in items)
                lines.append(f"- {len(items)} × {md_escape(reasons.pop())}: {models}")
                continue
            lines.append(f"- {len(items)} × {md_escape(key)}:")
            lines += [f"  - `{m}`: {md_escape(reason)}" for m, reason in sorted(items)]
        lines.append("")
    return lines or ["None.", ""]


def versions() -> dict[str, str]:
    import timm
    import torch

    out = {"torch": torch.__version__, "timm": timm.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated timm names or torchvision:NAME "
                        "(default: smallest of each family)")
    parser.add_argument("--torchvision", action="store_true",
                        help="every classification model of torchvision.models instead of the timm families")
    parser.add_argument("--set", action="append", default=[], metavar="PASS:key=value,...",
                        help="options of one pass for this run, replacing its defaults (repeatable)")
    parser.add_argument("--families", help="comma-separated timm modules to restrict the default list to")
    parser.add_argument("--exclude", help="comma-separated timm names to leave out of the list")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model (default 300)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's own with --jobs 1, else 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for coverage.md/.json (default benchmarks/results, torchvision/ below it "
                             "with --torchvision)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX column")
    parser.add_argument("--passes", help="comma-separated passes to run (default: every registered pass); "
                        "with --merge the other columns of existing rows are kept")
    parser.add_argument("--deep", default=",".join(DEEP_PASSES),
                        help="comma-separated passes also checked for ONNX parity and save/load "
                             f"(default {','.join(DEEP_PASSES)}; '' for none)")
    parser.add_argument("--refresh-families", action="store_true", help=f"recount {FAMILIES_FILE.name}")
    parser.add_argument("--merge", action="store_true",
                        help="update these models' rows in an existing coverage.json instead of replacing it")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite coverage.md from the coverage.json in --out")
    parser.add_argument("--worker", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 0 if args.jobs <= 1 else 1

    if args.out is None:
        args.out = DEFAULT_OUT / "torchvision" if args.torchvision else DEFAULT_OUT

    only = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    deep = tuple(p.strip() for p in args.deep.split(",") if p.strip())
    try:
        set_options = parse_set(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    if args.worker:
        return run_worker(args.worker, args.result_file, not args.no_onnx, args.threads, only, deep, set_options)

    json_path, md_path = args.out / "coverage.json", args.out / "coverage.md"
    if args.render:
        data = json.loads(json_path.read_text())
        md_path.write_text(render_md(data))
        print_summary(summarize(data["models"], data["meta"]["passes"], data["meta"]["onnx"]))
        print(f"wrote {md_path}")
        return 0

    from tqdm import tqdm

    from surgery import passes as registry

    infos = registry.available()
    unknown_passes = sorted(set(only or []) - set(infos))
    if unknown_passes:
        parser.error(f"unknown pass(es): {', '.join(unknown_passes)}; registered: {', '.join(infos)}")
    passes = [p for p in infos if not only or p in only]
    preserving = [p for p, info in infos.items() if is_preserving(info)]
    if args.torchvision or (args.models and not args.refresh_families):
        # explicit models: use the family cache if there is one, never count all of timm for it
        fam = json.loads(FAMILIES_FILE.read_text())["families"] if FAMILIES_FILE.is_file() else {}
    else:
        fam = load_families(args.refresh_families)["families"]
    params_of = {v["model"]: v["params"] for v in fam.values() if v.get("model")}
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if not known_model(n)]
        if unknown:
            parser.error(f"unknown model(s): {', '.join(unknown)}")
        family = family_of(names)
        selection = f"{len(names)} model(s) from --models"
    elif args.torchvision:
        names = torchvision_names()
        family = family_of(names)
        selection = f"every classification model of torchvision ({len(names)})"
    else:
        wanted = set(args.families.split(",")) if args.families else set(fam)
        names = sorted(v["model"] for k, v in fam.items() if k in wanted and v.get("model"))
        family = {v["model"]: k for k, v in fam.items() if v.get("model")}
        selection = f"smallest model of each of {len(names)} timm families"
    if args.exclude:
        dropped = set(args.exclude.split(","))
        names = [n for n in names if n not in dropped]
        selection += f", without {', '.join(sorted(dropped))}"
    for n in names:
        if n not in params_of and not n.startswith(TORCHVISION):  # torchvision's: the worker counts
            try:
                params_of[n] = count_params_meta(n)
            except Exception:  # noqa: BLE001
                params_of[n] = None

    args.out.mkdir(parents=True, exist_ok=True)
    previous: list[dict[str, Any]] = []
    earlier_runs: list[dict[str, Any]] = []
    old_rows: dict[str, dict[str, Any]] = {}  # rows whose other columns a --passes run keeps
    old_meta: dict[str, Any] = {}
    if args.merge and json_path.is_file():
        old = json.loads(json_path.read_text())
        old_meta = old["meta"]
        previous = [r for r in old["models"] if r["model"] not in set(names)]
        if only:
            old_rows = {r["model"]: r for r in old["models"] if r["model"] in set(names)}
        earlier_runs = old["meta"].get("runs") or [
            {k: old["meta"].get(k) for k in ("date", "argv", "selection", "passes")}]
    run_passes, run_onnx = passes, not args.no_onnx
    table_onnx = run_onnx
    if only and old_meta:
        # the table keeps every column of the earlier run; only the rerun ones change
        passes = [p for p in infos if p in set(old_meta.get("passes", [])) | set(passes)]
        table_onnx = run_onnx or bool(old_meta.get("onnx", False))
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    if args.models and len(argv_text) > 160:
        argv_text = argv_text.replace(args.models, f"<{len(names)} models>")
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), **versions(),
        "passes": passes, "preserving": preserving, "onnx": table_onnx,
        "timeout": args.timeout, "jobs": args.jobs, "threads": args.threads,
        "selection": selection if not previous else f"{selection}, merged into {len(previous)} earlier",
        "argv": argv_text,
        "options": {p: {**PASS_OPTIONS.get(p, {}), **set_options.get(p, {})} for p in passes
                    if PASS_OPTIONS.get(p) or set_options.get(p)},
        "tolerance": {p: f"max|diff| <= {PRESERVING_RTOL:g} * max(1, max|out|)" for p in preserving},
        "expectations": {**old_meta.get("expectations", {}),
                         **{p: expectation(info, p in deep) for p, info in infos.items() if p in run_passes}},
        "families_without_model": sorted(k for k, v in fam.items() if not v.get("model")) if not args.models else [],
    }

    meta["runs"] = earlier_runs + [{**{k: meta[k] for k in ("date", "argv", "selection")},
                                    "passes": run_passes, "onnx": run_onnx}]
    records: list[dict[str, Any]] = []

    def write() -> None:
        data = {"meta": meta, "models": previous + records}
        data["summary"] = summarize(data["models"], passes, table_onnx)
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        md_path.write_text(render_md(data))

    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp, \
            cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, n, args, Path(tmp)): n for n in names}
        bar = tqdm(total=len(names), unit="model", dynamic_ncols=True, desc="coverage")
        counts: dict[str, int] = defaultdict(int)
        for fut in cf.as_completed(futures):
            name = futures[fut]
            try:
                record = fut.result()
            except Exception as exc:  # noqa: BLE001 - a bug here must not lose the others
                record = {"model": name, "stages": {"build": {"status": "crash", "reason": short_reason(exc)}}}
            if name in old_rows:  # keep the columns this run did not redo
                kept = old_rows[name]
                record = {**kept, **{k: v for k, v in record.items() if k not in ("stages", "wall_seconds")},
                          "stages": {**kept.get("stages", {}), **record["stages"]},
                          "partial_wall_seconds": record.get("wall_seconds")}
            record["family"] = family.get(name, "?")
            record["params"] = params_of.get(name) or record.get("params")
            records.append(record)
            for col in stage_columns(passes, table_onnx):
                counts[col] += column_status(record, col)[0] == "ok"
            bar.set_postfix_str(" ".join(f"{c.removeprefix('pass:')}={v}" for c, v in counts.items()) +
                                f" last={name}", refresh=False)
            bar.update(1)
            write()
        bar.close()
    write()
    print_summary(summarize(previous + records, passes, table_onnx))
    print(f"wrote {md_path} and {json_path}")
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    for col, e in summary["columns"].items():
        rest = f", {e['noop']} no-op, {e['refused']} refused, {e['failed']} failed" if "noop" in e else ""
        print(f"{col.removeprefix('pass:'):>8}: {e['ok']}/{summary['models']} ({e['percent']:.1f}%){rest}")


if __name__ == "__main__":
    sys.exit(main())
