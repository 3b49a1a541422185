"""Artifacts on disk: recipe.json + model.safetensors (+ report.json, model.onnx, report.png / curves.png).

Loading never unpickles: the recipe is JSON, the weights are safetensors, and the
architecture is rebuilt by replaying the recipe's passes on the source model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from . import __version__
from .errors import SurgeryError
from .inputs import normalize
from .models import IO_KEYS, LoadedModel, load_state_dict_checked
from .recipe import RECIPE_FORMAT, read_recipe_file
from .safeio import PARTIAL, check_parent, recover, refuse_symlink, replace_dir, sha256_file
from .validate import ValidationError, parse_json
from .weights import fill_ties, save_weights

if TYPE_CHECKING:
    from .pipeline import SurgeryResult

RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
REPORT = "report.json"
ONNX = "model.onnx"
REPORT_FIGURE = "report.png"
CURVES_FIGURE = "curves.png"

log = logging.getLogger(__name__)


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


# What surgery itself writes into an artifact folder: --force replaces a folder holding only these.
ARTIFACT_ENTRIES = frozenset({RECIPE, WEIGHTS, REPORT, ONNX, ONNX + ".data", "history.json", "checkpoint",
                              REPORT_FIGURE, CURVES_FIGURE})


def _is_our_recipe(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = parse_json(path.read_text(encoding="utf-8"), path.name)
    except (OSError, UnicodeDecodeError, SurgeryError):
        return False
    return isinstance(data, dict) and data.get("format") == RECIPE_FORMAT


def check_out_dir(out: str | Path, force: bool, *, protect: Sequence[str | Path] = ()) -> Path:
    """Refuse an output folder that would lose a user's files; nothing is written here.

    A symlink, ``.``, a folder holding (or inside) one of ``protect`` (the source artifact,
    the data set), a file, or a missing or read-only parent are refused. An existing folder
    is replaced only with ``force``, and only if it is empty or an artifact of ours with
    nothing but our files in it. Leftovers of an interrupted save are recovered first.
    """
    out = Path(out)
    refuse_symlink(out, "--out")
    here = out.absolute()
    if here.resolve() == Path.cwd().resolve():
        raise SurgeryError(f"--out {str(out)!r} is the current folder; choose a new folder for the artifact")
    for p in protect:
        src = Path(p).absolute().resolve()
        if here.resolve() == src or src.is_relative_to(here.resolve()):
            raise SurgeryError(f"--out {str(out)!r} holds the input {str(p)!r}; choose another --out")
    check_parent(out, "--out")
    recover(out)
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"output {str(out)!r} is a file; choose a folder path for --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise SurgeryError(f"output folder {str(out)!r} is not empty; choose another --out or add --force")
    if entries:
        ours = _is_our_recipe(out / RECIPE) or (out / "checkpoint").is_dir()
        if not ours:
            raise SurgeryError(f"{out} is not a surgery artifact; choose another --out "
                               "(--force replaces only an empty folder or an artifact of ours)")
        foreign = [e for e in entries if e not in ARTIFACT_ENTRIES and not e.startswith(".checkpoint")]
        if foreign:
            raise SurgeryError(f"{out} holds files surgery did not write ({', '.join(foreign[:3])}); move them "
                               "or choose another --out")
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def save_artifact(result: SurgeryResult, out: str | Path, *, onnx: bool = False, force: bool = False) -> Path:
    """Write an `apply` result: recipe.json, model.safetensors, report.json (and model.onnx)."""
    from .plots import report_figure, report_panels

    figures = {REPORT_FIGURE: lambda path: report_figure(result.report, path)}
    return write_artifact(out, result.model, result.recipe, result.report, onnx=onnx, force=force,
                          figures=figures if report_panels(result.report) else None)  # measure=False: no numbers


def write_artifact(
    out: str | Path,
    model: nn.Module,
    recipe: dict[str, Any],
    report: dict[str, Any],
    *,
    onnx: bool = False,
    force: bool = False,
    extras: dict[str, Any] | None = None,
    figures: dict[str, Callable[[Path], Any]] | None = None,
    keep: Sequence[str] = (),
) -> Path:
    """Write an artifact into a fresh temporary folder, then move it into place.

    An existing ``out`` is replaced only with ``force``, and only after everything was
    written, so a failure never leaves a half-written artifact or loses the old one.
    ``extras`` are more JSON files (name -> data); ``figures`` draw images (name -> fn(path));
    ``keep`` names entries of the old folder to carry over (a training run's checkpoint/).
    """
    out = check_out_dir(out, force)
    input_size = normalize(recipe["input_size"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL}-{os.getpid()}-", dir=out.absolute().parent))
    try:
        save_weights(model, tmp / WEIGHTS)
        recipe = dict(recipe)
        recipe["weights"] = {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)}
        if onnx:
            from .export import export_and_verify, onnx_metadata

            meta = onnx_metadata(input_size, {k: recipe[k] for k in IO_KEYS if k in recipe}, recipe)
            report["onnx"] = export_and_verify(model, tmp / ONNX, input_size, metadata=meta)
            report["onnx"]["path"] = str(out / ONNX)
            recipe["onnx"] = {"file": ONNX, "sha256": sha256_file(tmp / ONNX)}
        recipe["versions"] = {"surgery": __version__, "torch": torch.__version__.split("+")[0]}
        write_json(tmp / RECIPE, recipe)
        for name, data in (extras or {}).items():
            write_json(tmp / name, data)
        write_json(tmp / REPORT, report)
        for name, draw in (figures or {}).items():
            try:
                draw(tmp / name)
            except Exception as exc:  # noqa: BLE001 - a figure is a view of report.json: never worth the artifact
                log.warning("could not draw %s (%s: %s); report.json has the numbers", name, type(exc).__name__, exc)
        if out.exists():
            for name in keep:  # hard links: the old folder keeps its copy until the swap is done
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.copytree(out / name, tmp / name, symlinks=True, copy_function=_link_or_copy)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_recipe(directory: str | Path) -> dict[str, Any]:
    """The recipe of an artifact folder, validated against the schema before anything is built."""
    d = Path(directory)
    recover(d)
    if not d.is_dir():
        raise SurgeryError(f"artifact folder {str(d)!r} not found; give the --out folder of an earlier run")
    missing = [f for f in (RECIPE, WEIGHTS) if not (d / f).is_file()]
    if missing:
        raise SurgeryError(f"artifact {str(d)!r} lacks {', '.join(missing)}; re-run `surgery apply ... --out`")
    try:
        return read_recipe_file(d / RECIPE)
    except ValidationError as exc:
        raise ValidationError(exc.where, f"{exc.problem} (in {d / RECIPE}: the artifact was modified or "
                                         "damaged; re-run `surgery apply ... --out`)") from None


def _check_file(d: Path, entry: dict[str, Any], where: str) -> Path:
    path = d / entry["file"]
    if not path.is_file():
        raise SurgeryError(f"{path} is missing; the recipe lists it at {where} (re-run the export)")
    if sha256_file(path) != entry["sha256"]:
        raise SurgeryError(f"{path} does not match the sha256 in its recipe ({where}); the artifact was modified "
                           "or damaged")
    return path


def onnx_file(directory: str | Path) -> Path:
    """The artifact's model.onnx, checked against the sha256 in its recipe before any use."""
    d = Path(directory)
    recipe = read_recipe(d)
    if "onnx" not in recipe:
        raise SurgeryError(f"{d} has no ONNX file in its recipe; write one with `surgery apply ... --onnx` "
                           "or `surgery export`")
    return _check_file(d, recipe["onnx"], "$.onnx")


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
    _check_file(d, recipe["weights"], "$.weights")
    try:
        gm = rebuild(recipe, base_model=base_model)
    except ValidationError as exc:
        raise ValidationError(exc.where, f"{exc.problem} (in {d / RECIPE})") from None
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise SurgeryError(f"cannot read {d / WEIGHTS} ({exc}); the artifact is damaged") from None
    load_state_dict_checked(gm, fill_ties(gm, state), what=str(d / WEIGHTS), exact_dtype=True)
    gm.eval()
    return LoadedModel(gm, normalize(recipe["input_size"]), recipe["source"], list(recipe["passes"]),
                       io={k: recipe[k] for k in IO_KEYS if k in recipe})


def verify_artifact(directory: str | Path, *, base_model: nn.Module | None = None) -> dict[str, Any]:
    """Check everything an artifact holds without using it: recipe schema and plans, checksums,
    weight shapes and dtypes against the rebuilt architecture. Raises SurgeryError on the first problem."""
    d = Path(directory)
    loaded = load_artifact(d, base_model=base_model)
    recipe = read_recipe(d)
    result: dict[str, Any] = {
        "path": str(d), "source": loaded.name, "passes": [p["pass"] for p in recipe["passes"]],
        "input_size": recipe["input_size"], "tensors": len(loaded.model.state_dict()),
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "weights_sha256": recipe["weights"]["sha256"],
    }
    if "onnx" in recipe:
        onnx_file(d)
        result["onnx_sha256"] = recipe["onnx"]["sha256"]
    elif (d / ONNX).exists():
        result["onnx_sha256"] = None  # written before checksums were recorded: unchecked
    return result
