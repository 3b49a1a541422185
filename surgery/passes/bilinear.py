"""Pass `bilinear`: replace Linear (and 1x1 / k x k conv) layers by bilinear projections.

Yu et al., "Parameter Efficient Deep Neural Networks with Bilinear Projections" (2021);
the layer is :class:`surgery.nn.BilinearProjection` (design notes: docs/bilinear.md).

* ``init=kron-svd`` starts each layer from the nearest sum of ``rank`` Kronecker
  products to its trained weight (Van Loan-Pitsianis); the report lists each layer's
  relative approximation error. ``init=random`` draws U and V afresh (the paper's
  from-scratch setting).
* ``scale=s`` widens a hidden layer's output grid by s per side (s^2 outputs as many,
  about s times the parameters). The layer's consumer must take the extra outputs: only
  a Linear reached through elementwise ops (activation, dropout, identity, scalar
  arithmetic), as in a transformer MLP's fc1 -> GELU -> fc2. The consumer gets zero
  weights on the new outputs, so the rewritten model starts at the same function as
  at scale 1. The classifier and the consumers of scaled layers (fc2) keep their
  output count; any other selected layer whose output cannot be widened (attention
  projections, layers before a residual add or a norm, convolutions) makes the pass
  refuse with a SurgeryError that names it: skip it, or use scale 1.

The plan records every rewritten layer's structure (kind, sizes, factor grids, rank,
scale, bias, conv geometry) and every widened dense consumer, so that replay rebuilds
the same modules from the plan alone, with random factors that the saved weights
then overwrite. Graph nodes are never touched: modules are swapped in place.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm import layers as timm_layers
from torch import fx, nn

from .. import recover
from ..blocks import find_structure
from ..errors import SurgeryError
from ..graph import finalize, get_module, node_shape, set_module
from ..nn.bilinear import BilinearConv2d, BilinearProjection, _conv_padding, factor_pair, padded_size
from ..recover import Fit
from ..validate import (
    MAX_CHANNELS,
    MAX_RANK,
    ValidationError,
    at,
    expect_dict,
    expect_int,
    expect_list,
    expect_name,
    expect_number,
    expect_str,
)
from . import PassContext, register

TARGETS = ("linear", "conv1x1", "conv")
MAX_LAYER_NOTES = 12  # per-layer note lines; the plan lists every layer


@dataclass
class BilinearConfig:
    """Replace Linear (and 1x1 / kxk conv) layers by bilinear projections U^T X V (fewer params)."""

    targets: list[str] = field(default_factory=lambda: ["linear"], metadata={
        "doc": "layer kinds to rewrite, joined by +: linear, conv1x1, conv (k x k, k > 1)"})
    rank: int = field(default=1, metadata={
        "doc": "Kronecker products summed per layer: closer to the dense weight, r times the params"})
    scale: int = field(default=1, metadata={
        "doc": "widen hidden Linear layers' outputs s^2-fold (about s x params); consumer Linear widened too"})
    init: Literal["kron-svd", "random"] = field(default="kron-svd", metadata={
        "doc": "kron-svd: nearest Kronecker sum to the trained weight; random: fresh U and V"})
    skip: list[str] = field(default_factory=list, metadata={
        "doc": "glob(s) of module names to leave dense, joined by +"})
    min_features: int = field(default=64, metadata={
        "doc": "leave layers with fewer input features (Cin*kh*kw for convs) dense"})
    keep_classifier: bool = field(default=False, metadata={
        "doc": "leave the classifier (the last layer before the output) dense"})
    pad: bool = field(default=False, metadata={
        "doc": "pad sizes that factor badly (primes: d1 = 1) to the nearest size with factors within 2x"})
    recover: bool = field(default=False, metadata={
        "doc": "after init, fit U and V (alternating least squares) so that each layer reproduces the dense "
               "layer's output on calibration images (surgery.recover)"})
    data: str | None = field(default=None, metadata={
        "doc": "calibration images for recover: digits or an ImageFolder path (default: the run's --data)"})
    calib: int = field(default=256, metadata={"doc": "calibration images to use from data"})
    sweeps: int = field(default=12, metadata={"doc": "alternating least-squares sweeps per layer (recover)"})
    steps: int = field(default=200, metadata={
        "doc": "Adam steps of local distillation per residual block holding rewritten layers (recover); "
               "0: layer fits only"})
    seed: int = field(default=0, metadata={"doc": "seed of calibration sampling"})

    def __post_init__(self) -> None:
        # Python callers may write targets="linear+conv1x1" or skip="head*".
        for name in ("targets", "skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.replace(",", "+").split("+") if v.strip()])

    def validate(self) -> None:
        """Raise SurgeryError for values the pass cannot use."""
        if not self.targets:
            raise SurgeryError(f"bilinear: targets is empty; choose from {', '.join(TARGETS)} (joined by +)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise SurgeryError(f"bilinear: unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)} "
                               "(joined by +)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SurgeryError(f"bilinear: rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise SurgeryError(f"bilinear: scale must be an integer >= 1, got {self.scale!r}")
        if self.init not in ("kron-svd", "random"):
            raise SurgeryError(f"bilinear: init must be kron-svd or random, got {self.init!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise SurgeryError(f"bilinear: min_features must be an integer >= 1, got {self.min_features!r}")
        if self.calib < 1 or self.sweeps < 1 or self.steps < 0:
            raise SurgeryError(f"bilinear: calib and sweeps must be >= 1 and steps >= 0, got calib={self.calib}, "
                               f"sweeps={self.sweeps}, steps={self.steps}")


# --- which layers -------------------------------------------------------------------------

_PLAIN_LINEARS = (nn.Linear, timm_layers.Linear)


def _is_plain_linear(m: nn.Module | None) -> bool:
    # timm's Linear only adds an AMP cast under TorchScript: the same function as nn.Linear.
    return m is not None and type(m) in _PLAIN_LINEARS


def _kind(m: nn.Module) -> str | None:
    """linear / conv1x1 / conv for the exact types the pass can replace, else None."""
    if _is_plain_linear(m):
        return "linear"
    # Exact type: subclasses (StdConv2d, Conv2dSame) change the weight or padding in forward().
    if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros":
        if m.kernel_size == (1, 1) and m.padding in ((0, 0), "valid"):
            return "conv1x1"
        if m.kernel_size != (1, 1):
            try:  # 'same' padding with an even kernel is asymmetric
                _conv_padding(m.padding, m.kernel_size, m.dilation, m.stride)
            except ValueError:
                return None
            return "conv"
    return None


# Sizes from the weight: a traced-through Linear is a bare Module with weight (and bias) in a GraphModule.
def _in_features(m: nn.Module) -> int:
    return m.weight[0].numel()


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[0]


def _bias(m: nn.Module) -> torch.Tensor | None:
    return getattr(m, "bias", None)


_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


@dataclass
class _Layers:
    """Where each layer is computed in the graph."""

    calls: dict[str, list[fx.Node]]  # module name -> the nodes that compute it
    functional: dict[fx.Node, str]  # F.linear(x, M.weight, M.bias) node -> M
    direct: set[str]  # modules whose parameters other nodes read with get_attr: not swappable


def _functional_owner(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """M when ``node`` is ``F.linear(x, M.weight, M.bias)`` with M an nn.Linear, else None.

    Linear subclasses outside torch.nn (timm's ``Linear``, used by MobileNetV3 and GhostNet
    classifiers) are traced through and appear in the graph in this form.
    """
    if node.op != "call_function" or node.target not in _LINEAR_FUNCTIONS or len(node.args) < 2:
        return None
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
        return None
    owner = weight.target.removesuffix(".weight")
    # In a GraphModule a traced-through module is a bare Module holding the attributes the graph reads.
    m = gm.get_submodule(owner)
    params = dict(m.named_parameters())
    if (len(weight.users) != 1 or set(params) - {"weight", "bias"} or any(True for _ in m.buffers())
            or any(True for _ in m.children()) or params["weight"].dim() != 2):
        return None
    if bias is None:
        return owner if "bias" not in params else None
    ok = (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{owner}.bias"
          and len(bias.users) == 1 and "bias" in params)
    return owner if ok else None


def _layers(gm: fx.GraphModule) -> _Layers:
    calls: dict[str, list[fx.Node]] = {}
    candidates: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
        elif (owner := _functional_owner(node, gm)) is not None:
            candidates[node] = owner
    # A Linear that is also called as a module, or computed twice, is left alone.
    count = Counter(candidates.values())
    functional = {n: o for n, o in candidates.items() if o not in calls and count[o] == 1}
    calls.update({o: [n] for n, o in functional.items()})
    owned = {n for node in functional for n in node.all_input_nodes if n.op == "get_attr"}
    direct = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr" and n not in owned}
    return _Layers(calls, functional, direct)


def _classifiers(gm: fx.GraphModule, layers: _Layers) -> set[str]:
    """Linear/conv layers whose output reaches the model output through parameter-free ops only."""
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in layers.functional:
            found.add(layers.functional[node])
            continue
        m = get_module(gm, node)
        if m is not None and any(True for _ in m.parameters()):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                found.add(node.target)
            continue  # a norm or any other layer with weights ends the walk
        if node.op in ("placeholder", "get_attr"):
            continue
        stack.extend(node.all_input_nodes)
    return found


# --- widening the consumer of a scaled layer ----------------------------------------------------


def _elementwise_modules() -> tuple[type, ...]:
    types: list[type] = [
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
        nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink,
        nn.Dropout, nn.AlphaDropout, nn.Identity,
    ]
    try:
        from timm.layers import activations

        types += [obj for obj in vars(activations).values()
                  if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == activations.__name__
                  and obj.__name__ != "PReLU"]  # PReLU may have one weight per feature
        from timm.layers import DropPath

        types.append(DropPath)
    except ImportError:
        pass
    return tuple(types)


_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu,
    F.softplus, F.dropout, F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh, torch.erf, torch.clamp,
    operator.mul, operator.truediv, operator.add, operator.sub, operator.neg, torch.mul, torch.div,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "mul", "div", "add", "sub", "clamp", "neg"}


def _only_scalars_besides(node: fx.Node, src: fx.Node) -> bool:
    """``node`` uses ``src`` once and no other tensor (scalars and flags only)."""
    inputs = node.all_input_nodes
    flat = list(node.args) + list(node.kwargs.values())
    return inputs == [src] and sum(a is src for a in flat) == 1


def _consumers(gm: fx.GraphModule, node: fx.Node, layers: _Layers) -> tuple[list[str], str | None]:
    """The Linear modules that take ``node``'s output through elementwise ops, or a reason why not."""
    elementwise = _elementwise_modules()
    consumers: list[str] = []
    stack = [node]
    while stack:
        src = stack.pop()
        if not src.users:
            return [], "its output is unused"
        for user in src.users:
            m = get_module(gm, user)
            if user.op == "output":
                return [], "it feeds the model output"
            linear = (user.target if _is_plain_linear(m) and len(user.args) == 1
                      else layers.functional.get(user))
            if linear is not None and user.args[0] is src:
                if len(layers.calls[linear]) != 1 or linear in layers.direct:
                    return [], f"its consumer {linear} is shared"
                consumers.append(linear)
                continue
            ok = _only_scalars_besides(user, src) and (
                (m is not None and isinstance(m, elementwise))
                or (user.op == "call_function" and user.target in _ELEMENTWISE_FUNCTIONS)
                or (user.op == "call_method" and user.target in _ELEMENTWISE_METHODS))
            if not ok:
                what = (f"{user.target} ({type(m).__name__})" if m is not None
                        else getattr(user.target, "__name__", str(user.target)))
                return [], f"it feeds {what}, which the pass cannot widen"
            stack.append(user)
    return sorted(set(consumers)), None


