"""Tracing any timm model (or fx-traceable module) to a shape-annotated GraphModule.

Shared graph machinery lives here once; passes import it, never copy it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import operator
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .decompose import decompose
from .errors import SurgeryError
from .inputs import as_tuple

log = logging.getLogger(__name__)

# Tolerance of the check "the traced graph computes what the eager model computes".
TRACE_ATOL = 1e-5
TRACE_RTOL = 1e-5
MAX_LEAF_FALLBACKS = 64


def _is_timm_block(t: type) -> bool:
    return t.__module__.startswith("timm.models.")


def timm_notrace_blocks() -> set[type]:
    """The model blocks timm marks not fx-traceable, often for reasons the graph check settles."""
    try:
        import timm.layers as tl
    except ImportError:
        return set()
    return {t for t in tl.get_notrace_modules() if _is_timm_block(t)}


def block_names(model: nn.Module, types: set[type]) -> list[str]:
    """Names of the submodules of ``model`` of one of ``types``, outermost only."""
    names: list[str] = []
    for name, m in model.named_modules():
        if type(m) in types and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _is_impure(node: fx.Node) -> bool:
    """Dead-code elimination must keep in-place methods (``out.mul_(gain)``) whose result goes unused."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    return node.is_impure()


def _timm_leaf_types() -> tuple[set[type], set[Any]]:
    """Module types and functions timm marks as not fx-traceable, plus our own choices."""
    try:
        import timm.layers as tl
        from timm.layers import drop, norm, norm_act
    except ImportError:  # timm is a dependency, but keep plain torch models working
        return set(), set()
    # timm's own layers it marks not traceable stay leaves; its model blocks (timm.models.*: NormFreeBlock,
    # MobileVitBlock, TinyVitBlock, GPSA...) are traced through where that works: see trace().
    modules = {t for t in tl.get_notrace_modules() if not _is_timm_block(t)}
    # Norm, norm-act and drop layers branch on self.training; tracing through them
    # would freeze eval behaviour into the graph. As leaves they stay modules that
    # fine-tuning can train and passes can recognise.
    for mod in (norm, norm_act, drop):
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__:
                modules.add(obj)
    # timm's Linear (an nn.Linear subclass for AMP) would dissolve into F.linear; as a leaf
    # it stays a module that the passes recognise as a Linear (classifiers of ~10 families).
    modules.add(tl.Linear)
    # Weight-standardized convs (NFNet, BiT) recompute their weight in forward; as leaves prune sees a
    # conv with a per-output gain instead of batch_norm over a reshaped parameter.
    modules.update(getattr(tl, n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                            "ScaledStdConv2dSame") if hasattr(tl, n))
    return modules, set(tl.get_notrace_functions())


