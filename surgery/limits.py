"""Memory limits: sizes are checked against an estimate before anything big is allocated.

The limit is ``--max-memory`` (:func:`set_max_memory`), by default this machine's RAM
(:func:`machine_memory`). A run that would need more stops with a one-line SurgeryError
that states the estimate and the limit, instead of being killed by the kernel halfway.

The estimate (bytes; a clear upper-bound style figure, not an exact one)::

    total = 2 x P + P_peak + A_peak

* ``P``: parameters + buffers of the source model, counted on a meta-device build (the
  same builder under ``torch.device("meta")``: no memory behind it) or on the model at hand.
  Three copies live at once: the caller's model, the traced copy, and the pass copy (every
  pass works on a copy, and a recipe's weights are read while the model exists). The pass
  copy is counted at ``P_peak``, the largest size a pass grows it to.
* ``A``: activations: the input plus the output of every leaf module in one meta forward of
  one image, times the batch (:data:`BATCH`: 8, the largest batch surgery runs by itself,
  for latency; :data:`CALIB_BATCH` when a pass calibrates on data; 2 for a recipe replay).
  A sum over all layers, so an upper bound for a no-grad forward. If the meta forward fails,
  :data:`BYTES_PER_INPUT_VALUE` per input value (resnet50 sums 925, convnext_tiny 1300).
* Passes that grow the model before it exists (their config is known):
  rescale ``factor`` (cumulative F > 1): activations x F^2 and k x k conv kernels x F^2;
  ebcle ``widen`` w: params x w^2 (inner channels both sides), activations x w;
  bilinear ``rank`` r, ``scale`` s: a selected layer of d inputs and k outputs costs
  r s (d1 k1 + d2 k2) instead of d k (d = d1 d2, k = k1 k2 as the pass factors them;
  the larger counted) and, for s > 1, its consumer takes s^2 x inputs (counted as s^2 x the
  layer's own d k) and activations x s^2;
  head ``num_classes`` n: + (features + 1) n values.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import SurgeryError

BATCH = 8  # report.LATENCY_BATCHES' largest: the biggest batch apply runs without data
CALIB_BATCH = 32  # data.load_calibration's batch, for passes that calibrate
COPIES = 3  # the original, the traced copy, the pass copy
BYTES_PER_INPUT_VALUE = 1024  # fallback activations per input value (C*H*W) and image
FALLBACK_FEATURES = 4096  # classifier width assumed when a model cannot be built on meta
DEFAULT_HINT = "lower --input-size/--num-classes or raise --max-memory"

_limit: int | None = None  # None: machine_memory()


# --- the limit ---------------------------------------------------------------------------


def machine_memory() -> int:
    """Total RAM in bytes, or the cgroup (container) limit where that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: ask psutil, else assume 16 GiB
        try:
            import psutil

            total = psutil.virtual_memory().total
        except Exception:  # noqa: BLE001 - any failure: a plain default
            total = 16 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:  # "max" or a huge number: no limit
            total = int(text)
    return int(total)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int | float) -> int:
    """'8G', '512M', '1.5GiB', '64k' or a number of bytes -> bytes.

    K, M, G, T alone and KiB... are binary (1024^n, as ``free -g``); KB, MB, GB, TB decimal.
    """
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return int(value)
    m = _SIZE.match(str(value))
    if m is None or float(m.group(1)) <= 0:
        raise SurgeryError(f"bad memory size {value!r}; write a positive number of bytes or one with "
                           "K, M, G or T, e.g. 8G, 512M, 1.5GiB")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), (m.group(3) or "").lower()
    base = 1000 ** ("kmgtp".index(unit) + 1) if unit and suffix == "b" else _UNITS[unit]
    return max(1, int(number * base))


def set_max_memory(value: str | int | None) -> None:
    """Set the process-wide limit (bytes or text for :func:`parse_size`); None: the machine's RAM."""
    global _limit
    _limit = None if value is None else parse_size(value)


def max_memory() -> int:
    """The limit in bytes."""
    return _limit if _limit is not None else machine_memory()