# --- building the modules -------------------------------------------------------------------------


def _grids(n_in: int, n_out: int, pad: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    return (factor_pair(padded_size(n_in) if pad else n_in),
            factor_pair(padded_size(n_out) if pad else n_out))


def _build(entry: dict[str, Any]) -> nn.Module:
    """A freshly initialised module from a plan entry (replay, and the first step of a rewrite)."""
    common = {"rank": entry["rank"], "bias": entry["bias"], "in_shape": tuple(entry["in_shape"]),
              "out_shape": tuple(entry["out_shape"])}
    if entry["kind"] == "linear":
        return BilinearProjection(entry["in_features"], entry["out_features"], scale=entry["scale"], **common)
    return BilinearConv2d(entry["in_channels"], entry["out_channels"], entry["kernel_size"], entry["stride"],
                          entry["padding"], entry["dilation"], **common)


def _entry(name: str, m: nn.Module, kind: str, cfg: BilinearConfig, *, classifier: bool,
           in_features: int, in_shape: tuple[int, int] | None, scale: int) -> dict[str, Any]:
    """The plan entry of one layer: everything replay needs to rebuild it."""
    n_in, n_out = in_features, _out_features(m)
    grid_in, grid_out = _grids(n_in, n_out, cfg.pad)
    entry: dict[str, Any] = {
        "name": name, "kind": kind, "in_features": n_in, "out_features": n_out,
        "in_shape": list(in_shape or grid_in), "out_shape": list(grid_out),
        "rank": cfg.rank, "scale": scale, "bias": _bias(m) is not None, "classifier": classifier,
    }
    if kind != "linear":
        entry.update(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                     stride=list(m.stride), dilation=list(m.dilation),
                     padding=list(m.padding) if not isinstance(m.padding, str) else m.padding)
    return entry


def _widen(weight: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """A consumer's (out, K) weight spread over ``width`` inputs: column k goes to index[k], zeros elsewhere."""
    wide = weight.new_zeros(weight.shape[0], width)
    wide[:, index] = weight
    return wide


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _fmt_layer(e: dict[str, Any]) -> str:
    what = f"{e['kind']} {e['in_features']}->{e['out_features']}"
    if e["scale"] > 1:
        what += f" x{e['scale']}^2"
    tags = [t for t, on in (("classifier", e["classifier"]), (f"degenerate {'+'.join(e['degenerate'])}",
                                                                    bool(e["degenerate"]))) if on]
    err = f"{e['rel_error']:.3f}" if e.get("rel_error") is not None else "-"
    grid = "{}x{}->{}x{}".format(*e["in_shape"], *(n * e["scale"] for n in e["out_shape"]))
    return (f"{e['name']} ({what}{', ' + ', '.join(tags) if tags else ''}): grid {grid}, params "
            f"{e['params_before']:,} -> {e['params_after']:,}, rel. error {err}")


def _unfit(name: str, kind: str, layers: _Layers) -> str | None:
    """Why the graph keeps layer ``name`` from being swapped whatever the options, or None."""
    nodes = layers.calls[name]
    if name in layers.direct:
        return "weights read directly by the graph"
    if nodes[0] not in layers.functional and any(len(n.args) != 1 or n.kwargs for n in nodes):
        return "called with extra arguments"
    if kind == "conv1x1" and any(len(node_shape(n.args[0]) or ()) != 4 for n in nodes
                                 if isinstance(n.args[0], fx.Node)):
        return "not a 4-D input"
    return None


def _select(gm: fx.GraphModule, cfg: BilinearConfig, layers: _Layers) -> tuple[list[tuple[str, str, bool]], Counter]:
    """(name, kind, is_classifier) of each layer to rewrite, in graph order, and why others stay."""
    classifiers = _classifiers(gm, layers)
    chosen: list[tuple[str, str, bool]] = []
    left: Counter = Counter()
    for name, nodes in layers.calls.items():
        m = gm.get_submodule(name)
        functional = nodes[0] in layers.functional
        kind = "linear" if functional else _kind(m)
        if kind is None or kind not in cfg.targets:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in cfg.skip):
            left["skip"] += 1
        elif name in classifiers and cfg.keep_classifier:
            left["classifier"] += 1
        elif _in_features(m) < cfg.min_features:
            left[f"< {cfg.min_features} input features"] += 1
        elif (why := _unfit(name, kind, layers)) is not None:
            left[why] += 1
        else:
            chosen.append((name, kind, name in classifiers))
    return chosen, left


def _scaled_output(n_out: int, pad: bool, scale: int) -> tuple[int, tuple[int, int], torch.Tensor]:
    """Width, grid and positions of the n_out unscaled outputs of a layer at ``scale``."""
    u1, u2 = factor_pair(padded_size(n_out) if pad else n_out)
    o1, o2 = u1 * scale, u2 * scale
    k = torch.arange(n_out)
    return (n_out if scale == 1 else o1 * o2), (o1, o2), (k // u2) * o2 + k % u2


def _plan(gm: fx.GraphModule, cfg: BilinearConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                             dict[str, torch.Tensor], Counter]:
    """Decide everything from the graph.

    Returns the plan entries of the rewritten layers and of the widened dense consumers,
    the column positions that each widened consumer's weight moves to, and a count of
    the layers left dense by reason.
    """
    layers = _layers(gm)
    chosen, left = _select(gm, cfg, layers)
    scaled: dict[str, list[str]] = {}  # producer -> the consumers to widen
    if cfg.scale > 1:
        reasons = {}
        for name, kind, classifier in chosen:
            if classifier:
                continue  # the classifier keeps its output count: scale 1
            if kind != "linear":
                reason = "it is a convolution (only Linear -> Linear can be widened)"
            elif len(layers.calls[name]) != 1:
                reason = "it is called more than once"
            else:
                consumers, reason = _consumers(gm, layers.calls[name][0], layers)
            if reason is None:
                scaled[name] = consumers
            else:
                reasons[name] = reason
        # The consumer of a scaled layer (an MLP's fc2) takes the wider input and keeps its output count.
        widened_inputs = {c for consumers in scaled.values() for c in consumers}
        refused = [(n, r) for n, r in reasons.items() if n not in widened_inputs]
        if refused:
            listed = "; ".join(f"{n}: {r}" for n, r in refused[:3])
            more = f" (+{len(refused) - 3} more)" if len(refused) > 3 else ""
            raise SurgeryError(
                f"bilinear: scale={cfg.scale} cannot widen {len(refused)} selected layer(s): {listed}{more}. "
                "scale applies to hidden Linear layers feeding a Linear through activations/dropout "
                "(e.g. transformer MLPs' fc1, whose fc2 then takes the wider input); leave the others out "
                "with skip=GLOB+GLOB (and rewrite them in a second bilinear pass) or use scale=1")
        if not scaled:
            selected = ", ".join(name for name, _, _ in chosen[:3]) or "none"
            raise SurgeryError(
                f"bilinear: scale={cfg.scale} widens no layer of this model (selected: {selected}; the "
                "classifier keeps its output count); scale applies to hidden Linear layers feeding a Linear "
                "through activations/dropout, e.g. transformer MLPs' fc1; use scale=1")
    fed: dict[str, tuple[int, tuple[int, int]]] = {}  # consumer -> (width, grid) it now receives
    spread: dict[str, torch.Tensor] = {}  # consumer -> where its old input columns go
    for producer, consumers in scaled.items():
        width, grid, index = _scaled_output(_out_features(gm.get_submodule(producer)), cfg.pad, cfg.scale)
        for consumer in consumers:
            fed[consumer], spread[consumer] = (width, grid), index
    entries = []
    for name, kind, classifier in chosen:
        m = gm.get_submodule(name)
        width, grid = fed.get(name, (_in_features(m), None))
        entry = _entry(name, m, kind, cfg, classifier=classifier, in_features=width, in_shape=grid,
                       scale=cfg.scale if name in scaled else 1)
        if layers.calls[name][0] in layers.functional:
            entry["call"] = "function"  # F.linear(x, M.weight, M.bias) in the graph: becomes a module call
        entries.append(entry)
    chosen_names = {name for name, _, _ in chosen}
    widened = []
    for consumer, (width, _) in fed.items():
        if consumer not in chosen_names:
            m = gm.get_submodule(consumer)
            widened.append({"name": consumer, "in_features": width, "out_features": _out_features(m),
                            "bias": _bias(m) is not None})
    return entries, widened, spread, left


# --- the plan, read back -----------------------------------------------------------------------

_ENTRY_KEYS = {"name", "kind", "in_features", "out_features", "in_shape", "out_shape", "rank", "scale", "bias",
               "classifier", "call", "rel_error", "params_before", "params_after", "degenerate"}
_CONV_KEYS = {"in_channels", "out_channels", "kernel_size", "stride", "dilation", "padding"}
_WIDENED_KEYS = {"name", "in_features", "out_features", "bias"}


def _expect_same(value: Any, where: str, actual: Any, what: str) -> None:
    """A recorded fact about a layer must be the layer's: else the rebuilt module would not fit its weights."""
    if value != actual or type(value) is not type(actual):
        raise ValidationError(where, f"{value!r} does not fit this model: {what} is {actual!r}")


def _check_plan(plan: dict, gm: fx.GraphModule, cfg: BilinearConfig, where: str
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The entries of a replayed plan, checked against the model as `_plan` would have decided them:
    layers the pass can swap, with their sizes, grids, conv geometry and bias, scaled layers whose
    consumers all take the wider input. So the rebuilt modules fit the graph and the saved weights."""
    expect_dict(plan, where, allowed={"layers", "widened"}, required=("layers",))
    layers = _layers(gm)
    names = {name: gm.get_submodule(name) for name in layers.calls}  # the layers the graph computes
    seen: set[str] = set()

    def layer(e: Any, w: str, keys: set[str], required: tuple[str, ...]) -> nn.Module:
        expect_dict(e, w, allowed=keys, required=required)
        name = expect_name(e["name"], at(w, "name"), names, "layer")
        if name in seen:
            raise ValidationError(at(w, "name"), f"layer {name!r} appears twice in the plan")
        seen.add(name)
        m = names[name]
        _expect_same(e["out_features"], at(w, "out_features"), _out_features(m), "its output count")
        _expect_same(e["bias"], at(w, "bias"), _bias(m) is not None, "whether it has a bias")
        return m

    entries = expect_list(plan["layers"], at(where, "layers"))
    widened = expect_list(plan.get("widened", []), at(where, "widened"))
    modules = []
    fed: dict[str, tuple[int, list[int], str]] = {}  # consumer -> (width, grid, where) of a scaled layer
    for i, e in enumerate(entries):
        w = at(at(where, "layers"), i)
        conv = isinstance(e, dict) and e.get("kind") != "linear"
        m = layer(e, w, _ENTRY_KEYS | (_CONV_KEYS if conv else set()),
                  ("name", "kind", "in_features", "out_features", "in_shape", "out_shape", "rank", "scale", "bias"))
        name, function = e["name"], layers.calls[e["name"]][0] in layers.functional
        kind = expect_str(e["kind"], at(w, "kind"), choices=TARGETS)
        if kind != ("linear" if function else _kind(m)):
            raise ValidationError(at(w, "kind"), f"{kind!r} does not fit this model: {name} is a "
                                                 f"{type(m).__name__} the pass rewrites as {_kind(m) or 'nothing'}")
        if (why := _unfit(name, kind, layers)) is not None:
            raise ValidationError(at(w, "name"), f"{name} cannot be rewritten in this model ({why})")
        if "call" in e or function:  # F.linear(x, M.weight, M.bias) must become M(x), or nothing else may
            _expect_same(e.get("call"), at(w, "call"), "function" if function else None, "how the graph computes it")
        expect_int(e["rank"], at(w, "rank"), lo=1, hi=MAX_RANK)
        _expect_same(e["rank"], at(w, "rank"), cfg.rank, "the pass's rank option")
        _expect_same(e["out_shape"], at(w, "out_shape"), list(_grids(_in_features(m), _out_features(m), cfg.pad)[1]),
                     "the grid of its outputs")
        scale = expect_int(e["scale"], at(w, "scale"), lo=1, hi=cfg.scale)
        if scale > 1:
            if scale != cfg.scale:
                raise ValidationError(at(w, "scale"), f"{scale} is neither 1 nor the pass's scale option {cfg.scale}")
            consumers, why = ([], "it is not a linear layer called once") if kind != "linear" or len(
                layers.calls[name]) != 1 else _consumers(gm, layers.calls[name][0], layers)
            if why is not None:
                raise ValidationError(at(w, "scale"), f"{name} cannot be widened in this model: {why}")
            width, grid, _ = _scaled_output(_out_features(m), cfg.pad, scale)
            if width > MAX_CHANNELS:
                raise ValidationError(at(w, "scale"), f"{scale} makes {width} outputs (at most {MAX_CHANNELS})")
            fed.update({c: (width, list(grid), w) for c in consumers})
        if "classifier" in e and not isinstance(e["classifier"], bool):
            raise ValidationError(at(w, "classifier"), "must be true or false")
        for key in ("params_before", "params_after"):
            if key in e:
                expect_int(e[key], at(w, key), lo=0)
        if e.get("rel_error") is not None:
            expect_number(e["rel_error"], at(w, "rel_error"), lo=0.0)
        for j, v in enumerate(expect_list(e.get("degenerate", []), at(w, "degenerate"), max_len=2)):
            expect_str(v, at(at(w, "degenerate"), j), choices=("in", "out"))
        if conv:
            for key in sorted(_CONV_KEYS):
                if key not in e:
                    raise ValidationError(at(w, key), "is missing")
                actual = getattr(m, key)
                _expect_same(e[key], at(w, key), actual if isinstance(actual, (int, str)) else list(actual),
                             f"its {key}")
        modules.append(m)
    # Inputs: the layer's own count, or the wider output of the scaled layer it consumes (an MLP's fc2).
    for i, (e, m) in enumerate(zip(entries, modules)):
        w = at(at(where, "layers"), i)
        width, grid = fed.get(e["name"], (_in_features(m), list(_grids(_in_features(m), _out_features(m),
                                                                         cfg.pad)[0])))[:2]
        _expect_same(e["in_features"], at(w, "in_features"), width, "its input count")
        _expect_same(e["in_shape"], at(w, "in_shape"), grid, f"the grid of its {width} inputs")
    for i, e in enumerate(widened):
        w = at(at(where, "widened"), i)
        m = layer(e, w, _WIDENED_KEYS, tuple(sorted(_WIDENED_KEYS)))
        if e["name"] not in fed:
            raise ValidationError(at(w, "name"), f"{e['name']} takes the output of no scaled layer in this plan")
        _expect_same(e["in_features"], at(w, "in_features"), fed[e["name"]][0], "the width of its scaled input")
    for consumer, (_, _, w) in fed.items():
        if consumer not in seen:  # left narrow, it could not take the scaled layer's output
            raise ValidationError(at(w, "scale"), f"the plan lacks {consumer}, which takes this layer's wider output")
    return entries, widened


@register("bilinear", BilinearConfig)
def bilinear(gm: fx.GraphModule, cfg: BilinearConfig, ctx: PassContext) -> fx.GraphModule:
    """Swap the selected layers for BilinearProjection / BilinearConv2d modules."""
    cfg.validate()
    if ctx.replay:
        entries, widened = _check_plan(ctx.plan, gm, cfg, ctx.where)
        spread: dict[str, torch.Tensor] = {}
        left: Counter = Counter()
    else:
        entries, widened, spread, left = _plan(gm, cfg)
    names = dict(gm.named_modules())
    layers = _layers(gm)
    functional = {owner: node for node, owner in layers.functional.items()}
    # The node computing each rewritten layer, by name before the rewrite: what recovery fits against.
    sources = {e["name"]: layers.calls[e["name"]][0].name for e in entries + widened
               if len(layers.calls.get(e["name"], ())) == 1}
    original = copy.deepcopy(gm) if cfg.recover and not ctx.replay else None
    for e in entries + widened:
        if e["name"] not in names or (e.get("call") == "function" and e["name"] not in functional):
            raise SurgeryError(f"bilinear: the plan names layer {e['name']!r}, which the model lacks; "
                               "the recipe does not belong to this model")
    calls: dict[str, str] = {}  # F.linear nodes turned into module calls: the new node's name
    for w in widened:
        old = gm.get_submodule(w["name"])
        new = nn.Linear(w["in_features"], w["out_features"], w["bias"], device=old.weight.device,
                        dtype=old.weight.dtype)
        if not ctx.replay:
            with torch.no_grad():
                new.weight.copy_(_widen(old.weight, spread[w["name"]], w["in_features"]))
                if _bias(old) is not None:
                    new.bias.copy_(old.bias)
        set_module(gm, w["name"], new)
    for e in entries:
        old = gm.get_submodule(e["name"])
        new = _build(e).to(device=old.weight.device, dtype=old.weight.dtype)
        if not ctx.replay:
            weight = old.weight.detach().reshape(old.weight.shape[0], -1)
            if e["name"] in spread:  # fed by a scaled producer: spread the columns over the wider input
                weight = _widen(weight, spread[e["name"]], e["in_features"])
            e["rel_error"] = new.init_from_dense(weight, _bias(old)) if cfg.init == "kron-svd" else None
            e.update(params_before=_params(old), params_after=_params(new), degenerate=new.degenerate)
        if e.get("call") == "function":  # F.linear(x, M.weight, M.bias) becomes M(x)
            node = functional[e["name"]]
            reads = [n for n in node.all_input_nodes if n.op == "get_attr"]
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(e["name"], (node.args[0],))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            for n in reads:  # M.weight / M.bias: gone with the old module
                gm.graph.erase_node(n)
            calls[e["name"]] = call.name
        set_module(gm, e["name"], new)
    gm = finalize(gm)
    ctx.fits = _fits(gm, entries, sources, calls, cfg.steps)
    if not ctx.replay:
        ctx.plan["layers"] = entries
        ctx.plan["widened"] = widened
        _notes(ctx, entries, widened, left, cfg)
        if original is not None and entries:
            recover.run(original, gm, ctx.fits, ctx, cfg.data, cfg.calib, cfg.seed, "bilinear",
                        recover.Options(sweeps=cfg.sweeps, steps=cfg.steps))
        if not entries:
            kept = ", ".join(f"{n} ({why})" for why, n in left.items())
            ctx.reason = f"no layer matches targets={'+'.join(cfg.targets)}" + (f"; left dense: {kept}" if kept else "")
    return gm


def _fits(gm: fx.GraphModule, entries: list[dict[str, Any]], sources: dict[str, str], calls: dict[str, str],
          steps: int) -> list[Fit]:
    """What recovery fits: each rewritten layer (ALS) and widened consumer (least squares) to its old
    output, the plain layers downstream of them (the classifier) to theirs, and, with ``steps``,
    each residual block that holds rewritten layers to its old output and the last such block with
    what follows it to the old logits (local distillation)."""
    rewritten = {e["name"] for e in entries}
    fits = [Fit(calls.get(name, source), source, "bilinear" if name in rewritten else "linear",
                axis=1 if isinstance(gm.get_submodule(name), BilinearConv2d) else -1)
            for name, source in sources.items()]
    fits += recover.downstream_layers(gm, {f.node for f in fits})
    if steps:
        blocks = [b for b in find_structure(gm).blocks if b.kind == "residual" and rewritten & set(b.modules)]
        fits += [Fit(b.output, b.output, "distill", span=[n for n in b.span if n != b.output], modules=b.modules)
                 for b in blocks]
        # Then the last of them with the layers after it (final norm, classifier) against the logits.
        last = recover.tail(gm, blocks[-1].input) if blocks else None
        if last is not None:
            fits.append(last)
    return fits


def _notes(ctx: PassContext, entries: list[dict[str, Any]], widened: list[dict[str, Any]], left: Counter,
           cfg: BilinearConfig) -> None:
    before = sum(e["params_before"] for e in entries)
    after = sum(e["params_after"] for e in entries)
    kinds = Counter(e["kind"] for e in entries)
    what = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no layers"
    share = f" ({after / before:.2%})" if before else ""
    errors = [e["rel_error"] for e in entries if e.get("rel_error") is not None]
    err = f"; rel. error mean {sum(errors) / len(errors):.3f}, max {max(errors):.3f}" if errors else ""
    kept = ", ".join(f"{n} ({why})" for why, n in left.items())
    ctx.note(f"rewrote {what} (rank {cfg.rank}, scale {cfg.scale}, init {cfg.init}): params {before:,} -> "
             f"{after:,}{share}{err}" + (f"; left dense: {kept}" if kept else ""))
    degenerate = [e["name"] for e in entries if e["degenerate"]]
    if degenerate:
        hint = "" if cfg.pad else "; pad=true pads them to sizes that factor well"
        ctx.note(f"{len(degenerate)} layer(s) have a prime size (d1 = 1, almost dense factor): "
                 f"{', '.join(degenerate[:5])}{' ...' if len(degenerate) > 5 else ''}{hint}")
    if widened:
        ctx.note(f"widened the input of {len(widened)} dense consumer(s): "
                 + ", ".join(f"{w['name']} -> {w['in_features']}" for w in widened[:5]))
    for e in entries[:MAX_LAYER_NOTES]:
        ctx.note(_fmt_layer(e))
    if len(entries) > MAX_LAYER_NOTES:
        ctx.note(f"... {len(entries) - MAX_LAYER_NOTES} more layers in the plan")