class SurgeryTracer(fx.Tracer):
    """fx Tracer that knows timm's untraceable layers and takes extra leaf modules by name."""

    def __init__(self, leaf_names: Iterable[str] = (), leaf_types: Iterable[type] = (),
                 specialize: Iterable[str] = (), inputs: tuple = (), concrete: dict | None = None):
        own_types, functions = _timm_leaf_types()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self.leaf_types = tuple(own_types | set(leaf_types))
        self.leaf_names = set(leaf_names)
        self.surgery_stack: list[str] = []
        # Modules whose `if` on a traced value is decided by the example input's value (their shapes
        # are fixed by it anyway); the count of decisions per module goes to TraceInfo.specialized.
        self.specialize = set(specialize)
        self.decisions: dict[str, int] = {}
        self._inputs, self._concrete = list(inputs), dict(concrete or {})
        self._values: dict[fx.Node, Any] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.decide(obj, super().to_bool))

    def decide(self, obj: fx.Proxy, otherwise: Any) -> Any:
        """The value of ``obj`` where a specialized module needs a plain Python value, else ``otherwise(obj)``."""
        owner = next((n for n in reversed(self.surgery_stack) if n in self.specialize), None)
        if owner is None or not _from_shapes(obj.node):  # a tensor's values decide: never fixed at trace
            return otherwise(obj)
        self.decisions[owner] = self.decisions.get(owner, 0) + 1
        return self._value(obj.node)

    def _value(self, node: fx.Node) -> Any:
        """The node's value on the example input: the graph so far, run in order up to it."""
        with torch.no_grad(), _untraced():
            for n in self.graph.nodes:
                if n in self._values:
                    continue
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self._values[a])
                if n.op == "placeholder":
                    self._values[n] = self._inputs.pop(0) if self._inputs else self._concrete.get(n.target)
                elif n.op == "get_attr":
                    self._values[n] = operator.attrgetter(n.target)(self.root)
                elif n.op == "call_function":
                    self._values[n] = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    self._values[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_module":
                    self._values[n] = self.root.get_submodule(n.target)(*args, **kwargs)
                if n is node:
                    break
        return self._values[node]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if type(m).__module__.startswith("surgery.nn"):  # modules our passes insert stay modules
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        # Track where we are, so a failure can be pinned to the innermost module.
        name = self.path_of_module(m)
        self.surgery_stack.append(name)
        out = super().call_module(m, forward, args, kwargs)
        self.surgery_stack.pop()
        return out


_SHAPE_METHODS = {"size", "dim", "numel", "__len__"}
_SHAPE_ATTRS = {"shape", "ndim"}


def _from_shapes(node: fx.Node, depth: int = 0) -> bool:
    """Whether a traced value is computed from tensor shapes and constants only (never tensor values)."""
    if depth > 64:
        return False
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in _SHAPE_ATTRS
    module = getattr(node.target, "__module__", None)
    if node.target is not len and module not in ("_operator", "operator", "math"):
        return False
    return all(_from_shapes(p, depth + 1) for p in node.all_input_nodes)


def _untraced() -> contextlib.AbstractContextManager:
    """Leave fx's patches (module calls, wrapped functions) while running real values mid-trace."""
    revert = getattr(torch.fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _no_number(obj: fx.Proxy) -> Any:
    raise TypeError(f"{obj} is traced: it has no number value")


class _ValueProxy(fx.Proxy):
    """A Proxy that a specialized module may turn into a number (``math.ceil(H / p)``, ``range(n)``)."""

    def __int__(self) -> int:
        return int(self.tracer.decide(self, _no_number))

    def __index__(self) -> int:
        return int(self.tracer.decide(self, _no_number))

    def __float__(self) -> float:
        return float(self.tracer.decide(self, _no_number))


@dataclass
class TraceInfo:
    """What tracing decided, kept on ``gm.meta['surgery']``."""

    leaf_fallbacks: list[str] = field(default_factory=list)
    decomposed: list[str] = field(default_factory=list)  # library modules rewritten as plain ops
    concrete_args: dict[str, Any] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    specialized: dict[str, int] = field(default_factory=dict)  # module -> `if`s decided by the example input


def _concrete_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Bind optional forward arguments (vit's attn_mask, hiera's mask) to their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())
    bound = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise SurgeryError(
                f"forward() of {type(model).__name__} needs argument {p.name!r} beyond the "
                f"{n_inputs} example input(s); pass it in example_inputs"
            )
        bound[p.name] = p.default
    return bound


def _graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph, name)
    # Placeholders bound by concrete_args keep their default: gm(x) works.
    return gm


def _symbolic_trace(model: nn.Module, leaf_names: set[str], concrete: dict, leaf_types: Iterable[type] = (),
                    specialize: Iterable[str] = (), inputs: tuple = ()) -> tuple[fx.GraphModule, dict[str, int]]:
    tracer = SurgeryTracer(leaf_names, leaf_types, specialize, inputs, concrete)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any failure may be fixed by a leaf
        exc.surgery_module_stack = list(tracer.surgery_stack)  # type: ignore[attr-defined]
        raise
    return _graph_module(tracer.root, graph, type(model).__name__), tracer.decisions