def format_bytes(n: float) -> str:
    """Binary units, one decimal: 39996882944 -> '37.2 GiB'."""
    for power, unit in ((6, "EiB"), (5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1 << (10 * power):
            return f"{n / (1 << (10 * power)):,.1f} {unit}"
    return f"{int(n)} B"


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def check_memory(estimate_bytes: float, what: str, detail: str = "", hint: str = DEFAULT_HINT) -> None:
    """Raise a one-line SurgeryError if ``estimate_bytes`` is over the limit."""
    limit = max_memory()
    if estimate_bytes <= limit:
        return
    where = "--max-memory" if _limit is not None else "--max-memory, default: this machine's RAM"
    detail = f" ({detail})" if detail else ""
    message = (f"{what} needs about {format_bytes(estimate_bytes)}{detail} but the limit is "
               f"{format_bytes(limit)} ({where}); {hint}")
    raise SurgeryError(" ".join(message.split()))  # one line whatever the parts hold


# --- CLI argument types (argparse: exit 2 with the message) -------------------------------


def memory_arg(text: str) -> int:
    import argparse

    try:
        return parse_size(text)
    except SurgeryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def num_classes_arg(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_num_classes(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SurgeryError(f"--num-classes must be >= 1, got {value!r}")


# --- the estimate ------------------------------------------------------------------------


@dataclass
class Estimate:
    """Bytes a run needs, by part (see the module docstring for the formula)."""

    input_size: tuple[tuple[int, ...], ...]  # each input's sample shape
    batch: int
    params: int = 0  # values of parameters + buffers of the source model
    param_bytes: int = 0
    peak_param_bytes: int = 0  # the pass copy, at the largest size a pass grows it to
    activation_bytes: int = 0  # at ``batch``, at the peak of the passes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (COPIES - 1) * self.param_bytes + max(self.peak_param_bytes, self.param_bytes) + self.activation_bytes

    def detail(self) -> str:
        from .inputs import describe

        size = describe(self.input_size)
        grown = self.peak_param_bytes > self.param_bytes
        params = (f"{COPIES - 1} copies of {_count(self.params)} params and buffers + 1 grown by the passes = "
                  if grown else f"{COPIES} copies of {_count(self.params)} params and buffers = ")
        params += format_bytes((COPIES - 1) * self.param_bytes + max(self.peak_param_bytes, self.param_bytes))
        text = (f"estimate: {params}, activations of batch {self.batch} at {size} = "
                f"{format_bytes(self.activation_bytes)}")
        return "; ".join([text, *self.notes])


def _sample_shape(size: Any) -> tuple[tuple[int, ...], ...] | None:
    """Each input's sample shape ((C, H, W) of an image, (F,) of a feature vector; several for a model of
    several inputs) as positive ints, else None (a malformed size is someone else's error to raise)."""
    from .inputs import sample_shapes

    try:
        shapes = sample_shapes(size)
    except (TypeError, ValueError):
        return None
    return shapes if shapes and all(1 <= len(s) <= 5 and min(s) >= 1 for s in shapes) else None


def _values(shapes: tuple[tuple[int, ...], ...]) -> int:
    """Input values of one sample, over every input."""
    return sum(math.prod(s) for s in shapes)


def _tensor_bytes(out: Any) -> int:
    import torch

    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (list, tuple)):
        return sum(_tensor_bytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_tensor_bytes(o) for o in out.values())
    return 0


def meta_twin(model: Any) -> Any:
    """A copy of ``model`` whose parameters and buffers are on the meta device (nothing allocated)."""
    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _dtype(model: Any) -> Any:
    import torch

    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def activation_bytes_per_image(model: Any, input_size: Sequence[Any]) -> int | None:
    """Input + every leaf module's output bytes in one meta forward of one image; None if it fails."""
    import torch

    total = 0

    def hook(_module: Any, _inputs: Any, out: Any) -> None:
        nonlocal total
        total += _tensor_bytes(out)

    was_training = model.training
    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    xs = tuple(torch.empty((1, *s), device="meta", dtype=_dtype(model)) for s in _sample_shape(input_size) or ())
    try:
        model.eval()  # batch norm at batch 1 in training mode refuses 1x1 maps
        with torch.no_grad():
            model(*xs)
    except Exception:  # noqa: BLE001 - data-dependent forwards cannot run on meta: the caller falls back
        return None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total + sum(x.numel() * x.element_size() for x in xs)


def _param_values_bytes(model: Any) -> tuple[int, int]:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def _classifier_features(model: Any) -> int:
    """Inputs of the last Linear or 1x1 conv (the head pass replaces the classifier)."""
    from torch import nn

    features = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            features = m.in_features
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            features = m.in_channels
    return features or FALLBACK_FEATURES


def _kxk_conv_bytes(model: Any) -> int:
    from torch import nn

    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)


def _bilinear_extra_values(model: Any, cfg: Any) -> int:
    """Values the bilinear pass adds over the dense layers it rewrites (0 when it shrinks them)."""
    from .nn.bilinear import factor_pair, padded_size
    from .passes.bilinear import _kind  # the pass's own choice of replaceable layers

    def grid(n: int) -> tuple[int, int]:
        return factor_pair(padded_size(n) if cfg.pad else n)

    extra = 0
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is None or kind not in cfg.targets or any(fnmatch.fnmatchcase(name, p) for p in cfg.skip):
            continue
        d, k = m.weight[0].numel(), m.weight.shape[0]
        if d < cfg.min_features:
            continue
        (d1, d2), (k1, k2) = grid(d), grid(k)
        s = cfg.scale if kind == "linear" else 1
        extra += max(0, cfg.rank * s * (d1 * k1 + d2 * k2) - d * k)
        if s > 1:  # its consumer (an MLP's fc2, about its size) takes s^2 x inputs
            extra += (s * s - 1) * d * k
    return extra


def _pass_growth(model: Any, passes: Iterable[Any], param_bytes: int, act_per_image: int, batch: int,
                 data: bool, replay: bool, notes: list[str]) -> tuple[int, int]:
    """(peak param bytes, peak activation bytes) over the passes, from their configs.

    ``data``: the run has calibration data; ``replay``: a recipe replay, which never calibrates.
    """
    from .passes.bilinear import BilinearConfig
    from .passes.ebcle import EbcleConfig
    from .passes.head import HeadConfig
    from .passes.prune import PruneConfig
    from .passes.recover import RecoverConfig
    from .passes.rescale import RescaleConfig

    elem = 4  # new weights are float32
    params, act, scale = float(param_bytes), float(act_per_image), 1.0
    kxk = None
    peak_params, peak_act = params, act * batch
    for cfg in passes:
        b, grads = batch, 0.0
        if isinstance(cfg, RescaleConfig):
            old = max(1.0, scale) ** 2
            scale *= cfg.factor
            grow = max(1.0, scale) ** 2 / old
            if grow > 1:
                kxk = _kxk_conv_bytes(model) if kxk is None else kxk
                params += kxk * (max(1.0, scale) ** 2 - old)
            act *= cfg.factor ** 2
            if cfg.factor > 1:
                notes.append(f"rescale:factor={cfg.factor:g} x{cfg.factor ** 2:g} activations and k x k kernels")
        elif isinstance(cfg, EbcleConfig):
            if cfg.widen > 1:
                params *= cfg.widen ** 2
                act *= cfg.widen
                notes.append(f"ebcle:widen={cfg.widen:g} up to x{cfg.widen ** 2:g} params")
            if not replay and (data or cfg.data) and cfg.select != "position":
                b = max(b, CALIB_BATCH)
        elif isinstance(cfg, BilinearConfig):
            extra = _bilinear_extra_values(model, cfg) * elem
            params += extra
            if cfg.scale > 1:
                act *= cfg.scale ** 2
            if extra:
                notes.append(f"bilinear rank {cfg.rank} scale {cfg.scale} +{format_bytes(extra)} params")
        elif isinstance(cfg, HeadConfig):
            extra = (_classifier_features(model) + 1) * cfg.num_classes * elem
            params += extra
            notes.append(f"head:num_classes={cfg.num_classes} +{format_bytes(extra)} params")
        elif (isinstance(cfg, PruneConfig) and not replay and (data or cfg.data)
              and cfg.importance == "taylor"):
            b = max(b, CALIB_BATCH)
            grads = params  # a backward: one gradient per weight, while the pass runs
        if not replay and (isinstance(cfg, RecoverConfig) or getattr(cfg, "recover", False)
                           or getattr(cfg, "compensate", False)):
            # Recovery walks the model over all its calibration images at once (surgery.recover).
            b = max(b, getattr(cfg, "calib", CALIB_BATCH))
        peak_params, peak_act = max(peak_params, params + grads), max(peak_act, act * b)
    return int(peak_params), int(peak_act)


def estimate(model: Any, input_size: Sequence[int], *, passes: Iterable[Any] = (), batch: int = BATCH,
             data: bool = False, replay: bool = False) -> Estimate:
    """The estimate for ``model`` (on meta or real; a real one is copied to meta for the forward)."""

    size = _sample_shape(input_size) or ((3, 224, 224),)
    est = Estimate(size, batch)
    est.params, est.param_bytes = _param_values_bytes(model)
    on_meta = all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    twin = model
    if not on_meta:
        try:
            twin = meta_twin(model)
        except Exception:  # noqa: BLE001 - an uncopyable model: the per-pixel fallback below
            twin = None
    per_image = activation_bytes_per_image(twin, size) if twin is not None else None
    if per_image is None:
        per_image = _values(size) * BYTES_PER_INPUT_VALUE
        est.notes.append(f"activations at {BYTES_PER_INPUT_VALUE} B per input value (no meta forward)")
    est.peak_param_bytes, est.activation_bytes = _pass_growth(
        twin if twin is not None else model, passes, est.param_bytes, per_image, batch, data, replay, est.notes)
    return est


def check_input(input_size: Any, what: str, batch: int = BATCH, hint: str = DEFAULT_HINT) -> None:
    """The example batch alone over the limit: refused before anything is built."""
    size = _sample_shape(input_size)
    if size is None:
        return
    need = batch * _values(size) * 4
    from .inputs import describe

    check_memory(need, what, f"the float32 input batch of {batch} x {describe(size)} alone", hint)


def check_model(model: Any, input_size: Any, *, what: str, passes: Iterable[Any] = (), batch: int = BATCH,
                data: bool = False, replay: bool = False, hint: str = DEFAULT_HINT) -> Estimate | None:
    """Estimate for a model that exists (or is on meta) and refuse it if over the limit."""
    if _sample_shape(input_size) is None:
        return None
    check_input(input_size, what, batch, hint)
    est = estimate(model, input_size, passes=passes, batch=batch, data=data, replay=replay)
    check_memory(est.total, what, est.detail(), hint)
    return est


def check_build(build: Callable[[], Any], input_size: Any, *, what: str,
                default_size: Callable[[Any], Any] | None = None, num_classes: int | None = None,
                passes: Iterable[Any] = (), batch: int = BATCH, replay: bool = False,
                hint: str = DEFAULT_HINT) -> Estimate | None:
    """Run ``build`` on the meta device, estimate, refuse if over the limit: before the real build.

    A SurgeryError of the builder (an unknown name) propagates; any other failure on meta
    falls back to the input and a classifier of ``num_classes`` x FALLBACK_FEATURES.
    """
    import torch

    passes = list(passes)
    if input_size is not None:
        check_input(input_size, what, batch, hint)
    try:
        with torch.device("meta"):
            model = build()
    except SurgeryError:
        raise
    except Exception:  # noqa: BLE001 - some constructors need real data: estimate without the model
        size = _sample_shape(input_size) or ((3, 224, 224),)
        est = Estimate(size, batch, notes=[
            "the model does not build on the meta device: params counted for the classifier only, "
            f"activations at {BYTES_PER_INPUT_VALUE} B per input value"])
        est.params = (num_classes or 0) * (FALLBACK_FEATURES + 1)
        est.param_bytes = est.peak_param_bytes = est.params * 4
        est.activation_bytes = batch * _values(size) * BYTES_PER_INPUT_VALUE
        check_memory(est.total, what, est.detail(), hint)
        return est
    if input_size is None and default_size is not None:
        input_size = default_size(model)
    return check_model(model, input_size, what=what, passes=passes, batch=batch, replay=replay, hint=hint)
