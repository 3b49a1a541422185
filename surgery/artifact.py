"""Artifacts on disk: recipe.json + model.safetensors (+ report.json, model.onnx).

Loading never unpickles: the recipe is JSON, the weights are safetensors, and the
architecture is rebuilt by replaying the recipe's passes on the source model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from . import __version__
from .errors import SurgeryError
from .models import LoadedModel, load_state_dict_checked

if TYPE_CHECKING:
    from .pipeline import SurgeryResult

RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
ONNX = "model.onnx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def check_out_dir(out: str | Path, force: bool) -> Path:
    """Refuse to write into a non-empty folder unless ``force``; nothing is written here."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"output {str(out)!r} is a file; choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SurgeryError(f"output folder {str(out)!r} is not empty; choose another --out or add --force")
    return out


def save_state(model: nn.Module, path: Path) -> None:
    """Weights to safetensors (shared tensors stored once, contiguous copies where needed)."""
    from safetensors.torch import save_model

    save_model(model, str(path))


def save_artifact(result: SurgeryResult, out: str | Path, *, onnx: bool = False, force: bool = False) -> Path:
    """Write an `apply` result: recipe.json, model.safetensors, report.json (and model.onnx)."""
    return write_artifact(out, result.model, result.recipe, result.report, onnx=onnx, force=force)


def write_artifact(
    out: str | Path,
    model: nn.Module,
    recipe: dict[str, Any],
    report: dict[str, Any],
    *,
    onnx: bool = False,
    force: bool = False,
    extras: dict[str, Any] | None = None,
    keep: Sequence[str] = (),
) -> Path:
    """Write an artifact into a fresh temporary folder, then move it into place.

    An existing ``out`` is replaced only with ``force``, and only after everything was
    written, so a failure never leaves a half-written artifact or loses the old one.
    ``extras`` are more JSON files (name -> data); ``keep`` names entries of the old
    folder to carry over (a training run's checkpoint/).
    """
    out = check_out_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    input_size = tuple(recipe["input_size"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_state(model, tmp / WEIGHTS)
        recipe = dict(recipe)
        recipe["weights"] = {"file": WEIGHTS, "sha256": _sha256(tmp / WEIGHTS)}
        recipe["versions"] = {"surgery": __version__, "torch": torch.__version__.split("+")[0]}
        write_json(tmp / RECIPE, recipe)
        for name, data in (extras or {}).items():
            write_json(tmp / name, data)
        if onnx:
            from .export import export_onnx, verify_onnx

            export_onnx(model, torch.randn(1, *input_size), tmp / ONNX)
            report["onnx"] = verify_onnx(model, tmp / ONNX, input_size)
            report["onnx"]["path"] = str(out / ONNX)
        write_json(tmp / REPORT, report)
        if out.exists():
            for name in keep:
                if (out / name).exists():
                    (out / name).rename(tmp / name)
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(backup / out.name)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_recipe(directory: str | Path) -> dict[str, Any]:
    """The recipe of an artifact folder, checked for the fields `load` needs."""
    d = Path(directory)
    if not d.is_dir():
        raise SurgeryError(f"artifact folder {str(d)!r} not found; give the --out folder of an earlier run")
    missing = [f for f in (RECIPE, WEIGHTS) if not (d / f).is_file()]
    if missing:
        raise SurgeryError(f"artifact {str(d)!r} lacks {', '.join(missing)}; re-run `surgery apply ... --out`")
    try:
        recipe = json.loads((d / RECIPE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeryError(f"{d / RECIPE} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                           "the artifact is damaged") from None
    from .pipeline import RECIPE_FORMAT

    problems = []
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        problems.append(f"format is not {RECIPE_FORMAT}")
    else:
        if not isinstance(recipe.get("source"), dict):
            problems.append("no source")
        size = recipe.get("input_size")
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
            problems.append("bad input_size")
        steps = recipe.get("passes")
        if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("pass"), str)
                                                  for s in steps):
            problems.append("bad passes list")
        if not isinstance(recipe.get("weights"), dict) or "sha256" not in recipe["weights"]:
            problems.append("no weights checksum")
    if problems:
        raise SurgeryError(f"{d / RECIPE} is damaged ({'; '.join(problems)}); re-run `surgery apply ... --out`")
    return recipe


def load(directory: str | Path, *, base_model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a saved model from recipe.json + model.safetensors, with no pickle anywhere.

    ``base_model`` is needed only for artifacts whose source is a custom nn.Module
    (timm and torchvision sources are rebuilt by name).
    """
    return load_artifact(directory, base_model=base_model).model  # type: ignore[return-value]


def load_artifact(directory: str | Path, *, base_model: nn.Module | None = None) -> LoadedModel:
    """Like :func:`load`, also returning the source and passes, so that passes chain across runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .pipeline import rebuild

    d = Path(directory)
    recipe = read_recipe(d)
    if _sha256(d / WEIGHTS) != recipe["weights"]["sha256"]:
        raise SurgeryError(f"{d / WEIGHTS} does not match the checksum in its recipe; the artifact was "
                           "modified or damaged")
    gm = rebuild(recipe, base_model=base_model)
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise SurgeryError(f"cannot read {d / WEIGHTS} ({exc}); the artifact is damaged") from None
    # save_model stored shared tensors once: fill the aliases back in.
    own = gm.state_dict()
    for key, tensor in own.items():
        if key not in state:
            for other, t in own.items():
                if other in state and t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape:
                    state[key] = state[other]
                    break
    load_state_dict_checked(gm, state, what=str(d / WEIGHTS))
    gm.eval()
    return LoadedModel(gm, tuple(recipe["input_size"]), recipe["source"], list(recipe["passes"]))
