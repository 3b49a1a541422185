"""Turning a model spec (timm name, torchvision:NAME, artifact DIR) into a model."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SurgeryError
from .recipe import SOURCE_KWARGS, check_source_kwargs

log = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass
class LoadedModel:
    """A model plus what is needed to rebuild it: its source and the passes already applied."""

    model: nn.Module
    input_size: tuple[int, int, int]
    source: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.source.get("name") or self.source.get("class", "model")


def parse_input_size(value: str | tuple | list | int | None) -> tuple[int, int, int] | None:
    """'224', '3x224x224', '224x224' or a tuple -> (C, H, W)."""
    if value is None:
        return None
    if isinstance(value, int):
        value = (value,)
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.lower().replace(",", "x").split("x"))
        except ValueError:
            raise SurgeryError(
                f"bad input size {value!r}; write H, HxW or CxHxW, e.g. 224 or 3x224x224"
            ) from None
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = (3, value[0], value[0])
    elif len(value) == 2:
        value = (3, *value)
    if len(value) != 3 or min(value) < 1:
        raise SurgeryError(f"bad input size {value!r}; write H, HxW or CxHxW with positive numbers")
    return value  # type: ignore[return-value]


def _timm_model(name: str, num_classes: int | None, input_size: tuple | None) -> tuple[nn.Module, dict]:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SurgeryError(f"unknown model {name!r}; {hint}see timm.list_models() or use torchvision:NAME")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_size is not None:
        kwargs["in_chans"] = input_size[0]
    default = timm.get_pretrained_cfg(name)
    default_size = tuple(default.input_size) if default is not None and default.input_size else None
    if input_size is not None and default_size is not None and tuple(input_size[1:]) != default_size[1:]:
        # Models with position embeddings or windows need the size at construction;
        # the others refuse the argument (TypeError) and are built without it.
        kwargs["img_size"] = tuple(input_size[1:])
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        if "img_size" in kwargs and "img_size" in str(exc):
            kwargs.pop("img_size")
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            raise
    except (ValueError, AssertionError, RuntimeError) as exc:
        raise SurgeryError(f"cannot build {name} with {kwargs}: {str(exc).splitlines()[0][:200]}") from None
    if "img_size" in kwargs:
        kwargs["img_size"] = list(kwargs["img_size"])
    return model, {"kind": "timm", "name": name, "kwargs": kwargs}


def _torchvision_model(name: str, num_classes: int | None) -> tuple[nn.Module, dict]:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('torchvision:' + c for c in close)}? " if close else ""
        raise SurgeryError(f"unknown torchvision model {name!r}; {hint}see torchvision.models.list_models()")
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    return model, {"kind": "torchvision", "name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "weights"}}


def build_source(source: dict[str, Any]) -> nn.Module:
    """Rebuild a source model (random weights) from the ``source`` entry of a recipe."""
    kind, name, kwargs = source.get("kind"), source.get("name"), dict(source.get("kwargs", {}))
    if kind in SOURCE_KWARGS:
        check_source_kwargs(kind, kwargs)
    if kind == "timm":
        import timm

        if not isinstance(name, str) or not timm.is_model(name):
            raise SurgeryError(f"recipe names an unknown timm model {name!r}; the recipe is damaged")
        if "img_size" in kwargs:
            kwargs["img_size"] = tuple(kwargs["img_size"])
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:  # a model without img_size (resnet): as _timm_model, build it without
            if "img_size" not in kwargs or "img_size" not in str(exc):
                raise
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise SurgeryError(f"recipe names an unknown torchvision model {name!r}; the recipe is damaged")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise SurgeryError(
        f"recipe source kind {kind!r} cannot be rebuilt from its name; pass the base model: "
        "surgery.load(DIR, base_model=YourModel())"
    )


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if size else DEFAULT_INPUT_SIZE  # type: ignore[return-value]


def source_of(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """Best description of where an in-memory model comes from, for the recipe."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs: dict[str, Any] = {"num_classes": getattr(model, "num_classes", None),
                                  "in_chans": input_size[0]}
        default = cfg.get("input_size")
        if default and tuple(default[1:]) != tuple(input_size[1:]):
            kwargs["img_size"] = list(input_size[1:])
        source = {"kind": "timm", "name": cfg["architecture"],
                  "kwargs": {k: v for k, v in kwargs.items() if v is not None}}
        if _rebuilds(model, source):
            return source
        # Built with kwargs the recipe cannot know (patch_size, depth, ...): load() needs base_model.
        log.info("%s was built with custom arguments; surgery.load will need base_model=", cfg["architecture"])
    cls = type(model)
    return {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _rebuilds(model: nn.Module, source: dict[str, Any]) -> bool:
    """Does ``source`` build ``model``'s architecture? Compared by parameter and buffer shapes, on meta."""
    try:
        with torch.device("meta"):
            rebuilt = build_source(source)
    except Exception:  # noqa: BLE001 - any failure means the recipe could not rebuild it either
        return False
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors or state-dict .pth file into ``model`` (no pickle of code)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"weights file {str(path)!r} not found; check the --weights path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise SurgeryError(
            f"cannot read weights {str(path)!r} ({type(exc).__name__}); is it a safetensors or "
            "state-dict .pth file?"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SurgeryError(f"{str(path)!r} holds no state dict of tensors; save model.state_dict()")
    load_state_dict_checked(model, state, what=str(path))


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str, *,
                            exact_dtype: bool = False) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatched keys.

    Dtypes must match the architecture's: exactly for our artifacts (``exact_dtype``), by kind
    (floating / integer / bool) for a user's weights, which may be stored in half precision.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]

    def same_kind(a: torch.dtype, b: torch.dtype) -> bool:
        return a == b or (not exact_dtype and a.is_floating_point and b.is_floating_point)

    wrong += [f"{k} {state[k].dtype} vs {own[k].dtype}".replace("torch.", "")
              for k in own if k in state and not same_kind(state[k].dtype, own[k].dtype)]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shape or dtype {few(wrong)}")
    if problems:
        raise SurgeryError(
            f"weights {what} do not match the architecture: {'; '.join(problems)}; "
            "check the model name, --num-classes and --input-size"
        )
    model.load_state_dict(state, strict=True)


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    input_size: str | tuple | None = None,
) -> LoadedModel:
    """Load a model from a timm name, ``torchvision:NAME`` or an artifact DIR.

    ``weights`` (safetensors or state-dict .pth) replace the random initial weights.
    The input size defaults to the model's pretrained_cfg (timm) or 3x224x224.
    """
    from . import limits

    if num_classes is not None:
        limits.check_num_classes(num_classes)
    size = parse_input_size(input_size)
    what = f"{spec if isinstance(spec, str) else 'model'}" + (
        f" with --num-classes {num_classes}" if num_classes is not None else "")
    if isinstance(spec, nn.Module):
        model = spec
        size = size or default_input_size(model)
        loaded = LoadedModel(model, size, source_of(model, size))
    elif Path(spec).is_dir() or "/" in spec or spec.startswith("."):
        from .artifact import load_artifact

        if num_classes is not None:
            raise SurgeryError("--num-classes cannot change an artifact; apply it to the source model")
        loaded = load_artifact(spec)
        if size is not None and size != loaded.input_size:
            raise SurgeryError(
                f"artifact {spec} was built for input {loaded.input_size}; use the rescale pass to change it"
            )
    elif spec.startswith("torchvision:"):
        # Sizes are checked on a meta-device build first: nothing allocated if they are too big.
        limits.check_build(lambda: _torchvision_model(spec.split(":", 1)[1], num_classes)[0],
                           size or DEFAULT_INPUT_SIZE, what=what, num_classes=num_classes)
        model, source = _torchvision_model(spec.split(":", 1)[1], num_classes)
        loaded = LoadedModel(model, size or DEFAULT_INPUT_SIZE, source)
    else:
        limits.check_build(lambda: _timm_model(spec, num_classes, size)[0], size, what=what,
                           default_size=default_input_size, num_classes=num_classes)
        model, source = _timm_model(spec, num_classes, size)
        loaded = LoadedModel(model, size or default_input_size(model), source)
    if weights is not None:
        load_weights(loaded.model, weights)
    loaded.model.eval()
    return loaded
