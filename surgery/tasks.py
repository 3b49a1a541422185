"""The jobs users run: train a baseline, fine-tune a rewritten model, evaluate.

Each joins a model spec, a data set and the training loop, and writes an artifact
(recipe.json + model.safetensors + history.json + report.json) that `surgery.load`
and every other verb accept.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .artifact import check_out_dir, write_artifact
from .checkpoint import CHECKPOINT_DIR, STATE_FILE
from .data import ImageData, load_data
from .errors import SurgeryError
from .models import LoadedModel, input_norm, io_fields, load_model, norm_stats, preprocess
from .recipe import RECIPE_FORMAT
from .safeio import recover
from .schedule import ProgressiveResize, schedule_report
from .train import (
    TrainConfig,
    check_head,
    evaluate,
    fit,
    seed_everything,
    setup_distributed,
)

log = logging.getLogger(__name__)

HISTORY = "history.json"
# SGD at 0.01 wrecked a BN-folded resnet18 on digits (98% -> 17% val top-1); 0.001 kept 98%.
FINETUNE_LR = 1e-3
DIGITS_SIZE = 32


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, float]
    out: Path | None
    seconds: float


def _square(input_size: tuple[int, ...]) -> int:
    if input_size[1] != input_size[2]:
        raise SurgeryError(f"training needs a square input size, got {input_size[1]}x{input_size[2]}")
    return input_size[1]


def data_for(spec: str, loaded: LoadedModel, *, limit: int | None = None, seed: int = 0) -> ImageData:
    """The data set at the model's input size and normalisation."""
    mean, std = input_norm(loaded)
    return load_data(spec, image_size=_square(loaded.input_size), mean=mean, std=std, limit=limit, seed=seed)


def _inputs(*specs: Any) -> list[Path]:
    """Paths a run reads (a data folder, an artifact, weights): its --out must never replace them."""
    return [Path(s) for s in specs if isinstance(s, (str, Path)) and s != "digits" and Path(s).exists()]


def _prepare_out(out: str | Path | None, *, force: bool, resume: bool, protect: Sequence[Path] = ()) -> Path | None:
    if out is None:
        if resume:
            raise SurgeryError("--resume needs the --out folder of the interrupted run")
        return None
    out = Path(out)
    if resume:
        d = setup_distributed()
        if d.main:
            recover(out / CHECKPOINT_DIR)  # a save killed between its two renames left the checkpoint aside
        if d.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if not (out / CHECKPOINT_DIR / STATE_FILE).is_file():
            raise SurgeryError(f"{out} holds no checkpoint to resume; run without --resume")
        return out
    check_out_dir(out, force, protect=protect)
    return out


def _finish(loaded: LoadedModel, model: nn.Module, data: ImageData, cfg: TrainConfig, history: list, out: Path | None,
            seconds: float, kind: str, extra_report: dict | None = None, keep_checkpoints: bool = False,
            ) -> TrainResult:
    """Evaluate, and write the finished run's artifact: the final weights; the resumable checkpoint (optimizer
    state included) only with ``keep_checkpoints`` - a finished run needs none, the swap removes it."""
    metrics = history[-1] if history else evaluate(model, data)
    metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
    if out is not None and setup_distributed().main:
        # Trained here: inputs as this data pipeline prepares them, outputs named by the data's classes.
        mean, std = norm_stats(loaded)
        io = {"preprocess": preprocess(mean, std), "classes": list(data.classes)}
        recipe = {"format": RECIPE_FORMAT, "source": loaded.source, "input_size": list(loaded.input_size),
                  "passes": loaded.passes, **io_fields(io, len(data.classes))}
        report = {"task": kind, "model": loaded.name, "data": data.name, "metrics": metrics, "seconds": seconds,
                  "config": asdict(cfg), **(extra_report or {})}
        from .artifact import CURVES_FIGURE
        from .plots import curves_figure

        figures = {CURVES_FIGURE: lambda path: curves_figure(history, path, f"{kind} {loaded.name} on {data.name}")}
        write_artifact(out, model, recipe, report, force=True, extras={HISTORY: history},
                       figures=figures if history else None, keep=[CHECKPOINT_DIR] if keep_checkpoints else [])
        log.info("saved %s", out)
    return TrainResult(model, history, metrics, out, seconds)


