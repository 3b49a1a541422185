"""Progressive-resolution training: the first epochs small, then rescale the kernels to full size.

The schedule of de Gusmão et al. 2016 (methods.md section 1): train a copy of the network
whose kernels and input are shrunk by ``factor`` (pass `rescale`) for ``switch_epoch``
epochs, rescale its kernels back to the full size, and finish at full resolution.

    from surgery.schedule import ProgressiveResize
    history = fit(model, data, cfg, schedule=ProgressiveResize(factor=0.5, switch_epoch=3))

``fit`` consults the schedule at epoch boundaries (see :meth:`ProgressiveResize.begin`,
:meth:`switch_due`, :meth:`switch`). ``model`` is still trained in place: the low-resolution
phase trains a traced, shrunk copy; at the switch its weights, grown back to the source's
kernel sizes exactly, are copied into ``model``, which trains to the end.

What changes at the switch, and what does not:
- the learning-rate schedule is one schedule over all epochs (warm-up, then cosine);
- the optimizer starts fresh at the switch (``reset_optimizer``, the default: it did a
  little better on the benchmark); with ``reset_optimizer=False`` the state (momentum, Adam
  moments) of every parameter whose shape is unchanged is carried over and only the
  rescaled kernels start fresh;
- BatchNorm statistics are carried over (they are per channel: scale-free);
- the data: the low phase sees each image of ``data`` resized (antialiased) to the small
  size after its usual transform, so augmentation and normalisation stay the same.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import Dataset, Subset

from .data import ImageData
from .errors import SurgeryError

log = logging.getLogger(__name__)

LOW, FULL = "low", "full"


@dataclass
class ProgressiveResize:
    """Train ``switch_epoch`` epochs at ``factor`` x resolution with rescaled kernels, then at full size."""

    factor: float = 0.5
    switch_epoch: int = 3
    # Fresh optimizer state at the switch: the better of the two on the digits benchmark
    # (docs/rescale.md: +0.6 points top-1 over carrying it, within the seed-to-seed spread).
    reset_optimizer: bool = True
    mode: Literal["bilinear", "bicubic", "area"] = "bicubic"
    min_kernel: int = 1
    # False: the control without the paper's idea: the unchanged model sees small images first
    # (plain progressive resizing; needs a model that accepts any input size).
    rescale_kernels: bool = True
    # Set by begin()/switch(): where the run stands.
    full_size: int = field(default=0, init=False)
    low_size: int = field(default=0, init=False)
    switched: bool = field(default=True, init=False)
    switch_seconds: float = field(default=0.0, init=False)
    carried: dict[str, int] = field(default_factory=dict, init=False)
    at_switch: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not (self.factor > 0 and self.factor != 1):
            raise SurgeryError(f"--rescale must be a positive factor other than 1, got {self.factor}")
        if self.switch_epoch < 0:
            raise SurgeryError(f"--rescale-epochs must be >= 0, got {self.switch_epoch}")

    # --- what fit() calls -----------------------------------------------------------------------

    def begin(self, model: nn.Module, data: ImageData, start_epoch: int = 0) -> tuple[nn.Module, ImageData]:
        """The module to train first and its data: the shrunk copy, or ``model`` once past the switch.

        ``start_epoch`` is the number of epochs already done (a resumed run): a checkpoint
        taken at or after the switch holds the full-size model.
        """
        self.full_size = data.image_size
        self.switched = start_epoch >= self.switch_epoch
        if self.switched:
            self.low_size = self._low_size()
            return model, data
        if not self.rescale_kernels:
            self.low_size = self._low_size()
            return model, resized_data(data, self.low_size)
        small = self.shrink(model, self._input_size(data))
        self.low_size = small.meta["rescale_input_size"][1]
        log.info("progressive resize: epochs 1-%d at %dx%d with rescaled kernels, then %dx%d",
                 self.switch_epoch, self.low_size, self.low_size, self.full_size, self.full_size)
        return small, resized_data(data, self.low_size)

    def switch_due(self, epochs_done: int) -> bool:
        """True when the run must switch to full size now (after ``epochs_done`` epochs)."""
        return not self.switched and epochs_done >= self.switch_epoch

    def switch(self, net: nn.Module, model: nn.Module, data: ImageData, optimizer: torch.optim.Optimizer,
               new_optimizer: Any) -> tuple[nn.Module, ImageData, torch.optim.Optimizer]:
        """Grow ``net``'s kernels back into ``model``; returns (model, full data, its optimizer).

        ``new_optimizer(module)`` builds a fresh optimizer (fit's make_optimizer with its config).
        """
        from .train import evaluate

        t0 = time.perf_counter()
        if not self.rescale_kernels:
            fresh = new_optimizer(model) if self.reset_optimizer else optimizer
            self.carried = {"carried": 0 if self.reset_optimizer else len(optimizer.state), "fresh": 0}
            self.switched = True
            self.switch_seconds = time.perf_counter() - t0
            self.at_switch = _val(evaluate(model, data))
            return model, data, fresh
        grown = self.grow(net)
        copy_weights(grown, model)
        fresh = new_optimizer(model)
        if self.reset_optimizer:
            self.carried = {"carried": 0, "fresh": len(list(model.parameters()))}
        else:
            self.carried = carry_optimizer_state(optimizer, net, fresh, model)
        self.switched = True
        self.switch_seconds = time.perf_counter() - t0
        # How much of the low phase carries over, before any full-size step (a diagnostic: not timed).
        self.at_switch = _val(evaluate(model, data))
        log.info("progressive resize: switched to %dx%d in %.1fs (optimizer state %s)", self.full_size,
                 self.full_size, self.switch_seconds,
                 "reset" if self.reset_optimizer else f"carried for {self.carried['carried']} tensors, "
                 f"fresh for {self.carried['fresh']}")
        return model, data, fresh

    def finish(self, net: nn.Module, model: nn.Module) -> None:
        """A run that stopped before the switch still leaves its (grown) weights in ``model``."""
        if not self.switched and net is not model:
            copy_weights(self.grow(net), model)
        self.switched = True

    def record(self, epoch: int) -> dict[str, Any]:
        """What the history says of epoch ``epoch`` (0-based): its phase, image size, the switch."""
        low = epoch < self.switch_epoch
        out: dict[str, Any] = {"phase": LOW if low else FULL, "image_size": self.low_size if low else self.full_size}
        if epoch == self.switch_epoch:
            out["switch"] = True
            out["switch_seconds"] = self.switch_seconds
            out.update({f"{k}_at_switch": v for k, v in self.at_switch.items()})
        return out

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """A distillation teacher sees full-size images, also during the low phase."""
        if x.shape[-1] == self.full_size or not self.full_size:
            return x
        return F.interpolate(x, size=(self.full_size, self.full_size), mode="bilinear", align_corners=False)

    # --- the two rescalings ----------------------------------------------------------------------

    def shrink(self, model: nn.Module, input_size: tuple[int, int, int]) -> fx.GraphModule:
        """A traced copy of ``model`` with kernels and input rescaled by ``factor`` (on CPU)."""
        from .models import LoadedModel
        from .passes.rescale import RescaleConfig
        from .pipeline import apply

        src = copy.deepcopy(model).cpu()
        loaded = LoadedModel(src, input_size, {"kind": "module", "class": type(model).__name__})
        result = apply(loaded, [RescaleConfig(factor=self.factor, mode=self.mode, min_kernel=self.min_kernel)],
                       measure=False)
        gm = result.model
        gm.meta["rescale_input_size"] = result.input_size
        for note in result.report["passes"][-1]["notes"]:
            log.info("rescale: %s", note)
        return gm.to(_device_of(model))

    def grow(self, net: nn.Module) -> fx.GraphModule:
        """``net`` (a shrunk GraphModule) with its kernels back at the source sizes (on CPU)."""
        from .models import LoadedModel
        from .passes.rescale import META_KEY, RescaleConfig
        from .pipeline import apply

        if not isinstance(net, fx.GraphModule) or META_KEY not in net.meta:
            raise SurgeryError("progressive resize: the low-resolution model lost its rescale record; "
                               "cannot grow it back")
        src = copy.deepcopy(net).cpu().eval()
        size = tuple(net.meta["rescale_input_size"])
        loaded = LoadedModel(src, size, {"kind": "module", "class": "progressive"})
        result = apply(loaded, [RescaleConfig(factor=1 / self.factor, mode=self.mode, min_kernel=self.min_kernel)],
                       measure=False)
        if result.input_size[1:] != (self.full_size, self.full_size):
            raise SurgeryError(f"progressive resize: growing back gave {result.input_size}, not the full size "
                               f"{self.full_size}")
        return result.model

    def _low_size(self) -> int:
        from .passes.rescale import _round

        return _round(self.full_size * self.factor)

    def _input_size(self, data: ImageData) -> tuple[int, int, int]:
        x = data.val[0][0]  # val: a deterministic transform, no random draw
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise SurgeryError("progressive resize needs a data set of CHW image tensors")
        return (int(x.shape[0]), data.image_size, data.image_size)


def _val(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k in ("val_top1", "val_loss")}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --- weights and optimizer state across the switch ---------------------------------------------------------


def copy_weights(grown: nn.Module, model: nn.Module) -> None:
    """Copy every tensor of ``grown`` into ``model`` by name; both must agree on every shared shape."""
    own = model.state_dict()
    state = grown.state_dict()
    unknown = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if unknown or wrong:
        raise SurgeryError(f"progressive resize: the grown model does not fit the original "
                           f"({', '.join((unknown + wrong)[:3])}); this model cannot train progressively")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def carry_optimizer_state(old: torch.optim.Optimizer, old_net: nn.Module, new: torch.optim.Optimizer,
                          new_net: nn.Module) -> dict[str, int]:
    """Give ``new`` the per-parameter state of ``old``, matched by parameter name and shape."""
    names = {id(p): n for n, p in old_net.named_parameters()}
    params = dict(new_net.named_parameters())
    carried = fresh = 0
    for p_old, st in old.state.items():
        p_new = params.get(names.get(id(p_old), ""))
        if p_new is None or p_new.shape != p_old.shape:
            fresh += 1
            continue
        new.state[p_new] = {k: (v.detach().clone().to(p_new.device) if torch.is_tensor(v) and v.dim() else
                                v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        carried += 1
    return {"carried": carried, "fresh": fresh}


# --- data at the low size --------------------------------------------------------------------------------


class _Resized(Dataset):
    def __init__(self, dataset: Dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)[0], y


def _resized(dataset: Dataset, size: int) -> Dataset:
    if isinstance(dataset, Subset):
        return Subset(_resized(dataset.dataset, size), dataset.indices)
    transform = getattr(dataset, "transform", None)
    if transform is not None:
        from torchvision.transforms import v2

        # Same type (so the loader's worker choice is the same), one more step at the end:
        # resizing after Normalize equals resizing before it (the weights sum to 1).
        out = copy.copy(dataset)
        out.transform = v2.Compose([transform, v2.Resize((size, size), antialias=True)])  # type: ignore[attr-defined]
        return out
    return _Resized(dataset, size)


def resized_data(data: ImageData, size: int) -> ImageData:
    """``data`` with every image resized to ``size`` x ``size`` after its usual transform."""
    return ImageData(data.name, _resized(data.train, size), _resized(data.val, size), data.classes, size)


def phase_summary(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Epochs, seconds and images/s of each phase of a history (all of it is one phase without a schedule)."""
    out: dict[str, dict[str, float]] = {}
    for h in history:
        p = out.setdefault(h.get("phase", FULL), {"epochs": 0, "seconds": 0.0, "images": 0.0,
                                                  "image_size": h.get("image_size", 0)})
        p["epochs"] += 1
        p["seconds"] += h["seconds"]
        p["images"] += h["images_per_s"] * h["seconds"]
    for p in out.values():
        p["images_per_s"] = p["images"] / max(p["seconds"], 1e-9)
        del p["images"]
    return out


def schedule_report(schedule: ProgressiveResize | None, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What an artifact's report.json says of a schedule (nothing without one)."""
    if schedule is None:
        return {}
    return {"schedule": {"kind": "progressive_resize", "factor": schedule.factor,
                         "switch_epoch": schedule.switch_epoch, "reset_optimizer": schedule.reset_optimizer,
                         "mode": schedule.mode, "rescale_kernels": schedule.rescale_kernels,
                         "optimizer_state": schedule.carried,
                         "phases": phase_summary(history)}}
