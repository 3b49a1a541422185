"""Turning a model spec (timm name, torchvision:NAME, artifact DIR) into a model."""

from __future__ import annotations

import difflib
import logging
import re
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
    # How inputs are prepared and what the outputs mean, when known: {"preprocess": {...}, "classes": [...]}
    # (recorded by training and pretrained loaders, carried by artifacts, written into ONNX metadata).
    io: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.source.get("name") or self.source.get("class", "model")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(mean: Any = IMAGENET_MEAN, std: Any = IMAGENET_STD, interpolation: str = "bilinear",
               crop_pct: float | None = None) -> dict[str, Any]:
    """How an image becomes the model's input: RGB, resized (then center-cropped when ``crop_pct``:
    the shorter side to size / crop_pct first), scaled to [0, 1], normalised by mean and std, NCHW.
    Without crop_pct the image is resized to the input size directly, as surgery trains and evaluates."""
    return {"channel_order": "RGB", "layout": "NCHW", "scale": "1/255", "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "interpolation": interpolation,
            "crop_pct": None if crop_pct is None else float(crop_pct)}


def input_norm(loaded: LoadedModel) -> tuple[tuple, tuple]:
    """(mean, std) the model's inputs are normalised with: its recorded preprocessing, else :func:`norm_stats`."""
    pre = loaded.io.get("preprocess") or {}
    if pre.get("mean") and pre.get("std"):
        return tuple(pre["mean"]), tuple(pre["std"])
    return norm_stats(loaded)


def norm_stats(loaded: LoadedModel) -> tuple[tuple, tuple]:
    """Input normalisation of the source model (timm's pretrained_cfg), ImageNet's otherwise."""
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    if loaded.source.get("kind") == "timm":
        import timm

        default = timm.get_pretrained_cfg(loaded.source["name"])
        cfg = default.to_dict() if default is not None else cfg
    return tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)


def _timm_io(model: nn.Module, pretrained: bool) -> dict[str, Any]:
    """timm's pretrained_cfg: its eval transform (with crop_pct) for its weights; its mean and std otherwise."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pre = preprocess(cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD,
                     cfg.get("interpolation") if pretrained and cfg.get("interpolation") in ("bilinear", "bicubic")
                     else "bilinear", cfg.get("crop_pct") if pretrained else None)
    io: dict[str, Any] = {"preprocess": pre}
    if pretrained and getattr(model, "num_classes", None) == 1000:
        try:
            from timm.data import ImageNetInfo

            io["classes"] = list(ImageNetInfo().label_descriptions(as_dict=False))
        except Exception:  # noqa: BLE001 - class names are a convenience, the weights load without them
            pass
    return io


def _torchvision_io(member: Any) -> dict[str, Any]:
    """A torchvision weights entry's own transform and categories."""
    if member is None:
        return {"preprocess": preprocess()}
    t = member.transforms()
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    io: dict[str, Any] = {"preprocess": preprocess(t.mean, t.std, interp if interp in ("bilinear", "bicubic")
                                                   else "bilinear", crop / resize)}
    if member.meta.get("categories"):
        io["classes"] = list(member.meta["categories"])
    return io


IO_KEYS = ("preprocess", "classes")


def io_fields(io: dict[str, Any], outputs: int | None) -> dict[str, Any]:
    """What a recipe records of ``io``: the preprocessing, and the class names where they name every output."""
    out = {k: io[k] for k in ("preprocess",) if io.get(k)}
    if io.get("classes") and outputs == len(io["classes"]):
        out["classes"] = list(io["classes"])
    return out


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


HF_HUB = "hf-hub:"


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _timm_weights_missing(name: str, exc: BaseException) -> SurgeryError:
    """One line for pretrained timm weights that are neither cached nor downloadable: what, and where to."""
    from huggingface_hub import constants

    try:
        import timm

        cfg = None if name.startswith(HF_HUB) else timm.get_pretrained_cfg(name)
        repo = name.removeprefix(HF_HUB) if cfg is None else (cfg.hf_hub_id or cfg.url or name)
    except Exception:  # noqa: BLE001 - the message must come out whatever the name
        repo = name
    folder = Path(constants.HF_HUB_CACHE) / f"models--{str(repo).replace('/', '--')}"
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    return SurgeryError(
        f"pretrained weights for {name} are not in the cache and cannot be downloaded{offline} ({_short(exc)}); "
        f"on a machine with internet run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
        f"and copy {folder} here (HF_HOME sets the cache; HF_HUB_OFFLINE=1 fails fast without a network)")


