"""Training checkpoints: OUT/checkpoint/, from which an interrupted `train` or `finetune` resumes.

A checkpoint holds the weights (model.safetensors), the optimizer's tensors
(optimizer.safetensors) and state.json: the run's progress (RunState), its identity (the
model's tensors, source and passes; the data; the options that shape the math), the
optimizer's groups and scalars, and the size and sha256 of both tensor files. Nothing is
unpickled.

Crash-safe: a save writes everything into OUT/.checkpoint.partial-*/ and swaps it with
OUT/checkpoint/ through surgery.safeio.replace_dir, so a kill at any instant leaves the old or
the new snapshot whole. A resume checks every field of state.json with surgery.validate,
refuses a checkpoint of another model, data or options, and checks both files' size and
sha256 before any tensor is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import ImageData
from .errors import SurgeryError
from .safeio import replace_dir, sha256_file
from .validate import (
    MAX_ITEMS,
    ValidationError,
    at,
    expect_bool,
    expect_dict,
    expect_int,
    expect_list,
    expect_number,
    expect_str,
    parse_json,
)
from .weights import fill_ties, save_weights

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class RunState:
    """What a checkpoint holds besides tensors: JSON, so resuming never unpickles."""

    epoch: int = 0  # epochs fully done
    step: int = 0  # optimizer steps done in total
    batches_in_epoch: int = 0  # batches of the current epoch done (an interrupted epoch)
    history: list[dict[str, Any]] = field(default_factory=list)
    # Running sums of the interrupted epoch (loss, correct, n, distill, lr): its record stays exact.
    partial: dict[str, float | None] = field(default_factory=dict)


# --- checkpoints ---------------------------------------------------------------------------
#
# OUT/checkpoint/ is one consistent snapshot, never changed in place:
#   model.safetensors      weights of the module being trained
#   optimizer.safetensors  the optimizer's per-parameter tensors, keys state.<param index>.<name>
#   state.json             progress, the run's identity (model, data, options), the optimizer's
#                          groups and scalars, and the size and sha256 of both tensor files
# A save writes all three into a fresh OUT/.checkpoint.partial-PID-*/ and then swaps it with
# OUT/checkpoint/ (safeio.replace_dir: an atomic exchange on Linux, else two renames that
# safeio.recover undoes). So a kill at any instant leaves the old or the new snapshot whole;
# a resume first restores or removes what a killed save left. Nothing is unpickled.

CHECKPOINT_FORMAT = "surgery.checkpoint/1"
STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "state.json", "model.safetensors", "optimizer.safetensors"
MAX_STATE_BYTES = 64 << 20  # far above a real state.json (a history of 10^4 epochs is ~3 MB)
MAX_STATE_DEPTH = 8  # a real state.json nests 6 deep
MAX_RECORD_KEYS = 256  # keys of one history record
# Options whose change leaves the saved optimizer state or module unusable: never overridden.
STRUCTURAL_OPTIONS = ("optimizer", "schedule")
_CONFIG_INTS = {"epochs": (0, 10**6), "batch_size": (1, MAX_ITEMS), "seed": (-(2**63), 2**64 - 1),
                "processes": (1, MAX_ITEMS)}
_CONFIG_NUMBERS = ("lr", "momentum", "weight_decay", "warmup_epochs", "min_lr_ratio", "label_smoothing",
                   "distill_weight", "distill_temperature")
_CONFIG_BOOLS = ("amp", "channels_last", "compile", "deterministic")
CONFIG_KEYS = frozenset({*_CONFIG_INTS, *_CONFIG_NUMBERS, *_CONFIG_BOOLS, "max_steps", "optimizer", "schedule"})
OPTIONAL_CONFIG_KEYS = frozenset({"clip_grad"})  # added later: checkpoints written before it lack it (None)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder on Windows: cannot be opened, and needs no fsync there
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# --- what a checkpoint was written for -------------------------------------------------------


def model_identity(model: nn.Module, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model a checkpoint belongs to: every tensor's name, shape and dtype, plus source and passes."""
    tensors = [f"{k}:{'x'.join(map(str, v.shape)) or '()'}:{str(v.dtype).removeprefix('torch.')}"
               for k, v in sorted(model.state_dict().items())]
    info = info or {}
    source = json.dumps(info["source"], sort_keys=True, default=str) if info.get("source") is not None else None
    passes = list(info.get("passes") or [])
    names = [str(p.get("pass", "?")) if isinstance(p, dict) else str(p) for p in passes]
    passes_sha = _sha256_text(json.dumps(passes, sort_keys=True, default=str))
    return {"sha256": _sha256_text(json.dumps([tensors, source, passes_sha])), "tensors": tensors,
            "source": source, "passes": names, "passes_sha256": passes_sha}