def train(
    model: str | nn.Module | LoadedModel,
    data: str = "digits",
    cfg: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    num_classes: int | None = None,
    input_size: str | tuple | None = None,
    weights: str | Path | None = None,
    pretrained: bool = False,
    resume: bool = False,
    resume_anyway: bool = False,
    force: bool = False,
    limit: int | None = None,
    schedule: ProgressiveResize | None = None,
    protect: Sequence[str | Path] = (),
    keep_checkpoints: bool = False,
) -> TrainResult:
    """Train a model (a timm name, torchvision:NAME, an nn.Module or an artifact) on ``data``.

    On `digits` the input defaults to 32x32 and the classifier to the data's 10 classes.
    ``schedule`` (ProgressiveResize) trains the first epochs at low resolution with rescaled kernels.
    ``resume`` continues the run in ``out``; ``resume_anyway`` (implies it) also with other options.
    ``keep_checkpoints`` keeps ``out/checkpoint`` (optimizer state) after the run finished.
    """
    cfg = cfg or TrainConfig()
    resume = resume or resume_anyway
    out = _prepare_out(out, force=force, resume=resume, protect=[*_inputs(model, data, weights), *protect])
    seed_everything(cfg.seed)  # the random initial weights: equal runs start equal
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, str) and not Path(model).is_dir():
        if input_size is None and data == "digits":
            input_size = DIGITS_SIZE
        if num_classes is None:
            num_classes = _class_count(data)
        loaded = load_model(model, weights=weights, num_classes=num_classes, input_size=input_size,
                            pretrained=pretrained)
    else:
        loaded = load_model(model, weights=weights, input_size=input_size, pretrained=pretrained)
    dataset = data_for(data, loaded, limit=limit, seed=cfg.seed)
    check_head(loaded.model, dataset, loaded.input_size)
    t0 = time.perf_counter()
    history = fit(loaded.model, dataset, cfg, out_dir=out, resume=resume, resume_anyway=resume_anyway,
                  schedule=schedule, model_info=_model_info(loaded))
    return _finish(loaded, loaded.model, dataset, cfg, history, out, time.perf_counter() - t0, "train",
                   schedule_report(schedule, history), keep_checkpoints=keep_checkpoints)


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
    """What a checkpoint records of the model besides its tensors: a resume must bring the same."""
    return {"source": loaded.source, "passes": loaded.passes}


def _class_count(data: str) -> int:
    if data == "digits":
        return 10
    from .data import _folder_splits

    root = Path(data)
    if not root.is_dir():
        load_data(data)  # raises the one-line error
    return len(_folder_splits(root, 0.2, 0)[0])


def finetune(
    model: str | nn.Module | LoadedModel,
    data: str = "digits",
    cfg: TrainConfig | None = None,
    *,
    teacher: str | nn.Module | LoadedModel | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    resume_anyway: bool = False,
    force: bool = False,
    limit: int | None = None,
    schedule: ProgressiveResize | None = None,
    protect: Sequence[str | Path] = (),
    keep_checkpoints: bool = False,
) -> TrainResult:
    """Fine-tune an artifact (or model) on ``data``, distilling from ``teacher`` when given."""
    cfg = cfg or TrainConfig(epochs=3, lr=FINETUNE_LR, warmup_epochs=0.0)
    resume = resume or resume_anyway
    out = _prepare_out(out, force=force, resume=resume, protect=[*_inputs(model, data, teacher), *protect])
    seed_everything(cfg.seed)  # a model built here from a name starts from seeded random weights
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    dataset = data_for(data, loaded, limit=limit, seed=cfg.seed)
    check_head(loaded.model, dataset, loaded.input_size)
    teacher_model = None
    if teacher is not None:
        teacher_model = teacher.model if isinstance(teacher, LoadedModel) else (
            teacher if isinstance(teacher, nn.Module) else load_model(teacher).model)
        teacher_model = copy.deepcopy(teacher_model)
        check_head(teacher_model, dataset, loaded.input_size)
    before = evaluate(loaded.model, dataset)
    t0 = time.perf_counter()
    history = fit(loaded.model, dataset, cfg, teacher=teacher_model, out_dir=out, resume=resume,
                  resume_anyway=resume_anyway, schedule=schedule, model_info=_model_info(loaded))
    return _finish(loaded, loaded.model, dataset, cfg, history, out, time.perf_counter() - t0, "finetune",
                   {"before": before, "teacher": teacher if isinstance(teacher, str) else None,
                    **schedule_report(schedule, history)}, keep_checkpoints=keep_checkpoints)


def compare_accuracy(models: dict[str, LoadedModel], data: str, *, limit: int | None = None) -> dict[str, Any]:
    """Top-1, top-5 and loss of each model on the same val split of ``data``, each at its own input size.

    A model whose classifier does not fit the data's classes gets ``{"skipped": why}``.
    """
    out: dict[str, Any] = {"data": data}
    for label, loaded in models.items():
        try:
            out[label] = evaluate_model(loaded, data, limit=limit)
        except SurgeryError as exc:  # check_head: the head does not fit the data
            out[label] = {"skipped": str(exc)}
    return out


def evaluate_model(model: str | nn.Module | LoadedModel, data: str = "digits", *, batch_size: int = 256,
                   limit: int | None = None) -> dict[str, float]:
    """Top-1, top-5 and loss of a model or artifact on the val split of ``data``."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    dataset = data_for(data, loaded, limit=limit)
    check_head(loaded.model, dataset, loaded.input_size)
    return evaluate(loaded.model, dataset, batch_size=batch_size)