def _timm_model(name: str, num_classes: int | None, input_size: tuple | None,
                pretrained: bool = False) -> tuple[nn.Module, dict]:
    import timm

    if not name.startswith(HF_HUB) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SurgeryError(f"unknown model {name!r}; {hint}see timm.list_models() or use torchvision:NAME")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if input_size is not None:
        kwargs["in_chans"] = input_size[0]
    default = None if name.startswith(HF_HUB) else timm.get_pretrained_cfg(name)
    default_size = tuple(default.input_size) if default is not None and default.input_size else None
    if input_size is not None and default_size is not None and tuple(input_size[1:]) != default_size[1:]:
        # Models with position embeddings or windows need the size at construction;
        # the others refuse the argument (TypeError) and are built without it.
        kwargs["img_size"] = tuple(input_size[1:])
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            if "img_size" in kwargs and "img_size" in str(exc):
                kwargs.pop("img_size")
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            else:
                raise
    except OSError as exc:  # huggingface_hub's cache misses and network errors are OSErrors
        raise _timm_weights_missing(name, exc) from None
    except RuntimeError as exc:
        if "No pretrained weights exist" in str(exc):
            raise SurgeryError(f"timm has no pretrained weights for {name}; pick a tagged name (timm.list_pretrained"
                               f"('{name.split('.')[0]}*')) or drop --pretrained") from None
        raise SurgeryError(f"cannot build {name} with {kwargs}: {str(exc).splitlines()[0][:200]}") from None
    except (ValueError, AssertionError) as exc:
        raise SurgeryError(f"cannot build {name} with {kwargs}: {str(exc).splitlines()[0][:200]}") from None
    if "img_size" in kwargs:
        kwargs["img_size"] = list(kwargs["img_size"])
    source: dict[str, Any] = {"kind": "timm", "name": name, "kwargs": kwargs}
    if name.startswith(HF_HUB):  # rebuilt by architecture where that gives the same shapes (no hub needed)
        arch = {**source, "name": (getattr(model, "pretrained_cfg", None) or {}).get("architecture", name)}
        if arch["name"] != name and _rebuilds(model, arch):
            source = arch
    if pretrained:
        source["weights"] = {"kind": "timm", "name": name}
    return model, source