def compare_outputs(a: Any, b: Any) -> float:
    """Max abs difference between two (nested) outputs; inf if their structure differs."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        return (a.detach().float() - b.detach().float()).abs().max().item()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return max((compare_outputs(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return max((compare_outputs(a[k], b[k]) for k in a), default=0.0)
    return 0.0 if a == b else float("inf")


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in the order the exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in output_tensors(o)]
    return []


def output_scale(out: Any) -> float:
    """Largest magnitude in a (nested) output: the scale relative tolerances refer to."""
    return max((t.detach().abs().max().item() for t in output_tensors(out) if t.numel()), default=0.0)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Any) -> Any:
    """Annotate every node with ``meta['tensor_meta']`` (shape, dtype); returns the output."""
    printed = io.StringIO()  # ShapeProp prints a traceback before it re-raises: keep it for the log
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            return ShapeProp(gm).propagate(*as_tuple(example_inputs))
    except Exception:
        log.debug("shape propagation failed:\n%s", printed.getvalue())
        raise


def _drop_cached_proxies(model: nn.Module) -> None:
    """Forget what an earlier trace left in eval-mode caches (TinyViT's and LeViT's attention_bias_cache)."""
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, dict) and any(isinstance(v, fx.Proxy) for v in value.values()):
                for key in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[key]


class _TraceMismatch(Exception):
    pass


def _trace_checked(model: nn.Module, inputs: tuple, eager_out: Any, concrete: dict, leaves: set[str],
                   leaf_types: set[type], verify: bool) -> fx.GraphModule:
    """Trace with leaf fallbacks, shapes on every node, and (``verify``) the output checked against eager."""
    fallbacks: list[str] = []
    specialize: set[str] = set()
    named = dict(model.named_modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        for _ in range(2 * MAX_LEAF_FALLBACKS + 1):
            _drop_cached_proxies(model)
            try:
                gm, decisions = _symbolic_trace(model, leaves, concrete, leaf_types, specialize, inputs)
                break
            except Exception as exc:  # noqa: BLE001
                stack = [n for n in getattr(exc, "surgery_module_stack", []) if n]
                culprit = next((n for n in reversed(stack) if n not in leaves and n in named), None)
                if culprit is None:
                    raise SurgeryError(
                        f"cannot fx-trace {type(model).__name__}: its own forward() is not "
                        f"traceable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    ) from exc
                # Control flow or numbers from a shape: decide them by the example input first, else a leaf.
                if culprit not in specialize:
                    log.info("tracing %s hit control flow (%s); deciding it by the example input", culprit, exc)
                    specialize.add(culprit)
                    continue
                log.info("tracing %s failed (%s); treating it as a leaf", culprit, exc)
                leaves.add(culprit)
                fallbacks.append(culprit)
        else:
            raise SurgeryError(f"cannot fx-trace {type(model).__name__}: too many untraceable submodules")
    gm.eval()
    info = TraceInfo(leaf_fallbacks=fallbacks, decomposed=decompose(gm), concrete_args=concrete,
                     specialized=decisions)
    gm.meta["surgery"] = info
    graph_out = propagate_shapes(gm, inputs)
    if verify:
        diff = compare_outputs(eager_out, graph_out)
        scale = output_scale(eager_out)
        info.max_abs_diff = diff
        if not diff <= TRACE_ATOL + TRACE_RTOL * scale:
            raise _TraceMismatch(
                f"traced graph of {type(model).__name__} differs from the eager model "
                f"(max abs diff {diff:.3g}); this is a bug in the tracer, please report it"
            )
    if fallbacks:
        log.warning("traced with %d untraceable submodule(s) as leaves: %s", len(fallbacks), ", ".join(fallbacks))
    return gm


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[str] = (),
    verify: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` to a GraphModule with shapes on every node.

    The model is deep-copied first (some timm models cache proxies on themselves)
    and traced in eval mode. A submodule that cannot be traced becomes a leaf
    (logged, and listed in ``gm.meta['surgery'].leaf_fallbacks``). With ``verify``
    the graph's output must match the eager output within 1e-5.
    """
    inputs = as_tuple(example_inputs)
    was_training = model.training
    model = copy.deepcopy(model).eval()
    # The eager forward first: it is the reference, and the clearest test of the input size.
    try:
        with torch.no_grad():
            eager_out = model(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the input does not fit
        size = "x".join(str(d) for d in inputs[0].shape[1:]) if isinstance(inputs[0], torch.Tensor) else "?"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SurgeryError(
            f"input {size} does not fit {type(model).__name__} ({reason}); choose another --input-size"
        ) from exc
    concrete = _concrete_args(model, len(inputs))
    # timm's model blocks marked not traceable are traced through first; where the graph then differs from
    # the eager model (an in-place op fx lost), the whole trace is redone with them as leaves.
    blocks = {type(m) for m in model.modules()} & timm_notrace_blocks()
    for leaf_blocks in ([set(), blocks] if blocks else [set()]):
        try:
            gm = _trace_checked(model, inputs, eager_out, concrete, set(leaf_modules), leaf_blocks, verify)
            if leaf_blocks:  # by name, so that a replay (verify=False) traces the same graph
                info = gm.meta["surgery"]
                info.leaf_fallbacks = sorted(set(info.leaf_fallbacks) | set(block_names(model, leaf_blocks)))
            break
        except Exception as exc:  # noqa: BLE001 - the first try's failures all mean: keep timm's leaves
            if leaf_blocks == blocks:
                if isinstance(exc, _TraceMismatch):
                    raise RuntimeError(str(exc)) from None
                raise
            log.info("tracing through %s failed (%s); keeping them as leaves",
                     ", ".join(sorted(t.__name__ for t in blocks)), exc)
    if was_training:
        gm.train()
    return gm


# --- small helpers the passes share -------------------------------------------------


def get_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def set_module(gm: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (parents must exist)."""
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)


def remove_node(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node) -> None:
    """Route every user of ``node`` to ``replacement`` and drop ``node``."""
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Clean up after an edit: drop dead code and unused modules, lint, recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Output shape recorded by :func:`propagate_shapes`, if the node yields one tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
