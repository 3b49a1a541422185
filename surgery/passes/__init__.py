"""The pass registry: a name maps to a config dataclass and a pure function.

A pass is ``fn(gm: GraphModule, cfg: Config, ctx: PassContext) -> GraphModule``.
It records what it decided from the weights in ``ctx.plan`` (JSON-able), so that
``surgery.load`` can replay it on fresh weights and rebuild the same architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..errors import SurgeryError


@dataclass
class PassContext:
    """What a pass may read besides the graph and its config."""

    example_inputs: tuple
    plan: dict[str, Any] = field(default_factory=dict)
    replay: bool = False  # True when load() rebuilds: follow ``plan``, decide nothing anew
    notes: list[str] = field(default_factory=list)  # one-line facts for the report
    # One sample's shape ((C, H, W), (F,)...; a tuple of them for several inputs); a pass that changes it sets it.
    input_size: tuple = ()
    data: str | None = None  # the run's --data (digits or a folder): calibration for passes that want it
    norm: tuple[Any, Any] | None = None  # the model's input (mean, std), for calibration images; ImageNet's if None
    where: str = "plan"  # JSON path of ``plan`` in the recipe (``$.passes[2].plan``), for replay's errors
    # Why the pass left the model as it was (nothing to fold, no block to collapse): the report's
    # "no change" line. Whether it changed anything is measured by the pipeline, not claimed here.
    reason: str | None = None
    # What the pass was asked for and what the report's counter must then show (checked by the
    # pipeline, which measures): "kind", "requested", "expected_flops" (after / before), "tolerance",
    # "bound" ("equal" or "at_most"), and "cause" when the pass already knows it falls short.
    target: dict[str, Any] | None = None
    # Recovery (surgery.recover): the fits this pass declares against its input graph (set in replay
    # too), the rows of the fits it ran (the report's table), and for the `recover` pass the
    # pipeline's input graph with the fits of the passes before, composed against it.
    fits: list[Any] = field(default_factory=list)
    recovery: list[dict[str, Any]] = field(default_factory=list)
    source: fx.GraphModule | None = None
    lineage: list[Any] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.notes.append(message)


PassFn = Callable[[fx.GraphModule, Any, PassContext], fx.GraphModule]


@dataclass(frozen=True)
class PassInfo:
    name: str
    config_cls: type
    fn: PassFn
    # The pass changes the input size: modules that compute sizes from the input's shape must stay
    # modules when the graph is traced, so that they follow the new size.
    resizes_input: bool = False

    @property
    def doc(self) -> str:
        return (self.config_cls.__doc__ or "").strip().splitlines()[0]

    def run(self, gm: fx.GraphModule, cfg: Any, ctx: PassContext) -> fx.GraphModule:
        """Run on a copy, so that the pass is pure whatever it does inside."""
        return self.fn(copy.deepcopy(gm), cfg, ctx)


_REGISTRY: dict[str, PassInfo] = {}


def register(name: str, config_cls: type, *, resizes_input: bool = False) -> Callable[[PassFn], PassFn]:
    """Decorator: ``@register("fuse", FuseConfig)`` on the pass function."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config of pass {name!r} must be a dataclass")

    def deco(fn: PassFn) -> PassFn:
        _REGISTRY[name] = PassInfo(name, config_cls, fn, resizes_input)
        return fn

    return deco


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def available() -> dict[str, PassInfo]:
    """All registered passes, by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> PassInfo:
    passes = available()
    if name not in passes:
        close = difflib.get_close_matches(name, passes, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise SurgeryError(f"unknown pass {name!r}; {hint}run `surgery passes` to list them")
    return passes[name]


# --- options: "name:key=value,key=value" <-> config dataclass ------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a string from the CLI, or a JSON value) to the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and value in (None, "none", "None", ""):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SurgeryError as exc:
                errors.append(str(exc))
        raise SurgeryError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if str(choice) == str(value):
                return choice
        raise SurgeryError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (str, list, tuple)):
            raise SurgeryError(f"{where} must be {_type_name(tp)}, got {value!r}")
        items = value.split("+") if isinstance(value, str) else list(value)
        out = [_coerce(v, item, where) for v in items if v != ""]
        return out if origin is list else tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise SurgeryError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise SurgeryError(f"{where} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, float) or value.is_integer() else int("x")
        except (TypeError, ValueError):
            raise SurgeryError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SurgeryError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise SurgeryError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported option type {tp!r} at {where}")


def make_config(name: str, options: dict[str, Any]) -> Any:
    """Build the config of pass ``name`` from raw options, checking names and types."""
    info = get(name)
    hints = typing.get_type_hints(info.config_cls)
    fields = {f.name: f for f in dataclasses.fields(info.config_cls)}
    kwargs = {}
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            known = ", ".join(fields) or "none"
            raise SurgeryError(f"pass {name!r} has no option {key!r}{hint}; its options: {known}")
        kwargs[key] = _coerce(value, hints[key], f"option {name}:{key}")
    try:
        cfg = info.config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SurgeryError(f"pass {name!r}: {exc}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()  # raises SurgeryError with the config's own rules
    return cfg


def parse_spec(spec: str) -> tuple[str, Any]:
    """Parse ``"NAME:key=value,key=value"`` into (name, config)."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise SurgeryError(f"empty pass name in {spec!r}; write NAME or NAME:key=value,...")
    options: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SurgeryError(f"malformed option {item!r} in pass {spec!r}; write key=value")
        options[key.strip()] = value.strip()
    return name, make_config(name, options)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def describe() -> list[dict[str, Any]]:
    """Every pass with its options (name, type, default, doc) for `surgery passes`."""
    out = []
    for name, info in available().items():
        hints = typing.get_type_hints(info.config_cls)
        options = []
        for f in dataclasses.fields(info.config_cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            )
            options.append({
                "name": f.name, "type": _type_name(hints[f.name]),
                "default": default, "doc": f.metadata.get("doc", ""),
            })
        out.append({"name": name, "doc": info.doc, "options": options})
    return out


__all__ = [
    "PassContext", "PassInfo", "register", "available", "get", "parse_spec",
    "make_config", "config_to_dict", "describe",
]