def torchvision_weights(name: str, choice: str) -> Any:
    """The weights enum member ``choice`` (IMAGENET1K_V2, DEFAULT) of torchvision model ``name``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise SurgeryError(f"torchvision has no pretrained weights for {name}; drop --pretrained") from None
    members = [m.name for m in enum]
    key = choice.split(".")[-1]  # ResNet50_Weights.IMAGENET1K_V2 or IMAGENET1K_V2
    if key != "DEFAULT" and key not in members:
        raise SurgeryError(f"torchvision {name} has no weights {choice!r}; choose from {', '.join(members)} or DEFAULT")
    return enum[key] if key != "DEFAULT" else enum.DEFAULT


def _torchvision_model(name: str, num_classes: int | None, weights: str | None = None,
                       ) -> tuple[nn.Module, dict, dict]:
    """The model, its source for the recipe, and its io (the weights' transform and categories)."""
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('torchvision:' + c for c in close)}? " if close else ""
        raise SurgeryError(f"unknown torchvision model {name!r}; {hint}see torchvision.models.list_models()")
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    member = torchvision_weights(name, weights) if weights else None
    if member is not None:
        classes = len(member.meta.get("categories") or [])
        if num_classes is not None and num_classes != classes:
            raise SurgeryError(f"torchvision's pretrained {name} has {classes} classes, not {num_classes}: drop "
                               f"--num-classes and add --pass head:num_classes={num_classes}")
        kwargs = {"weights": member}
        try:
            model = torchvision.models.get_model(name, **kwargs)
        except OSError as exc:  # URLError: not cached, no network
            from torch import hub

            file = Path(hub.get_dir()) / "checkpoints" / Path(member.url).name
            raise SurgeryError(f"pretrained weights {name} {member.name} are not in the cache and cannot be "
                               f"downloaded ({_short(exc)}); download {member.url} to {file} (TORCH_HOME sets "
                               "the cache)") from None
    else:
        model = torchvision.models.get_model(name, **kwargs)
    source = {"kind": "torchvision", "name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "weights"}}
    if member is not None:
        source["weights"] = {"kind": "torchvision", "name": f"{type(member).__name__}.{member.name}"}
    return model, source, _torchvision_io(member)


def build_source(source: dict[str, Any]) -> nn.Module:
    """Rebuild a source model (random weights) from the ``source`` entry of a recipe."""
    kind, name, kwargs = source.get("kind"), source.get("name"), dict(source.get("kwargs", {}))
    if kind in SOURCE_KWARGS:
        check_source_kwargs(kind, kwargs)
    if kind == "timm":
        import timm

        if not isinstance(name, str) or not (name.startswith(HF_HUB) or timm.is_model(name)):
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


STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")  # where trainers nest it
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def unwrap_state(state: Any) -> Any:
    """The state dict inside a training checkpoint: nested under a common key, wrapper prefixes off.

    An EMA copy wins over the raw weights (timm's checkpoints keep both; EMA is what it evaluates).
    """
    for _ in range(3):  # {"model": {"state_dict": ...}} and such
        if not isinstance(state, dict) or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        nested = next((state[k] for k in STATE_KEYS if isinstance(state.get(k), dict) and state[k]), None)
        if nested is None:
            break
        state = nested
    if isinstance(state, dict) and state:
        for prefix in STRIPPED_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a safetensors or state-dict .pth file into ``model`` (no pickle of code).

    Reads checkpoints as trainers write them (see :func:`unwrap_state`). Returns where the
    weights came from, for the recipe: the file and its sha256.
    """
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
    state = unwrap_state(state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SurgeryError(f"{str(path)!r} holds no state dict of tensors (looked under "
                           f"{', '.join(STATE_KEYS)}); save model.state_dict()")
    load_state_dict_checked(model, state, what=str(path))
    from .safeio import sha256_file

    return {"kind": "file", "file": str(path), "sha256": sha256_file(path)}


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


def _is_path(spec: str) -> bool:
    """An artifact folder (or a path to one), not a model name."""
    return not spec.startswith(HF_HUB) and (Path(spec).is_dir() or "/" in spec or spec.startswith("."))


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    input_size: str | tuple | None = None,
    pretrained: bool = False,
    batch: int | None = None,
) -> LoadedModel:
    """Load a model from a timm name, ``torchvision:NAME`` or an artifact DIR.

    ``pretrained``: the library's own weights through its own loader and cache (timm: the
    name's tag, e.g. ``resnet50.a1_in1k``, or ``hf-hub:org/name``; torchvision: DEFAULT),
    honouring HF_HUB_OFFLINE, HF_HOME and TORCH_HOME. ``weights``: a safetensors or
    state-dict .pth file (a training checkpoint too), or for torchvision the name of a
    weights enum member (``IMAGENET1K_V2``). The recipe's source records which.
    The input size defaults to the model's pretrained_cfg (timm) or 3x224x224.
    ``batch``: the largest batch the caller will run, for the memory check (default: apply's, 8).
    """
    from . import limits

    batch = limits.BATCH if batch is None else batch
    if num_classes is not None:
        limits.check_num_classes(num_classes)
    size = parse_input_size(input_size)
    what = f"{spec if isinstance(spec, str) else 'model'}" + (
        f" with --num-classes {num_classes}" if num_classes is not None else "")
    tv_weights = None
    if isinstance(spec, str) and spec.startswith("torchvision:"):
        if weights is not None and not Path(weights).exists() and re.fullmatch(r"[A-Za-z0-9_.]+", str(weights)):
            tv_weights, weights = str(weights), None  # an enum member's name, not a file
        elif pretrained:
            tv_weights = "DEFAULT"
        pretrained = False
    if pretrained and (not isinstance(spec, str) or _is_path(spec)):
        raise SurgeryError("--pretrained loads timm or torchvision weights by model name; an artifact or a module "
                           "already has its weights (use --weights FILE for a file)")
    if pretrained and weights is not None:
        raise SurgeryError("give --pretrained or --weights, not both")
    if isinstance(spec, nn.Module):
        model = spec
        size = size or default_input_size(model)
        loaded = LoadedModel(model, size, source_of(model, size),
                             io=_timm_io(model, False) if getattr(model, "pretrained_cfg", None) else {})
    elif _is_path(spec):
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
                           size or DEFAULT_INPUT_SIZE, what=what, num_classes=num_classes, batch=batch)
        model, source, io = _torchvision_model(spec.split(":", 1)[1], num_classes, tv_weights)
        loaded = LoadedModel(model, size or DEFAULT_INPUT_SIZE, source, io=io)
    else:
        limits.check_build(lambda: _timm_model(spec, num_classes, size)[0], size, what=what,
                           default_size=default_input_size, num_classes=num_classes, batch=batch)
        model, source = _timm_model(spec, num_classes, size, pretrained=pretrained)
        loaded = LoadedModel(model, size or default_input_size(model), source, io=_timm_io(model, pretrained))
    if weights is not None:
        loaded.source = {**loaded.source, "weights": load_weights(loaded.model, weights)}
    loaded.model.eval()
    return loaded