def data_identity(data: ImageData) -> dict[str, Any]:
    return {"name": data.name, "classes": data.num_classes, "train_images": len(data.train),
            "val_images": len(data.val), "image_size": data.image_size}


def _fmt(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, float) else str(value)


def _same_data_name(a: str, b: str) -> bool:
    # A folder given once as a relative and once as an absolute path is the same data.
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def _source_difference(old: str | None, new: str | None) -> str:
    """The differing keys of two recorded sources (``name resnet18 vs resnet50``), else both whole."""
    try:
        a, b = parse_json(old or "null", "source"), parse_json(new or "null", "source")
    except ValidationError:  # read from disk: never trusted
        a = b = None
    if isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return "source " + ", ".join(f"{k} {_fmt(a.get(k))} vs {_fmt(b.get(k))}" for k in keys)
    return f"source {old or 'none'} vs {new or 'none'}"


def _model_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    if old["sha256"] == new["sha256"]:
        return []
    out = []
    if old["source"] != new["source"]:
        out.append(_source_difference(old["source"], new["source"]))
    if old["passes_sha256"] != new["passes_sha256"]:
        a, b = "+".join(old["passes"]) or "none", "+".join(new["passes"]) or "none"
        out.append(f"passes {a} vs {b}" if a != b else f"the options of passes {a} differ")

    def table(entries: list[str]) -> dict[str, str]:
        return {e.rsplit(":", 2)[0]: ":".join(e.rsplit(":", 2)[1:]) for e in entries}

    a, b = table(old["tensors"]), table(new["tensors"])
    changed = [f"{k} {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        out.append(", ".join(changed[:3]) + more)
    only_old, only_new = [k for k in a if k not in b], [k for k in b if k not in a]
    if only_old or only_new:
        first = f"{only_old[0]} only in the checkpoint" if only_old else f"{only_new[0]} only in this model"
        out.append(f"{len(a)} vs {len(b)} tensors ({first})")
    return out or ["its fingerprint differs"]


def check_same_run(directory: Path, saved: dict[str, Any], now: dict[str, Any], *,
                   resume_anyway: bool = False) -> None:
    """Refuse a checkpoint of another model or data (always) or of other options (unless ``resume_anyway``).

    ``saved`` is the validated state.json, ``now`` this run's {"config", "model", "data"}.
    """
    what = _model_differences(saved["model"], now["model"])
    if what:
        raise SurgeryError(f"checkpoint in {directory} was written for another model (checkpoint vs now): "
                           f"{'; '.join(what)}; start without --resume or choose another --out")
    what = [f"{k} {_fmt(saved['data'][k])} vs {_fmt(v)}" for k, v in now["data"].items()
            if not (saved["data"][k] == v or (k == "name" and _same_data_name(saved["data"][k], v)))]
    if what:
        raise SurgeryError(f"checkpoint in {directory} was written for other data (checkpoint vs now): "
                           f"{', '.join(what)}; resume with the same --data and --limit, or start without --resume")
    diffs = {k: (saved["config"][k], v) for k, v in now["config"].items() if saved["config"][k] != v}
    items = [f"{k} {_fmt(a)} vs {_fmt(b)}" for k, (a, b) in diffs.items()]
    text = ", ".join(items)
    structural = [k for k in diffs if k in STRUCTURAL_OPTIONS]
    if structural:
        raise SurgeryError(f"checkpoint in {directory} was written with other options (checkpoint vs now): {text}; "
                           f"{' and '.join(structural)} cannot change within a run: rerun with the same options "
                           "or start without --resume")
    done, epochs = saved["state"]["epoch"], now["config"]["epochs"]
    if done > epochs:
        raise SurgeryError(f"checkpoint in {directory} has done {done} epochs, more than the {epochs} asked for; "
                           f"rerun with --epochs {saved['config']['epochs']} or start without --resume")
    if diffs and not resume_anyway:
        if "epochs" in diffs and diffs["epochs"][1] > diffs["epochs"][0]:
            i = list(diffs).index("epochs")
            items[i] += " (more epochs stretch the learning-rate schedule: allowed only with --resume-anyway)"
        raise SurgeryError(f"checkpoint in {directory} was written with other training options (checkpoint vs now): "
                           f"{', '.join(items)}; rerun with the same options or add --resume-anyway")
    if diffs:
        log.warning("resuming with options other than the checkpoint's (--resume-anyway): %s", text)


# --- state.json: every field checked before use ------------------------------------------------


def _expect_hex(value: Any, where: str) -> str:
    expect_str(value, where, max_len=64)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValidationError(where, "must be a sha256 (64 lowercase hex digits)")
    return value


def _expect_scalar(value: Any, where: str, *, strings: bool = True) -> None:
    """A number (NaN allowed: a diverged run still resumes), boolean, null or (with ``strings``) string."""
    if value is None or isinstance(value, (bool, int, float)):
        return
    if strings and isinstance(value, str):
        expect_str(value, where)
        return
    kinds = "a number, string, boolean or null" if strings else "a number, boolean or null"
    raise ValidationError(where, f"must be {kinds}, not {type(value).__name__}")


def _check_config(value: Any, where: str) -> dict[str, Any]:
    c = expect_dict(value, where, allowed=CONFIG_KEYS | OPTIONAL_CONFIG_KEYS, required=sorted(CONFIG_KEYS))
    c = {"clip_grad": None, **c}
    if c["clip_grad"] is not None:
        expect_number(c["clip_grad"], at(where, "clip_grad"))
    for k, (lo, hi) in _CONFIG_INTS.items():
        expect_int(c[k], at(where, k), lo=lo, hi=hi)
    for k in _CONFIG_NUMBERS:
        expect_number(c[k], at(where, k))
    for k in _CONFIG_BOOLS:
        expect_bool(c[k], at(where, k))
    if c["max_steps"] is not None:
        expect_int(c["max_steps"], at(where, "max_steps"), lo=0)
    expect_str(c["optimizer"], at(where, "optimizer"), choices=("sgd", "adamw"))
    expect_str(c["schedule"], at(where, "schedule"))
    return c


def _check_progress(value: Any, where: str, epochs: int) -> None:
    keys = [f.name for f in fields(RunState)]
    s = expect_dict(value, where, allowed=keys, required=keys)
    epoch = expect_int(s["epoch"], at(where, "epoch"), lo=0, hi=epochs)
    expect_int(s["step"], at(where, "step"), lo=0)
    batches = expect_int(s["batches_in_epoch"], at(where, "batches_in_epoch"), lo=0, hi=MAX_ITEMS)
    history = expect_list(s["history"], at(where, "history"), max_len=epochs)
    if len(history) != epoch:
        raise ValidationError(at(where, "history"), f"holds {len(history)} records but epoch is {epoch}")
    for i, record in enumerate(history):
        w = at(at(where, "history"), i)
        expect_dict(record, w)
        if len(record) > MAX_RECORD_KEYS:
            raise ValidationError(w, f"has {len(record)} keys (at most {MAX_RECORD_KEYS})")
        for k, v in record.items():
            expect_str(k, w, max_len=128)
            _expect_scalar(v, at(w, k))
    sums = ("loss", "correct", "n", "distill", "lr")
    partial = expect_dict(s["partial"], at(where, "partial"), allowed=sums, required=sums if batches else ())
    for k, v in partial.items():
        if not (k == "lr" and v is None) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValidationError(at(at(where, "partial"), k), "must be a number")  # NaN allowed: a diverged run


def _check_identity(doc: dict[str, Any]) -> None:
    keys = ("sha256", "tensors", "source", "passes", "passes_sha256")
    m = expect_dict(doc["model"], "$.model", allowed=keys, required=keys)
    _expect_hex(m["sha256"], "$.model.sha256")
    _expect_hex(m["passes_sha256"], "$.model.passes_sha256")
    for name in ("tensors", "passes"):
        for i, t in enumerate(expect_list(m[name], at("$.model", name))):
            expect_str(t, at(at("$.model", name), i), max_len=1024)
    if m["source"] is not None:
        expect_str(m["source"], "$.model.source", max_len=1 << 16)
    keys = ("name", "classes", "train_images", "val_images", "image_size")  # data_identity's
    d = expect_dict(doc["data"], "$.data", allowed=keys, required=keys)
    expect_str(d["name"], "$.data.name")
    for k in keys[1:]:
        expect_int(d[k], at("$.data", k), lo=0, hi=MAX_ITEMS if k == "classes" else None)


def _check_optimizer(value: Any, where: str) -> None:
    o = expect_dict(value, where, allowed=("kind", "groups", "state"), required=("kind", "groups", "state"))
    expect_str(o["kind"], at(where, "kind"), max_len=128)
    for i, g in enumerate(expect_list(o["groups"], at(where, "groups"), max_len=1024)):
        w = at(at(where, "groups"), i)
        expect_dict(g, w, allowed=("params", "hyper"), required=("params", "hyper"))
        expect_int(g["params"], at(w, "params"), lo=0, hi=MAX_ITEMS)
        for k, v in expect_dict(g["hyper"], at(w, "hyper")).items():
            if isinstance(v, list):
                for j, x in enumerate(expect_list(v, at(at(w, "hyper"), k), max_len=16)):
                    expect_number(x, at(at(at(w, "hyper"), k), j))
            else:
                _expect_scalar(v, at(at(w, "hyper"), k))
    state = expect_dict(o["state"], at(where, "state"))
    if len(state) > MAX_ITEMS:
        raise ValidationError(at(where, "state"), f"has {len(state)} entries (at most {MAX_ITEMS})")
    for k, entry in state.items():
        w = at(at(where, "state"), k)
        if not (k.isdigit() and len(k) <= 9):
            raise ValidationError(w, "must be a parameter index")
        for name, v in expect_dict(entry, w).items():
            _expect_scalar(v, at(w, name), strings=False)


def _check_files(value: Any, where: str) -> None:
    names = (WEIGHTS_FILE, OPTIMIZER_FILE)
    files = expect_dict(value, where, allowed=names, required=names)
    for name in names:
        w = at(where, name)
        entry = expect_dict(files[name], w, allowed=("sha256", "bytes"), required=("sha256", "bytes"))
        _expect_hex(entry["sha256"], at(w, "sha256"))
        expect_int(entry["bytes"], at(w, "bytes"), lo=0)


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The state.json of the checkpoint in ``directory``, every field checked (the tensors are read later)."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise SurgeryError(f"no checkpoint in {directory}; run without --resume to start fresh")
    try:
        size = path.stat().st_size
        if size > MAX_STATE_BYTES:
            raise ValidationError("$", f"is {size} bytes (at most {MAX_STATE_BYTES})")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError("$", "is not UTF-8 text") from None
        doc = parse_json(text, STATE_FILE, max_depth=MAX_STATE_DEPTH)
        if isinstance(doc, dict) and "format" not in doc and "state" in doc:
            raise SurgeryError(f"{directory} holds a checkpoint of an older surgery (with optimizer.pt), which "
                               "cannot be resumed; start without --resume")
        top = ("format", "state", "config", "model", "data", "optimizer", "files")
        expect_dict(doc, "$", allowed=top, required=top)
        expect_str(doc["format"], "$.format", choices=(CHECKPOINT_FORMAT,))
        config = doc["config"] = _check_config(doc["config"], "$.config")  # with the defaults of later keys
        _check_progress(doc["state"], "$.state", config["epochs"])
        _check_identity(doc)
        _check_optimizer(doc["optimizer"], "$.optimizer")
        _check_files(doc["files"], "$.files")
    except ValidationError as exc:
        raise ValidationError(f"{path}: {exc.where}",
                              f"{exc.problem}; this checkpoint cannot be resumed (start without --resume)") from None
    except OSError as exc:
        raise SurgeryError(f"cannot read {path} ({exc.strerror or exc}); start without --resume") from None
    return doc


# --- writing and reading the tensors -----------------------------------------------------------


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer as safetensors tensors (``state.<param index>.<name>``) and JSON (groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        kept = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                kept[name] = value
        scalars[str(index)] = kept
    groups = [{"params": len(g["params"]),
               "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}}
              for g in sd["param_groups"]]
    return tensors, {"kind": type(optimizer).__name__, "groups": groups, "state": scalars}


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
                    identity: dict[str, Any]) -> None:
    """Write one consistent checkpoint (see the notes above); ``identity``: {"config", "model", "data"}."""
    from safetensors.torch import save_file

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-{os.getpid()}-", dir=parent))
    try:
        save_weights(model, tmp / WEIGHTS_FILE)  # contiguous copies: channels_last weights, views
        tensors, optimizer_meta = _split_optimizer(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in (WEIGHTS_FILE, OPTIMIZER_FILE)}
        doc = {"format": CHECKPOINT_FORMAT, "state": asdict(state), **identity, "optimizer": optimizer_meta,
               "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE):
            _fsync(tmp / name)
        _fsync(tmp)  # the contents are on disk before the swap makes them the checkpoint
        replace_dir(tmp, directory)
        _fsync(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(path: Path, model: nn.Module) -> None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    own = model.state_dict()
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                where = f"{path}: tensor {key!r}"
                if key not in own:
                    raise ValidationError(where, "is not a tensor of this model")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(own[key].shape):
                    raise ValidationError(where, f"has shape {shape}, the model's is {tuple(own[key].shape)}")
        model.load_state_dict(fill_ties(model, load_file(str(path))), strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SurgeryError(f"{path} cannot be loaded ({_one_line(exc)}); start without --resume") from None


def _load_optimizer(path: Path, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"{path.parent / STATE_FILE}: $.optimizer"
    if meta["kind"] != type(optimizer).__name__:
        raise ValidationError(at(where, "kind"), f"{meta['kind']} is not this run's {type(optimizer).__name__}")
    fresh = optimizer.state_dict()
    saved_sizes = [g["params"] for g in meta["groups"]]
    sizes = [len(g["params"]) for g in fresh["param_groups"]]
    if saved_sizes != sizes:
        raise ValidationError(at(where, "groups"), f"hold {saved_sizes} parameters, this model's {sizes}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, entry in meta["state"].items():
        if int(key) >= len(params):
            raise ValidationError(at(at(where, "state"), key), f"is no parameter index (0..{len(params) - 1})")
        state[int(key)] = dict(entry)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SurgeryError(f"{path} cannot be loaded ({_one_line(exc)}); start without --resume") from None
    for key, value in tensors.items():
        twhere = f"{path}: tensor {key!r}"
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in state:
            raise ValidationError(twhere, f"is not state.<index>.<name> of a parameter that {STATE_FILE} lists")
        index, name = int(parts[1]), parts[2]
        if name in state[index]:
            raise ValidationError(twhere, f"is also a scalar in {STATE_FILE}")
        if not value.is_floating_point():
            raise ValidationError(twhere, f"has dtype {str(value.dtype).removeprefix('torch.')}, not a float")
        if value.dim() and value.shape != params[index].shape:  # 0-d: a scalar such as Adam's step
            raise ValidationError(twhere, f"has shape {tuple(value.shape)}, parameter {index}'s is "
                                          f"{tuple(params[index].shape)}")
        state[index][name] = value
    try:
        # This run's groups (equal to the saved ones unless --resume-anyway changed an option).
        optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise SurgeryError(f"{path} does not fit this optimizer ({_one_line(exc)}); start without --resume") \
            from None


def load_checkpoint(directory: Path, saved: dict[str, Any], model: nn.Module,
                    optimizer: torch.optim.Optimizer) -> RunState:
    """Load the tensors of the checkpoint whose state.json ``saved`` was read and matched to this run."""
    try:
        for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
            path, want = directory / name, saved["files"][name]
            if not path.is_file():
                raise SurgeryError(f"checkpoint in {directory} lacks {name}; start without --resume")
            if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
                raise SurgeryError(f"{path} does not match the size and sha256 that {STATE_FILE} records "
                                   "(damaged, or from another checkpoint); start without --resume")
        _load_weights(directory / WEIGHTS_FILE, model)
        _load_optimizer(directory / OPTIMIZER_FILE, saved["optimizer"], optimizer)
    except OSError as exc:
        raise SurgeryError(f"cannot read the checkpoint in {directory} ({exc.strerror or exc}); "
                           "start without --resume") from None
    return RunState(**saved["state"])
