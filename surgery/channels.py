"""Coupled channel groups of a traced model, found from the shapes on its fx graph.

Every dimension of every tensor in the graph gets a *layout* that says which channels
its positions carry:

- ``Leaf``: a channel space, created by a producer (the output channels of a conv or
  linear layer, one axis of a parameter read by ``get_attr``). Spaces that must be
  pruned together are merged (union-find): a residual add, a norm layer, a depthwise
  conv, a broadcast squeeze-excite multiply.
- ``Prod``: positions that enumerate several spaces row-major, e.g. a flatten before a
  Linear (channels x pixels), the qkv projection of attention (q/k/v x heads x
  head_dim), the channels of a grouped conv (groups x width).
- ``Cat``: a concatenation (densenet), or a space refined by a split or slice.
- ``Fixed``: positions that are not channels (batch, pixels, tokens) or can never be
  pruned.

A free (unbound, not fixed) root space is a **group**: choose which of its indices to
keep, and :meth:`ChannelGraph.apply` slices every parameter, updates module attributes
(in_channels, groups, num_features, normalized_shape...) and the size constants in the
graph (reshape sizes such as attention's num_heads, split sizes, slice bounds).

Anything the builder does not understand fixes every space it touches, with a reason:
it never guesses. The builder holds no policy (importance, ratios, heads on/off); it
exposes tags ("heads", "head_dim", "group_width") so that a pass can choose.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

# --- layouts -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """Positions that are not (prunable) channels."""

    size: int


@dataclass(frozen=True)
class Leaf:
    """A channel space (resolve it through the union-find of its ChannelGraph)."""

    id: int
    size: int


@dataclass(frozen=True)
class Prod:
    """Row-major product of layouts: position = ((i0 * n1) + i1) * n2 + i2 ..."""

    parts: tuple
    size: int


@dataclass(frozen=True)
class Cat:
    """Concatenation of layouts."""

    parts: tuple
    size: int


Layout = Fixed | Leaf | Prod | Cat


@dataclass(frozen=True)
class Member:
    """One axis of one parameter or buffer that is indexed by a layout.

    ``role`` says what the axis does: "out" (a producer's output: conv/linear rows and
    biases), "in" (a consumer's input columns), "norm" (a norm layer's affine scale or
    shift), "stat" (running statistics), "param" (a tensor read by get_attr: layer
    scale, position embedding, class token, weights of functional calls).
    """

    param: str
    axis: int
    layout: Layout
    role: str


@dataclass
class Group:
    """A set of coupled channels: keep the same indices in every member."""

    id: int
    size: int
    anchor: str  # stable name: "<param>:<axis><path>" of its first member
    prunable: bool
    reasons: list[str]
    tags: set[str]
    multiplicity: int  # fewest positions one channel occupies along a parameter axis
    members: list[Member] = field(default_factory=list)


# Modules and functions that act on each channel separately (same shape in and out).
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ConstantPad2d,
)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp,
    torch.neg, torch.square, torch.erf, torch.pow,
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "relu", "relu_", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt", "clamp", "clamp_", "clamp_min",
    "clamp_max", "neg", "pow", "square", "erf", "masked_fill", "where",
}
_SAME_AS_SELF_METHODS = {"contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to",
                         "type_as", "type"}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var"}
_RESHAPES = {"reshape", "view"}
_SHAPE_CHANGES = {"flatten", "squeeze", "unsqueeze"}


def _timm_types() -> dict[str, tuple[type, ...]]:
    try:
        from timm.layers import activations, drop, norm, norm_act
    except ImportError:  # plain torch models keep working
        return {"bn": (), "ln_last": (), "ln_c": (), "gn": (), "elementwise": ()}

    def get(mod: Any, *names: str) -> tuple[type, ...]:
        return tuple(getattr(mod, n) for n in names if hasattr(mod, n))

    acts = tuple(t for t in vars(activations).values()
                 if isinstance(t, type) and issubclass(t, nn.Module) and t.__module__ == activations.__name__
                 and t.__name__ != "PReLU")
    return {
        "bn": get(norm_act, "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d") + get(
            norm, "FrozenBatchNorm2d"),
        "ln_last": get(norm, "LayerNorm", "RmsNorm", "SimpleNorm", "LayerNormFp32", "RmsNormFp32",
                       "SimpleNormFp32") + get(norm_act, "LayerNormAct", "RmsNormAct", "LayerNormActFp32",
                                               "RmsNormActFp32"),
        "ln_c": get(norm, "LayerNorm2d", "RmsNorm2d", "SimpleNorm2d", "LayerNorm2dFp32", "RmsNorm2dFp32",
                    "SimpleNorm2dFp32", "LayerNormExp2d") + get(norm_act, "LayerNormAct2d", "RmsNormAct2d",
                                                                "LayerNormAct2dFp32", "RmsNormAct2dFp32"),
        "gn": get(norm, "GroupNorm", "GroupNorm1") + get(norm_act, "GroupNormAct", "GroupNorm1Act"),
        "elementwise": acts + get(drop, "DropPath", "DropBlock2d"),
    }


_TIMM = _timm_types()
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm) + _TIMM["bn"]
_LN_LAST_TYPES = (nn.LayerNorm, nn.RMSNorm) + _TIMM["ln_last"]
_LN_C_TYPES = _TIMM["ln_c"]
_GN_TYPES = (nn.GroupNorm,) + _TIMM["gn"]


def _conv_types() -> tuple[type, ...]:
    types: list[type] = [nn.Conv1d, nn.Conv2d, nn.Conv3d]
    try:
        import timm.layers as tl
    except ImportError:
        return tuple(types)
    # Weight standardization is per output row: pruning outputs is exact; pruning inputs recomputes
    # each row's mean and std over the kept inputs (a change, like any pruning of live channels).
    names = ("Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
    return tuple(types + [getattr(tl, n) for n in names if hasattr(tl, n)])


_CONV_TYPES = _conv_types()
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


def _is_elementwise_module(m: nn.Module) -> bool:
    # Exact types throughout: a subclass may override forward() and do anything.
    return type(m) in _ELEMENTWISE_MODULES or type(m) in _TIMM["elementwise"]


def _acts_ok(m: nn.Module) -> bool:
    """A norm-act layer's extra parts (act, drop) must act per channel."""
    return all(_is_elementwise_module(sub) for name, sub in m.named_children() if name in ("act", "drop"))


def _is_stochastic_depth(fn: Any) -> bool:
    """torchvision.ops.stochastic_depth (an fx leaf in torchvision's ConvNeXt, EfficientNet, Swin blocks)."""
    return getattr(fn, "__name__", None) == "stochastic_depth" and \
        str(getattr(fn, "__module__", "")).startswith("torchvision.ops")


def _is_timm_window_op(fn: Any) -> bool:
    """timm's swin-style window_partition / window_reverse (fx leaves): they move pixels, not channels."""
    return (callable(fn) and getattr(fn, "__name__", "") in ("window_partition", "window_reverse")
            and getattr(fn, "__module__", "").startswith("timm.models."))


def _is_torchvision_swin_op(fn: Any, name: str) -> bool:
    """One of the functions torchvision's Swin wraps as fx leaves (shifted_window_attention, ...)."""
    return getattr(fn, "__name__", None) == name and \
        getattr(fn, "__module__", "") == "torchvision.models.swin_transformer"


def einsum_parts(node: fx.Node) -> tuple[list[str], str, list[Any]] | None:
    """(input subscripts, output subscripts, operands) of a ``torch.einsum`` node with an explicit
    output and no ellipsis; else None."""
    if not node.args or not isinstance(node.args[0], str):
        return None
    eq = node.args[0].replace(" ", "")
    operands = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
        else list(node.args[1:])
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    specs = ins.split(",")
    if len(specs) != len(operands) or not all(s.isalpha() for s in specs + [out] if s):
        return None
    return specs, out, operands


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tuple_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (list, tuple)) and meta and all(hasattr(m, "shape") for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _flat_nodes(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: out.append(n))
    return out


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _ranges(indices: Iterable[int]) -> str:
    """Compact text of sorted indices: "0-3,5,7-9" (read back by validate.expect_ranges)."""
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


format_ranges = _ranges


class _Unsupported(Exception):
    """The builder cannot map this node: fix what it touches."""


class ChannelGraph:
    """Channel layouts of every tensor of a shape-annotated GraphModule, and their groups."""

    MAX_REASONS = 3

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._parent: list[int] = []
        self._size: list[int] = []
        self._fixed: list[bool] = []
        self._reasons: list[list[str]] = []
        self._tags: list[set[str]] = []
        self._binding: dict[int, Layout] = {}
        self.dims: dict[str, list[Layout]] = {}  # node name -> layout of each dim
        self.tuples: dict[str, list[list[Layout]]] = {}  # node name -> per item dims
        self.scalars: dict[str, tuple[str, int]] = {}  # shape-derived int -> (node, dim)
        # a channel count divided by a literal (channel shuffle's channels per group) -> (node, dim, divisor)
        self.quotients: dict[str, tuple[str, int, int]] = {}
        self.shapes: dict[str, tuple[str, list[int]]] = {}  # shape tuple -> (node, dims)
        self.members: list[Member] = []
        self.modules: dict[str, tuple[str, dict[str, Layout]]] = {}  # name -> (kind, ports)
        self.edits: list[tuple[str, str, dict[str, Any]]] = []  # node name, kind, data
        self.compute: list[tuple[str, str]] = []  # (node name, kind) of FLOP-bearing nodes
        self._module_ports: dict[str, dict[str, Layout]] = {}
        self._attr_dims: dict[str, list[Layout]] = {}
        self.unsupported: list[str] = []  # "node (target)" the builder could not map
        self._build()

    # --- union-find and layout algebra ------------------------------------------------

    def new_leaf(self, size: int, tags: Iterable[str] = ()) -> Layout:
        if size <= 1:
            return Fixed(size)
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._fixed.append(False)
        self._reasons.append([])
        self._tags.append(set(tags))
        return Leaf(len(self._parent) - 1, size)

    def find(self, i: int) -> int:
        root = i
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[i] != root:
            self._parent[i], i = root, self._parent[i]
        return root

    def resolve(self, layout: Layout) -> Layout:
        """Normal form: leaves are roots, bindings substituted, products/concats flattened."""
        if isinstance(layout, Fixed):
            return layout
        if isinstance(layout, Leaf):
            root = self.find(layout.id)
            if root in self._binding:
                return self.resolve(self._binding[root])
            return Leaf(root, layout.size)
        if isinstance(layout, Prod):
            parts: list[Layout] = []
            for p in layout.parts:
                p = self.resolve(p)
                sub = p.parts if isinstance(p, Prod) else (p,)
                for q in sub:
                    if q.size == 1:
                        continue
                    if isinstance(q, Fixed) and parts and isinstance(parts[-1], Fixed):
                        parts[-1] = Fixed(parts[-1].size * q.size)
                    else:
                        parts.append(q)
            return _mk(Prod, parts, layout.size)
        parts = []
        for p in layout.parts:
            p = self.resolve(p)
            sub = p.parts if isinstance(p, Cat) else (p,)
            for q in sub:
                if q.size == 0:
                    continue
                if isinstance(q, Fixed) and parts and isinstance(parts[-1], Fixed):
                    parts[-1] = Fixed(parts[-1].size + q.size)
                else:
                    parts.append(q)
        return _mk(Cat, parts, layout.size)

    def roots(self, layout: Layout) -> list[int]:
        layout = self.resolve(layout)
        if isinstance(layout, Leaf):
            return [layout.id]
        if isinstance(layout, (Prod, Cat)):
            return [r for p in layout.parts for r in self.roots(p)]
        return []

    def fix(self, layout: Layout, reason: str) -> None:
        """Never prune any channel of ``layout``."""
        for r in self.roots(layout):
            if not self._fixed[r]:
                self._fixed[r] = True
            if len(self._reasons[r]) < self.MAX_REASONS and reason not in self._reasons[r]:
                self._reasons[r].append(reason)

    def tag(self, layout: Layout, tag: str) -> None:
        for r in self.roots(layout):
            self._tags[r].add(tag)

    def _bind(self, root: int, layout: Layout, why: str) -> None:
        if root in self.roots(layout) or layout.size != self._size[root]:
            self.fix(Leaf(root, self._size[root]), why)
            self.fix(layout, why)
            return
        self._binding[root] = layout
        for r in self.roots(layout):
            self._tags[r] |= self._tags[root]
        if self._fixed[root]:
            for reason in self._reasons[root] or [why]:
                self.fix(layout, reason)

    def unify(self, a: Layout, b: Layout, why: str) -> None:
        """Positions of ``a`` and ``b`` carry the same channels."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        if a.size != b.size:
            self.fix(a, f"size mismatch at {why}")
            self.fix(b, f"size mismatch at {why}")
            return
        if isinstance(a, Fixed) or isinstance(b, Fixed):
            reason = f"meets non-channel positions at {why}"
            self.fix(a, reason)
            self.fix(b, reason)
            return
        if isinstance(a, Leaf) and isinstance(b, Leaf):
            ra, rb = a.id, b.id
            self._parent[rb] = ra
            self._fixed[ra] = self._fixed[ra] or self._fixed[rb]
            for reason in self._reasons[rb]:
                if len(self._reasons[ra]) < self.MAX_REASONS and reason not in self._reasons[ra]:
                    self._reasons[ra].append(reason)
            self._tags[ra] |= self._tags[rb]
            return
        if isinstance(a, Leaf):
            self._bind(a.id, b, why)
            return
        if isinstance(b, Leaf):
            self._bind(b.id, a, why)
            return
        if isinstance(a, Cat) or isinstance(b, Cat):
            # Refine both sides at the union of their boundaries, then pair segments; a
            # product is cut along its outer factor (slice fixes it where it cannot be).
            cuts = sorted(set().union(*(_bounds(c) for c in (a, b) if isinstance(c, Cat))))
            pa = [self.slice(a, s, e, why) for s, e in zip(cuts, cuts[1:])]
            pb = [self.slice(b, s, e, why) for s, e in zip(cuts, cuts[1:])]
            for x, y in zip(pa, pb):
                self.unify(x, y, why)
            return
        # Prod vs Prod: pair runs of factors whose products agree.
        ia = ib = 0
        while ia < len(a.parts) and ib < len(b.parts):
            ja, jb = ia + 1, ib + 1
            sa, sb = a.parts[ia].size, b.parts[ib].size
            while sa != sb:
                if sa < sb and ja < len(a.parts):
                    sa *= a.parts[ja].size
                    ja += 1
                elif sb < sa and jb < len(b.parts):
                    sb *= b.parts[jb].size
                    jb += 1
                else:
                    break
            xa, xb = a.parts[ia:ja], b.parts[ib:jb]
            if sa != sb or (len(xa) > 1 and len(xb) > 1):
                self.fix(a, f"incompatible factors at {why}")
                self.fix(b, f"incompatible factors at {why}")
                return
            self.unify(_mk(Prod, xa, sa), _mk(Prod, xb, sb), why)
            ia, ib = ja, jb

    def slice(self, layout: Layout, start: int, stop: int, why: str) -> Layout:
        """The layout of positions [start, stop), refining leaves as needed."""
        layout = self.resolve(layout)
        if start == 0 and stop == layout.size:
            return layout
        if stop <= start:
            return Fixed(0)
        if isinstance(layout, Fixed):
            return Fixed(stop - start)
        if isinstance(layout, Leaf):
            pieces = [self.new_leaf(n, self._tags[layout.id])
                      for n in (start, stop - start, layout.size - stop) if n > 0]
            self._bind(layout.id, _mk(Cat, pieces, layout.size), why)
            return pieces[1] if start > 0 else pieces[0]
        if isinstance(layout, Cat):
            out, offset = [], 0
            for p in layout.parts:
                s, e = max(start, offset), min(stop, offset + p.size)
                if s < e:
                    out.append(self.slice(p, s - offset, e - offset, why))
                offset += p.size
            return self.resolve(_mk(Cat, out, stop - start))
        inner = layout.size // layout.parts[0].size
        if start % inner == 0 and stop % inner == 0:
            head = self.slice(layout.parts[0], start // inner, stop // inner, why)
            return self.resolve(_mk(Prod, (head,) + layout.parts[1:], stop - start))
        self.fix(layout, f"slice across a product at {why}")
        return Fixed(stop - start)

    def factor(self, layout: Layout, sizes: list[int], why: str) -> list[Layout]:
        """Split a layout into row-major factors of the given sizes (a reshape)."""
        layout = self.resolve(layout)
        nz = [s for s in sizes if s != 1]
        if len(nz) <= 1:
            return [layout if s != 1 else Fixed(1) for s in sizes]
        if isinstance(layout, Fixed):
            return [Fixed(s) for s in sizes]
        if isinstance(layout, Leaf):
            leaves = [self.new_leaf(s) for s in nz]
            self._bind(layout.id, _mk(Prod, leaves, layout.size), why)
            parts = iter(self.resolve(x) for x in leaves)
            return [next(parts) if s != 1 else Fixed(1) for s in sizes]
        if isinstance(layout, Prod):
            out: list[Layout] = []
            parts, i, j = list(layout.parts), 0, 0
            ok = True
            while j < len(nz) and ok:
                if i >= len(parts):
                    ok = False
                    break
                p = parts[i]
                if p.size == nz[j]:
                    out.append(p)
                    i, j = i + 1, j + 1
                elif p.size < nz[j]:
                    k, acc = i, 1
                    while k < len(parts) and acc < nz[j]:
                        acc *= parts[k].size
                        k += 1
                    if acc != nz[j]:
                        ok = False
                        break
                    out.append(self.resolve(_mk(Prod, parts[i:k], acc)))
                    i, j = k, j + 1
                else:
                    k, acc = j, 1
                    while k < len(nz) and acc < p.size:
                        acc *= nz[k]
                        k += 1
                    if acc != p.size:
                        ok = False
                        break
                    out.extend(self.factor(p, nz[j:k], why))
                    i, j = i + 1, k
            if ok and i == len(parts):
                it = iter(out)
                return [next(it) if s != 1 else Fixed(1) for s in sizes]
        if isinstance(layout, Cat) and nz[0] == len(layout.parts) and len({p.size for p in layout.parts}) == 1:
            # Equal parts stacked along the outer factor (q, k, v biases concatenated): the
            # outer dim selects a part, the inner dims are shared by all of them.
            for p in layout.parts[1:]:
                self.unify(layout.parts[0], p, why)
            inner = iter(self.factor(layout.parts[0], nz[1:], why))
            out = [Fixed(nz[0])] + list(inner)
            it = iter(out)
            return [next(it) if s != 1 else Fixed(1) for s in sizes]
        self.fix(layout, f"reshape that splits channels irregularly at {why}")
        return [Fixed(s) for s in sizes]

    # --- queries after building -------------------------------------------------------

    def atoms(self, layout: Layout) -> dict[int, np.ndarray]:
        """For each root space in ``layout``: the index in it of every position (-1: none)."""
        layout = self.resolve(layout)
        if isinstance(layout, Fixed):
            return {}
        if isinstance(layout, Leaf):
            return {layout.id: np.arange(layout.size)}
        out: dict[int, np.ndarray] = {}
        if isinstance(layout, Cat):
            offset = 0
            for p in layout.parts:
                for r, c in self.atoms(p).items():
                    arr = out.setdefault(r, np.full(layout.size, -1, dtype=np.int64))
                    arr[offset:offset + p.size] = c
                offset += p.size
            return out
        sizes = [p.size for p in layout.parts]
        for i, p in enumerate(layout.parts):
            inner, outer = math.prod(sizes[i + 1:]), math.prod(sizes[:i])
            for r, c in self.atoms(p).items():
                out[r] = np.tile(np.repeat(c, inner), outer)
        return out

    def keep_mask(self, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Which positions of ``layout`` survive when each group keeps ``keep[id]`` (bool)."""
        mask = np.ones(layout.size, dtype=bool)
        for r, c in self.atoms(layout).items():
            if r in keep:
                valid = c >= 0
                mask[valid] &= keep[r][c[valid]]
        return mask

    def kept(self, layout: Layout, counts: dict[int, int]) -> int:
        """Positions of ``layout`` left when group ``id`` keeps ``counts[id]`` channels."""
        layout = self.resolve(layout)
        if isinstance(layout, Fixed):
            return layout.size
        if isinstance(layout, Leaf):
            return counts.get(layout.id, layout.size)
        if isinstance(layout, Prod):
            return math.prod(self.kept(p, counts) for p in layout.parts)
        return sum(self.kept(p, counts) for p in layout.parts)

    def new_shape(self, node: str, counts: dict[int, int]) -> tuple[int, ...]:
        return tuple(self.kept(d, counts) for d in self.dims[node])

    def groups(self) -> list[Group]:
        """Every root space: prunable groups and the ones left whole (with reasons)."""
        members: dict[int, list[Member]] = {}
        anchors: dict[int, str] = {}
        mult: dict[int, int] = {}
        for m in self.members:
            for r, path in self._paths(m.layout, ""):
                members.setdefault(r, []).append(m)
                anchors.setdefault(r, f"{m.param}:{m.axis}{path}")
        for m in self.members:  # layer widths, not activation dims (heads are a batch-like dim there)
            self._multiplicity(self.resolve(m.layout), 1, mult)
        out = []
        for i in sorted(members):  # spaces no parameter carries (batch, pixels) are not groups
            if self.find(i) != i or i in self._binding:
                continue
            out.append(Group(
                id=i, size=self._size[i], anchor=anchors[i], prunable=not self._fixed[i],
                reasons=list(self._reasons[i]), tags=set(self._tags[i]), multiplicity=mult.get(i, 1),
                members=members[i],
            ))
        return out

    def _paths(self, layout: Layout, prefix: str) -> Iterator[tuple[int, str]]:
        layout = self.resolve(layout)
        if isinstance(layout, Leaf):
            yield layout.id, prefix
        elif isinstance(layout, (Prod, Cat)):
            sym = "x" if isinstance(layout, Prod) else "+"
            for i, p in enumerate(layout.parts):
                yield from self._paths(p, f"{prefix}{sym}{i}")

    def _multiplicity(self, layout: Layout, factor: int, out: dict[int, int]) -> None:
        if isinstance(layout, Leaf):
            out[layout.id] = min(out.get(layout.id, factor), factor)
        elif isinstance(layout, Cat):
            for p in layout.parts:
                self._multiplicity(p, factor, out)
        elif isinstance(layout, Prod):
            for i, p in enumerate(layout.parts):
                rest = math.prod(q.size for j, q in enumerate(layout.parts) if j != i)
                self._multiplicity(p, factor * rest, out)

    def fix_group(self, group_id: int, reason: str) -> None:
        self.fix(Leaf(group_id, self._size[group_id]), reason)

    # --- building -----------------------------------------------------------------------

    def _build(self) -> None:
        named = dict(self.gm.named_parameters(remove_duplicate=False))
        named.update(dict(self.gm.named_buffers(remove_duplicate=False)))
        seen: dict[int, list[str]] = {}
        for name, t in named.items():
            seen.setdefault(id(t), []).append(name)
        self._tied = {n for names in seen.values() if len(names) > 1 for n in names}
        for node in self.gm.graph.nodes:
            consumed: set[str] = set()
            try:
                self._visit(node, consumed)
            except _Unsupported as exc:
                self._unsupported(node, str(exc) or None)
            except Exception as exc:  # noqa: BLE001 - a rule that trips keeps what it touches whole
                self._unsupported(node, f"`{_target_name(node)}` at {node.name} not understood "
                                        f"({type(exc).__name__}: {str(exc)[:80]})")
            # A size of a channel dim used anywhere we do not rewrite: keep that dim whole.
            for arg in _flat_nodes((node.args, node.kwargs)):
                if arg.name in consumed:
                    continue
                if arg.name in self.scalars:
                    src, d = self.scalars[arg.name]
                    self.fix(self.dims[src][d], f"its size is used by `{_target_name(node)}` at {node.name}")
                elif arg.name in self.shapes:
                    src, ds = self.shapes[arg.name]
                    for d in ds:
                        self.fix(self.dims[src][d], f"its size is used by `{_target_name(node)}` at {node.name}")
                elif arg.name in self.quotients:
                    src, d, _ = self.quotients[arg.name]
                    self.fix(self.dims[src][d], f"its size is used by `{_target_name(node)}` at {node.name}")
        for m in self.members:
            if m.param in self._tied:
                self.fix(m.layout, f"tied parameter {m.param}")

    def _unsupported(self, node: fx.Node, why: str | None) -> None:
        reason = why or f"unsupported op `{_target_name(node)}` at {node.name}"
        if why is None:
            self.unsupported.append(f"{node.name} ({_target_name(node)})")
        for arg in _flat_nodes((node.args, node.kwargs)):
            for layout in self.dims.get(arg.name, []):
                self.fix(layout, reason)
            for item in self.tuples.get(arg.name, []):
                for layout in item:
                    self.fix(layout, reason)
        self.dims.pop(node.name, None)
        self.tuples.pop(node.name, None)
        shape = _shape(node)
        if shape is not None:
            self.dims[node.name] = [Fixed(s) for s in shape]
        shapes = _tuple_shapes(node)
        if shapes is not None:
            self.tuples[node.name] = [[Fixed(s) for s in sh] for sh in shapes]

    def _d(self, value: Any) -> list[Layout]:
        if not isinstance(value, fx.Node) or value.name not in self.dims:
            raise _Unsupported()
        return self.dims[value.name]

    def _visit(self, node: fx.Node, consumed: set[str]) -> None:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is not None:
                dims = [self.new_leaf(s) for s in shape]
                for d in dims:
                    self.fix(d, "model input")
                self.dims[node.name] = dims
            return
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                for layout in self.dims.get(arg.name, []):
                    self.fix(layout, "model output")
                for item in self.tuples.get(arg.name, []):
                    for layout in item:
                        self.fix(layout, "model output")
                consumed.add(arg.name)
                if arg.name in self.scalars:
                    src, d = self.scalars[arg.name]
                    self.fix(self.dims[src][d], "model output")
            return
        if node.op == "get_attr":
            self._get_attr(node)
            return
        if node.op == "call_module":
            self._call_module(node)
            return
        target = node.target
        method = node.op == "call_method"
        if (not method and target is getattr) and len(node.args) == 2:
            src, attr = node.args
            if isinstance(src, fx.Node) and src.name in self.dims and attr == "shape":
                self.shapes[node.name] = (src.name, list(range(len(self.dims[src.name]))))
                return
            if attr in ("shape",):
                raise _Unsupported()
            return  # dtype, device, ...: no sizes
        if method and target in ("size", "dim", "numel"):
            src = self._d(node.args[0])
            if target == "dim":
                return
            if target == "numel":
                raise _Unsupported()
            d = _arg(node, 1, "dim")
            if d is None:
                self.shapes[node.name] = (node.args[0].name, list(range(len(src))))
            elif isinstance(d, int):
                self.scalars[node.name] = (node.args[0].name, d % len(src))
            else:
                raise _Unsupported()
            return
        if not method and target is operator.getitem:
            self._getitem(node, consumed)
            return
        if not method and target is operator.floordiv and len(node.args) == 2 and isinstance(node.args[1], int) \
                and isinstance(node.args[0], fx.Node) and node.args[0].name in self.scalars:
            src, d = self.scalars[node.args[0].name]
            if node.args[1] > 1 and self.dims[src][d].size % node.args[1] == 0:
                consumed.add(node.args[0].name)  # read back where the quotient is used as a size
                self.quotients[node.name] = (src, d, node.args[1])
            return
        name = target if method else None
        if (method and name in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE_FUNCTIONS):
            self._elementwise(node)
        elif method and name in _SAME_AS_SELF_METHODS:
            src = self._d(node.args[0])
            if _shape(node) != _shape(node.args[0]):
                raise _Unsupported()
            self.dims[node.name] = list(src)
        elif not method and target in _SPATIAL_FUNCTIONS:
            self._spatial(node)
        elif (method and name in _REDUCTIONS) or (not method and target in (torch.mean, torch.sum, torch.amax)):
            self._reduce(node)
        elif (method and name in ("softmax", "log_softmax")) or (
                not method and target in (F.softmax, F.log_softmax, torch.softmax, F.normalize)):
            self._softmax(node)
        elif (method and name in _RESHAPES) or (not method and target is torch.reshape):
            self._reshape(node, consumed, literal=True)
        elif method and name in ("reshape_as", "view_as"):  # the other tensor's shape: its dims, unified
            self._reshape(node, consumed, literal=False)
            for mine, theirs in zip(self.dims[node.name], self._d(node.args[1])):
                self.unify(mine, theirs, node.name)
        elif (method and name in _SHAPE_CHANGES) or (not method and target in (torch.flatten, torch.squeeze,
                                                                              torch.unsqueeze)):
            self._reshape(node, consumed, literal=False)
        elif (method and name in ("permute", "transpose", "swapaxes", "swapdims")) or (
                not method and target in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims)):
            self._permute(node)
        elif method and name == "expand":
            self._expand(node, consumed)
        elif method and name == "expand_as":
            src, other = self._d(node.args[0]), self._d(node.args[1])
            self.dims[node.name] = self._broadcast(node, [src, other], [_shape(node.args[0]),
                                                                        _shape(node.args[1])])
        elif not method and target in (torch.cat, torch.concat):
            self._cat(node)
        elif not method and target is torch.stack:
            self._stack(node)
        elif (method and name in ("split", "chunk")) or (not method and target in (torch.split, torch.chunk)):
            self._split(node)
        elif (method and name == "unbind") or (not method and target is torch.unbind):
            self._unbind(node)
        elif not method and target is F.linear:
            self._functional_linear(node)
        elif not method and target is F.layer_norm:
            self._functional_layer_norm(node)
        elif not method and _is_stochastic_depth(target):
            self._elementwise(node)  # torchvision's: identity in eval, one draw per sample in training
        elif not method and target is F.scaled_dot_product_attention:
            self._sdpa(node)
        elif (method and name in ("matmul", "bmm")) or (
                not method and target in (operator.matmul, torch.matmul, torch.bmm)):
            self._matmul(node)
        elif not method and target is torch.einsum:
            self._einsum(node)
        elif not method and target is F.pad:
            self._pad(node)
        elif (method and name == "roll") or (not method and target is torch.roll):
            self._roll(node)
        elif not method and _is_torchvision_swin_op(target, "shifted_window_attention"):
            self._window_attention(node)
        elif not method and _is_torchvision_swin_op(target, "_patch_merging_pad"):
            x = self._d(node.args[0])  # (..., H, W, C) -> (..., H/2, W/2, 4C): four pixels side by side
            out = _shape(node)
            if out is None or out[-1] != 4 * x[-1].size:
                raise _Unsupported()
            self.dims[node.name] = [Fixed(n) for n in out[:-1]] + [_mk(Prod, [Fixed(4), x[-1]], out[-1])]
        elif not method and _is_torchvision_swin_op(target, "_get_relative_position_bias"):
            table = self._d(node.args[0])  # (positions, heads) gathered to (1, heads, N, N)
            for d in table:
                self.fix(d, f"relative position bias table (one column per head) at {node.name}")
            self.dims[node.name] = [Fixed(n) for n in _shape(node)]
        elif not method and _is_timm_window_op(target):
            x = self._d(node.args[0])  # (..., C) windows <-> (B, H, W, C): channels last on both sides
            out = _shape(node)
            if out is None or out[-1] != _shape(node.args[0])[-1]:
                raise _Unsupported()
            self.dims[node.name] = [Fixed(n) for n in out[:-1]] + [x[-1]]
        else:
            # Asserts and shape checks carry no tensors; anything else we do not know.
            touches = any(a.name in self.dims or a.name in self.tuples
                          for a in _flat_nodes((node.args, node.kwargs)))
            makes = _shape(node) is not None or _tuple_shapes(node) is not None
            if touches or makes:
                raise _Unsupported()

    # modules ------------------------------------------------------------------------------

    def _member(self, param: str, axis: int, layout: Layout, role: str) -> None:
        self.members.append(Member(param, axis, layout, role))

    def _call_module(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        name = node.target
        if type(m) in _CONV_TYPES and not m.transposed and isinstance(m.padding, (tuple, int, str)):
            self._conv(node, m)
        elif type(m) in _CONV_TRANSPOSE_TYPES and m.padding_mode == "zeros":
            self._conv(node, m, transposed=True)
        elif type(m) in _LINEAR_TYPES:
            ports = self._module_ports.get(name)
            if ports is None:
                ports = {"in": self.new_leaf(m.in_features), "out": self.new_leaf(m.out_features)}
                self._module_ports[name] = ports
                self._member(f"{name}.weight", 0, ports["out"], "out")
                self._member(f"{name}.weight", 1, ports["in"], "in")
                if m.bias is not None:
                    self._member(f"{name}.bias", 0, ports["out"], "out")
                self.modules[name] = ("linear", ports)
            x = self._d(node.args[0])
            self.unify(x[-1], ports["in"], node.name)
            self.dims[node.name] = list(x[:-1]) + [ports["out"]]
            self.compute.append((node.name, "linear"))
        elif type(m) in _BN_TYPES and _acts_ok(m):
            self._norm(node, m, axis=1, kind="bn")
        elif type(m) in _LN_C_TYPES and _acts_ok(m) and len(m.normalized_shape) == 1:
            self._norm(node, m, axis=1, kind="ln")
        elif type(m) in _LN_LAST_TYPES and _acts_ok(m) and len(m.normalized_shape) == 1:
            self._norm(node, m, axis=-1, kind="ln")
        elif type(m) in _GN_TYPES and _acts_ok(m):
            self._group_norm(node, m)
        elif _is_elementwise_module(m):
            self._elementwise(node)
        elif type(m) in _SPATIAL_MODULES:
            self._spatial(node)
        elif type(m) is nn.Flatten:
            self._reshape(node, set(), literal=False)
        elif type(m) in (nn.Softmax, nn.LogSoftmax) and isinstance(m.dim, int):
            self._softmax(node, m.dim)
        else:
            raise _Unsupported(f"unsupported module {type(m).__name__} at {name}")

    def _conv(self, node: fx.Node, m: nn.Module, transposed: bool = False) -> None:
        """A conv's weight is (out, in / groups, k...); a transposed conv's (in, out / groups, k...): its axis 0
        reads the input channels and axis 1 makes each group's outputs."""
        name = node.target
        ports = self._module_ports.get(name)
        if ports is None:
            g = m.groups
            group = self.new_leaf(g)
            k_in, k_out = self.new_leaf(m.in_channels // g), self.new_leaf(m.out_channels // g)
            if g > 1:
                self.tag(k_in, "group_width")
                self.tag(k_out, "group_width")
            ports = {"groups": group, "k_in": k_in, "k_out": k_out,
                     "in": _mk(Prod, [group, k_in], m.in_channels),
                     "out": _mk(Prod, [group, k_out], m.out_channels)}
            self._module_ports[name] = ports
            if transposed:
                self._member(f"{name}.weight", 0, ports["in"], "in")
                self._member(f"{name}.weight", 1, k_out, "out")
            else:
                self._member(f"{name}.weight", 0, ports["out"], "out")
                self._member(f"{name}.weight", 1, k_in, "in")
            if m.bias is not None:
                self._member(f"{name}.bias", 0, ports["out"], "out")
            if isinstance(getattr(m, "gain", None), nn.Parameter):  # ScaledStdConv2d: (out, 1, 1, 1)
                self._member(f"{name}.gain", 0, ports["out"], "out")
            self.modules[name] = ("conv", ports)  # in_channels, out_channels, groups: the same attributes
        x = self._d(node.args[0])
        if len(node.args) != 1 or node.kwargs:  # e.g. a transposed conv's output_size=
            raise _Unsupported()
        self.unify(x[1], ports["in"], node.name)
        for d in x[2:]:
            self.fix(d, f"spatial dim carries channels at {node.name}")
        out = _shape(node)
        self.dims[node.name] = [x[0], ports["out"]] + [Fixed(s) for s in out[2:]]
        self.compute.append((node.name, "conv_transpose" if transposed else "conv"))

    def _norm(self, node: fx.Node, m: nn.Module, axis: int, kind: str) -> None:
        name = node.target
        x = self._d(node.args[0])
        if len(node.args) != 1 or node.kwargs or _shape(node) != _shape(node.args[0]):
            raise _Unsupported()
        ports = self._module_ports.get(name)
        if ports is None:
            n = x[axis].size
            ports = {"c": self.new_leaf(n)}
            self._module_ports[name] = ports
            for pname in ("weight", "bias"):
                if getattr(m, pname, None) is not None:
                    self._member(f"{name}.{pname}", 0, ports["c"], "norm")
            for bname in ("running_mean", "running_var"):
                if getattr(m, bname, None) is not None:
                    self._member(f"{name}.{bname}", 0, ports["c"], "stat")
            self.modules[name] = (kind, ports)
        self.unify(x[axis], ports["c"], node.name)
        dims = list(x)
        dims[axis] = ports["c"]
        self.dims[node.name] = dims

    def _group_norm(self, node: fx.Node, m: nn.Module) -> None:
        name = node.target
        x = self._d(node.args[0])
        if len(node.args) != 1 or node.kwargs or _shape(node) != _shape(node.args[0]):
            raise _Unsupported()
        ports = self._module_ports.get(name)
        if ports is None:
            g = m.num_groups
            group, width = self.new_leaf(g), self.new_leaf(m.num_channels // g)
            ports = {"groups": group, "c": _mk(Prod, [group, width], m.num_channels)}
            self._module_ports[name] = ports
            for pname in ("weight", "bias"):
                if getattr(m, pname, None) is not None:
                    self._member(f"{name}.{pname}", 0, ports["c"], "norm")
            self.modules[name] = ("gn", ports)
        self.unify(x[1], ports["c"], node.name)
        dims = list(x)
        dims[1] = ports["c"]
        self.dims[node.name] = dims

    def _get_attr(self, node: fx.Node) -> None:
        target = node.target
        try:
            value = self.gm.get_parameter(target)
        except AttributeError:
            try:
                value = self.gm.get_buffer(target)
            except AttributeError:
                value = None
        if not isinstance(value, torch.Tensor):
            shape = _shape(node)
            if shape is not None:
                self.dims[node.name] = [Fixed(s) for s in shape]
            return
        dims = self._attr_dims.get(target)
        if dims is None:
            dims = [self.new_leaf(s) for s in value.shape]
            for axis, d in enumerate(dims):
                if isinstance(d, Leaf):
                    self._member(target, axis, d, "param")
            if not value.is_floating_point():
                for d in dims:
                    self.fix(d, f"integer tensor {target}")
            self._attr_dims[target] = dims
        self.dims[node.name] = list(dims)

    # functions ----------------------------------------------------------------------------

    def _broadcast(self, node: fx.Node, ins: list[list[Layout]], shapes: list[tuple]) -> list[Layout]:
        out_shape = _shape(node)
        if out_shape is None:
            raise _Unsupported()
        dims: list[Layout] = []
        for d in range(len(out_shape)):
            size = out_shape[d]
            cands = []
            for layouts, shape in zip(ins, shapes):
                k = d - (len(out_shape) - len(shape))
                if k < 0:
                    continue
                if shape[k] == size:
                    cands.append(layouts[k])
                elif shape[k] != 1:
                    raise _Unsupported()
            if size == 1 or not cands:
                dims.append(Fixed(size))
                continue
            for c in cands[1:]:
                self.unify(cands[0], c, node.name)
            dims.append(cands[0])
        return dims

    def _functional_layer_norm(self, node: fx.Node) -> None:
        """F.layer_norm over the last dim (torchvision's LayerNorm2d): weight and bias are the channel's."""
        x = self._d(node.args[0])
        shape = _arg(node, 1, "normalized_shape")
        if not (isinstance(shape, (list, tuple)) and len(shape) == 1) or _shape(node) != _shape(node.args[0]):
            raise _Unsupported()
        for index, name in ((2, "weight"), (3, "bias")):
            p = _arg(node, index, name)
            if p is None:
                continue
            if not isinstance(p, fx.Node) or p.name not in self.dims or len(self.dims[p.name]) != 1:
                raise _Unsupported()
            self.unify(self.dims[p.name][0], x[-1], node.name)
        self.dims[node.name] = list(x)
        self.edits.append((node.name, "layer_norm", {}))

    def _window_attention(self, node: fx.Node) -> None:
        """torchvision's Swin attention: one call from (B, H, W, C) to (B, H, W, C).

        Inside, C is the width of everything: q/k/v are reshaped to (heads, C // heads) and the
        attention output back to C before and after the projection. So C factors into heads x
        head_dim; the heads stay (the position bias has one per head), head_dim is prunable.
        """
        x = self._d(node.args[0])
        qkv_w, proj_w = self._d(_arg(node, 1, "qkv_weight")), self._d(_arg(node, 2, "proj_weight"))
        heads = _arg(node, 5, "num_heads")
        in_shape = _shape(node.args[0])
        if not isinstance(heads, int) or len(x) != 4 or len(qkv_w) != 2 or len(proj_w) != 2 \
                or _shape(node) != in_shape or in_shape[-1] % heads:
            raise _Unsupported()
        why, c = node.name, in_shape[-1]
        h, d = self.factor(x[-1], [heads, c // heads], why)
        self.fix(h, f"window attention keeps its heads (num_heads, one position bias per head) at {why}")
        self.tag(d, "head_dim")
        part, h_qkv, d_qkv = self.factor(qkv_w[0], [3, heads, c // heads], why)
        self.fix(part, f"q, k, v at {why}")
        self.unify(h_qkv, h, why)
        self.unify(d_qkv, d, why)
        for w in (qkv_w[1], proj_w[0], proj_w[1]):  # the attention output is reshaped to C, and so is proj's
            self.unify(w, x[-1], why)
        for index, key, w in ((9, "qkv_bias", qkv_w[0]), (10, "proj_bias", proj_w[0])):
            bias = _arg(node, index, key)
            if bias is not None:
                self.unify(self._d(bias)[0], w, why)
        for index, key in ((3, "relative_position_bias"), (11, "logit_scale")):
            t = _arg(node, index, key)
            for layout in self.dims.get(t.name, []) if isinstance(t, fx.Node) else []:
                self.fix(layout, f"one {key} per head at {why}")
        if _arg(node, 11, "logit_scale") is None:
            # q is scaled by (C // heads) ** -0.5 with the C it is called with: apply rescales q's rows
            for index, key in ((1, "qkv_weight"), (9, "qkv_bias")):
                t = _arg(node, index, key)
                if t is not None and not (isinstance(t, fx.Node) and t.op == "get_attr"):
                    raise _Unsupported("window attention's q/k/v weights are not parameters at " + why)
            self.edits.append((node.name, "window_attention", {"head_dim": d}))
        self.dims[node.name] = list(x)
        self.compute.append((node.name, "window_attention"))

    def _elementwise(self, node: fx.Node) -> None:
        tensors = [a for a in _flat_nodes((node.args, node.kwargs)) if a.name in self.dims]
        if not tensors and _shape(node) is None and _tuple_shapes(node) is None:
            return  # arithmetic on sizes: whatever channel size it reads is fixed by _build
        if not tensors or any(a.name in self.tuples for a in _flat_nodes(node.args)):
            raise _Unsupported()
        for a in _flat_nodes((node.args, node.kwargs)):
            if a.name not in self.dims and a.name not in self.scalars and _shape(a) is not None:
                raise _Unsupported()
        shapes = [_shape(a) for a in tensors]
        if len(shapes[0]) > len(_shape(node) or ()):
            raise _Unsupported()
        self.dims[node.name] = self._broadcast(node, [self.dims[a.name] for a in tensors], shapes)

    def _spatial(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        xs, out = _shape(node.args[0]), _shape(node)
        if out is None or len(out) != len(xs) or out[1] != xs[1]:
            raise _Unsupported()
        dims = [x[0], x[1]]
        for d in range(2, len(out)):
            if out[d] == xs[d]:
                dims.append(x[d])
            else:
                self.fix(x[d], f"resampled dim at {node.name}")
                dims.append(Fixed(out[d]))
        self.dims[node.name] = dims

    def _reduce(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        dim = _arg(node, 1, "dim")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        if dim is None:
            dims = list(range(len(x)))
        elif isinstance(dim, int):
            dims = [dim % len(x)]
        elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
            dims = [d % len(x) for d in dim]
        else:
            raise _Unsupported()
        out = []
        for d, layout in enumerate(x):
            if d in dims:
                self.fix(layout, f"reduction `{_target_name(node)}` over channels at {node.name}")
                if keepdim:
                    out.append(Fixed(1))
            else:
                out.append(layout)
        if tuple(lay.size for lay in out) != _shape(node):
            raise _Unsupported()
        self.dims[node.name] = out

    def _softmax(self, node: fx.Node, dim: int | None = None) -> None:
        x = self._d(node.args[0])
        dim = _arg(node, 1, "dim") if dim is None else dim
        if not isinstance(dim, int) or _shape(node) != _shape(node.args[0]):
            raise _Unsupported()
        self.fix(x[dim % len(x)], f"`{_target_name(node)}` over channels at {node.name}")
        self.dims[node.name] = list(x)

    def _reshape(self, node: fx.Node, consumed: set[str], literal: bool) -> None:
        src = node.args[0]
        x = self._d(src)
        in_shape, out_shape = _shape(src), _shape(node)
        if out_shape is None or math.prod(in_shape) != math.prod(out_shape) or 0 in in_shape:
            raise _Unsupported()
        out: list[Layout | None] = [None] * len(out_shape)
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            if i < len(in_shape) and in_shape[i] == 1:
                i += 1
                continue
            if j < len(out_shape) and out_shape[j] == 1:
                out[j] = Fixed(1)
                j += 1
                continue
            if i >= len(in_shape) or j >= len(out_shape):
                raise _Unsupported()
            gi, gj = [i], [j]
            pi, pj = in_shape[i], out_shape[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(in_shape):
                    gi.append(i)
                    pi *= in_shape[i]
                    i += 1
                elif pj < pi and j < len(out_shape):
                    gj.append(j)
                    pj *= out_shape[j]
                    j += 1
                else:
                    raise _Unsupported()
            merged = self.resolve(_mk(Prod, [x[k] for k in gi], pi))
            for k, layout in zip(gj, self.factor(merged, [out_shape[k] for k in gj], node.name)):
                out[k] = layout
        dims = [o if o is not None else Fixed(s) for o, s in zip(out, out_shape)]
        self.dims[node.name] = dims
        if literal:
            self._size_args(node, dims, consumed)

    def _size_args(self, node: fx.Node, dims: list[Layout], consumed: set[str]) -> None:
        """Sizes given as arguments: literals are rewritten later, shape values must agree."""
        packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        sizes = list(node.args[1]) if packed else list(node.args[1:])
        if node.op == "call_function":  # torch.reshape(x, shape)
            sizes = list(_arg(node, 1, "shape", ()))
            packed = True
        if len(sizes) != len(dims):
            raise _Unsupported()
        # reshape(B, N, C) with C read off another tensor would tie this tensor's channels to that one's
        # (an attention's heads x head_dim to the residual stream); one such size becomes -1 instead.
        free = None
        if node.op == "call_method" and node.target in _RESHAPES and -1 not in sizes:
            free = next((j for j in reversed(range(len(sizes)))  # the innermost: channels, not the batch
                         if isinstance(sizes[j], fx.Node) and sizes[j].name in self.scalars
                         and not isinstance(self.resolve(dims[j]), Fixed)), None)
        for j, s in enumerate(sizes):
            if isinstance(s, fx.Node):
                if j == free:
                    consumed.add(s.name)
                elif s.name in self.scalars:
                    consumed.add(s.name)
                    src, d = self.scalars[s.name]
                    self.unify(self.dims[src][d], dims[j], node.name)
                elif s.name in self.quotients:
                    # size C // k: the inner factor of C split into (k, C // k); k stays, so that the
                    # quotient of the pruned count is the pruned inner factor
                    consumed.add(s.name)
                    src, d, k = self.quotients[s.name]
                    outer, inner = self.factor(self.dims[src][d], [k, self.dims[src][d].size // k], node.name)
                    self.fix(outer, f"divides the channels into {k} groups at {node.name}")
                    self.unify(inner, dims[j], node.name)
                else:
                    self.fix(dims[j], f"computed size at {node.name}")
            elif not isinstance(s, int):
                raise _Unsupported()
        self.edits.append((node.name, "sizes", {"packed": packed, "free": free}))

    def _permute(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        name = node.target if node.op == "call_method" else node.target.__name__
        if name == "permute":
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            if "dims" in node.kwargs:
                order = node.kwargs["dims"]
            order = [d % len(x) for d in order]
        else:
            a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
            order = list(range(len(x)))
            order[a % len(x)], order[b % len(x)] = order[b % len(x)], order[a % len(x)]
        self.dims[node.name] = [x[d] for d in order]

    def _expand(self, node: fx.Node, consumed: set[str]) -> None:
        x = self._d(node.args[0])
        xs, out = _shape(node.args[0]), _shape(node)
        dims: list[Layout] = []
        for d in range(len(out)):
            k = d - (len(out) - len(xs))
            if k >= 0 and xs[k] == out[d]:
                dims.append(x[k])
            else:
                dims.append(Fixed(out[d]))
        self.dims[node.name] = dims
        self._size_args(node, dims, consumed)

    def _cat(self, node: fx.Node) -> None:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _Unsupported()
        ins = [self._d(t) for t in tensors]
        rank = len(ins[0])
        dim %= rank
        dims: list[Layout] = []
        for d in range(rank):
            if d == dim:
                dims.append(self.resolve(_mk(Cat, [i[d] for i in ins], sum(i[d].size for i in ins))))
            else:
                for other in ins[1:]:
                    self.unify(ins[0][d], other[d], node.name)
                dims.append(ins[0][d])
        self.dims[node.name] = dims
        self.edits.append((node.name, "cat", {}))

    def _stack(self, node: fx.Node) -> None:
        tensors = _arg(node, 0, "tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            raise _Unsupported()
        ins = [self._d(t) for t in tensors]
        for other in ins[1:]:
            for a, b in zip(ins[0], other):
                self.unify(a, b, node.name)
        dims = list(ins[0])
        dims.insert(dim % (len(dims) + 1), Fixed(len(ins)))
        self.dims[node.name] = dims

    def _split(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        name = node.target if node.op == "call_method" else node.target.__name__
        dim = _arg(node, 2, "dim", 0) % len(x)
        shapes = _tuple_shapes(node)
        if shapes is None:
            raise _Unsupported()
        pieces, offset = [], 0
        for sh in shapes:
            pieces.append(self.slice(x[dim], offset, offset + sh[dim], node.name))
            offset += sh[dim]
        arg = _arg(node, 1, "split_size_or_sections" if node.op == "call_function" else "split_size")
        if name == "chunk" or isinstance(arg, int):
            # Equal pieces must stay equal: prune them alike.
            sizes = [sh[dim] for sh in shapes]
            if len(set(sizes[:-1])) > 1 or sizes[-1] > sizes[0]:
                raise _Unsupported()
            if sizes[-1] != sizes[0]:
                self.fix(x[dim], f"uneven split at {node.name}")
            for p in pieces[1:]:
                self.unify(pieces[0], p, node.name)
            if name == "chunk":
                arg = None
        elif not (isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg)):
            raise _Unsupported()
        self.tuples[node.name] = [[p if d == dim else x[d] for d in range(len(x))] for p in pieces]
        if name == "split":
            self.edits.append((node.name, "split", {"dim": dim}))

    def _unbind(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        dim = _arg(node, 1, "dim", 0) % len(x)
        self.fix(x[dim], f"unbind over channels at {node.name}")
        shapes = _tuple_shapes(node)
        if shapes is None:
            raise _Unsupported()
        self.tuples[node.name] = [[x[d] for d in range(len(x)) if d != dim] for _ in shapes]

    def _getitem(self, node: fx.Node, consumed: set[str]) -> None:
        src, idx = node.args
        if not isinstance(src, fx.Node):
            raise _Unsupported()
        if src.name in self.shapes:
            base, ds = self.shapes[src.name]
            consumed.add(src.name)
            if isinstance(idx, int):
                self.scalars[node.name] = (base, ds[idx])
            elif isinstance(idx, slice):
                self.shapes[node.name] = (base, ds[idx])
            else:
                raise _Unsupported()
            return
        if src.name in self.tuples:
            if not isinstance(idx, int):
                raise _Unsupported()
            self.dims[node.name] = list(self.tuples[src.name][idx])
            return
        if src.name not in self.dims:
            if _shape(node) is None:
                return
            raise _Unsupported()
        x = self.dims[src.name]
        xs = _shape(src)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(it is Ellipsis for it in items) > 1:
            raise _Unsupported()
        if Ellipsis in items:
            k = items.index(Ellipsis)
            n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
            items[k:k + 1] = [slice(None)] * (len(x) - n_real)
        dims: list[Layout] = []
        slices = []
        d = 0
        for pos, it in enumerate(items):
            if it is None:
                dims.append(Fixed(1))
                continue
            if d >= len(x):
                raise _Unsupported()
            if isinstance(it, int):
                self.fix(x[d], f"indexing a channel at {node.name}")
            elif isinstance(it, fx.Node) and _shape(it) is not None and it.name in self.dims:
                # Gather along one dim (a relative position table read by an index tensor).
                if sum(isinstance(i, fx.Node) for i in items) != 1:
                    raise _Unsupported()
                self.fix(x[d], f"indexed by a tensor at {node.name}")
                dims.extend(Fixed(s) for s in _shape(it))
            elif isinstance(it, slice):
                computed = any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step))
                length = 0 if computed else len(range(*it.indices(xs[d])))  # computed: the output's size, below
                if isinstance(self.resolve(x[d]), Fixed):
                    dims.append(Fixed(length))
                elif computed or it.step not in (None, 1):
                    self.fix(x[d], f"strided or computed slice of channels at {node.name}")
                    dims.append(Fixed(length))
                else:
                    start, stop, _ = it.indices(xs[d])
                    dims.append(self.slice(x[d], start, max(start, stop), node.name))
                    slices.append((pos, src.name, d))
            else:
                raise _Unsupported()
            d += 1
        dims.extend(x[d:])
        out = _shape(node)
        if out is None or len(dims) != len(out):
            raise _Unsupported()
        for k, (layout, size) in enumerate(zip(dims, out)):
            if isinstance(layout, Fixed) and layout.size != size:
                dims[k] = Fixed(size)
            elif layout.size != size:
                raise _Unsupported()
        self.dims[node.name] = dims
        if slices:
            self.edits.append((node.name, "slice", {"slices": slices, "items": items}))

    def _functional_linear(self, node: fx.Node) -> None:
        x, w = self._d(node.args[0]), self._d(_arg(node, 1, "weight"))
        bias = _arg(node, 2, "bias")
        if len(w) != 2:
            raise _Unsupported()
        self.unify(x[-1], w[1], node.name)
        if bias is not None:
            self.unify(self._d(bias)[0], w[0], node.name)
        self.dims[node.name] = list(x[:-1]) + [w[0]]
        self.compute.append((node.name, "linear"))

    def _sdpa(self, node: fx.Node) -> None:
        q, k, v = (self._d(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
        if not (len(q) == len(k) == len(v)) or node.kwargs.get("enable_gqa"):
            raise _Unsupported()
        mask = _arg(node, 3, "attn_mask")
        if mask is not None:  # broadcasts to (*batch, L, S): a relative position bias has a heads dim
            full = list(q[:-2]) + [q[-2], k[-2]]
            sizes = list(_shape(node.args[0])[:-1]) + [_shape(_arg(node, 1, "key"))[-2]]
            m, ms = self._d(mask), _shape(mask)
            if len(ms) > len(full):
                raise _Unsupported()
            for j, size in enumerate(ms):
                t = len(full) - len(ms) + j
                if size != 1 and size != sizes[t]:
                    raise _Unsupported()
                if size != 1:
                    self.unify(m[j], full[t], node.name)
        self.unify(q[-1], k[-1], node.name)
        for d in range(len(q) - 2):
            self.unify(q[d], k[d], node.name)
            self.unify(q[d], v[d], node.name)
            self.tag(q[d], "heads")
        self.tag(q[-1], "head_dim")
        self.tag(v[-1], "head_dim")
        self.unify(k[-2], v[-2], node.name)
        self.dims[node.name] = list(q[:-1]) + [v[-1]]
        self.edits.append((node.name, "sdpa", {}))
        self.compute.append((node.name, "sdpa"))

    def _matmul(self, node: fx.Node) -> None:
        a, b = self._d(node.args[0]), self._d(node.args[1])
        if len(a) < 2 or len(b) < 2:
            raise _Unsupported()
        self.unify(a[-1], b[-2], node.name)
        sa, sb = _shape(node.args[0]), _shape(node.args[1])
        out_shape = _shape(node)
        nb = len(out_shape) - 2
        batch = []
        for d in range(nb):
            cands = []
            for layouts, shape in ((a[:-2], sa[:-2]), (b[:-2], sb[:-2])):
                kk = d - (nb - len(shape))
                if kk >= 0 and shape[kk] == out_shape[d]:
                    cands.append(layouts[kk])
            for c in cands[1:]:
                self.unify(cands[0], c, node.name)
            batch.append(cands[0] if cands and out_shape[d] != 1 else Fixed(out_shape[d]))
        for d in batch:
            self.tag(d, "heads")
        self.dims[node.name] = batch + [a[-2], b[-1]]
        self.compute.append((node.name, "matmul"))

    def _einsum(self, node: fx.Node) -> None:
        """Each subscript letter is one space: equal letters are the same positions in every operand."""
        parts = einsum_parts(node)
        if parts is None:
            raise _Unsupported()
        specs, out, operands = parts
        letters: dict[str, Layout] = {}
        for spec, op in zip(specs, operands):
            dims, shape = self._d(op), _shape(op)
            if len(spec) != len(dims) or len(set(spec)) != len(spec):
                raise _Unsupported()
            for letter, layout, size in zip(spec, dims, shape):
                if letter in letters:
                    if letters[letter].size != size:
                        raise _Unsupported()  # broadcast size 1 against n: not a channel rule we know
                    self.unify(letters[letter], layout, node.name)
                else:
                    letters[letter] = layout
        shape = _shape(node)
        if shape is None or len(shape) != len(out) or any(c not in letters for c in out):
            raise _Unsupported()
        self.dims[node.name] = [letters[c] for c in out]
        self.compute.append((node.name, "einsum"))

    def _pad(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        pad = _arg(node, 1, "pad")
        if not isinstance(pad, (list, tuple)):
            raise _Unsupported()
        n = len(pad) // 2
        out = _shape(node)
        dims = list(x)
        for d in range(len(x) - n, len(x)):
            if pad[2 * (len(x) - 1 - d)] or pad[2 * (len(x) - 1 - d) + 1]:
                self.fix(x[d], f"padding of channels at {node.name}")
                dims[d] = Fixed(out[d])
        self.dims[node.name] = dims

    def _roll(self, node: fx.Node) -> None:
        x = self._d(node.args[0])
        dims = _arg(node, 2, "dims")
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not dims or _shape(node) != _shape(node.args[0]):
            raise _Unsupported()  # a roll of the flattened tensor mixes every dim
        for d in dims:
            self.fix(x[d], f"roll over channels at {node.name}")
        self.dims[node.name] = list(x)

    # --- applying a choice ------------------------------------------------------------

    def apply(self, gm: fx.GraphModule, keep: dict[int, np.ndarray]) -> fx.GraphModule:
        """Slice ``gm`` (the graph this was built from) so that group ``id`` keeps ``keep[id]``.

        Parameters and buffers become physically smaller, module attributes follow, and
        the size constants in the graph are rewritten. Returns ``gm`` recompiled.
        """
        keep = {g: np.asarray(k, dtype=bool) for g, k in keep.items() if not np.asarray(k, dtype=bool).all()}
        counts = {g: int(k.sum()) for g, k in keep.items()}
        by_param: dict[str, list[Member]] = {}
        for m in self.members:
            by_param.setdefault(m.param, []).append(m)
        for pname, members in by_param.items():
            owner, _, attr = pname.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            tensor = getattr(module, attr)
            new = tensor.detach()
            changed = False
            for axis in sorted({m.axis for m in members}):
                mask = np.ones(tensor.shape[axis], dtype=bool)
                for m in members:
                    if m.axis == axis:
                        mask &= self.keep_mask(m.layout, keep)
                if not mask.all():
                    idx = torch.as_tensor(np.flatnonzero(mask), device=new.device)
                    new = new.index_select(axis, idx)
                    changed = True
            if not changed:
                continue
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(new, requires_grad=tensor.requires_grad)
            else:
                module._buffers[attr] = new
        for name, (kind, ports) in self.modules.items():
            m = gm.get_submodule(name)
            if kind == "conv":
                m.in_channels = self.kept(ports["in"], counts)
                m.out_channels = self.kept(ports["out"], counts)
                m.groups = self.kept(ports["groups"], counts)
            elif kind == "linear":
                m.in_features = self.kept(ports["in"], counts)
                m.out_features = self.kept(ports["out"], counts)
            elif kind == "bn":
                m.num_features = self.kept(ports["c"], counts)
            elif kind == "ln":
                m.normalized_shape = (self.kept(ports["c"], counts),)
            elif kind == "gn":
                m.num_groups = self.kept(ports["groups"], counts)
                m.num_channels = self.kept(ports["c"], counts)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, kind, data in self.edits:
            node = nodes[name]
            if kind == "sizes":
                self._edit_sizes(node, data["packed"], counts, data["free"])
            elif kind == "split":
                self._edit_split(node, data["dim"], counts)
            elif kind == "slice":
                self._edit_slice(node, data["slices"], data["items"], keep)
            elif kind == "layer_norm":
                size = (self.kept(self.dims[name][-1], counts),)
                if len(node.args) > 1:
                    node.args = (node.args[0], size) + tuple(node.args[2:])
                else:
                    node.kwargs = {**node.kwargs, "normalized_shape": size}
            elif kind == "window_attention":
                self._edit_window_attention(gm, node, data["head_dim"], counts)
            elif kind == "sdpa":
                q = self.dims[_arg(node, 0, "query").name][-1]
                if self.kept(q, counts) != q.size and _arg(node, 6, "scale") is None:
                    node.kwargs = {**node.kwargs, "scale": q.size ** -0.5}  # the original head size
        gm.recompile()
        return gm

    def _edit_window_attention(self, gm: fx.GraphModule, node: fx.Node, head_dim: Layout,
                               counts: dict[int, int]) -> None:
        """Keep q's scale: the call scales q by head_dim ** -0.5 of the pruned width, so the q rows
        (first third of the packed weight and bias) take sqrt(new / old)."""
        new, old = self.kept(head_dim, counts), self.resolve(head_dim).size
        if new == old:
            return
        with torch.no_grad():
            for index, key in ((1, "qkv_weight"), (9, "qkv_bias")):
                t = _arg(node, index, key)
                if t is None:
                    continue
                try:
                    param = gm.get_parameter(t.target)
                except AttributeError:  # a buffer
                    param = gm.get_buffer(t.target)
                q_rows = param.shape[0] // 3
                param[:q_rows].mul_((new / old) ** 0.5)

    def _edit_sizes(self, node: fx.Node, packed: bool, counts: dict[int, int], free: int | None = None) -> None:
        dims = self.dims[node.name]
        if node.op == "call_function":
            sizes = list(_arg(node, 1, "shape"))
        else:
            sizes = list(node.args[1]) if packed else list(node.args[1:])
        new = [self.kept(d, counts) if isinstance(s, int) and s != -1 else s for s, d in zip(sizes, dims)]
        if free is not None:
            new[free] = -1
        if new == sizes:
            return
        if node.op == "call_function":
            if len(node.args) > 1:
                node.args = (node.args[0], tuple(new)) + tuple(node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "shape": tuple(new)}
        elif packed:
            node.args = (node.args[0], type(node.args[1])(new))
        else:
            node.args = (node.args[0], *new)

    def _edit_split(self, node: fx.Node, dim: int, counts: dict[int, int]) -> None:
        pieces = [self.kept(item[dim], counts) for item in self.tuples[node.name]]
        arg = _arg(node, 1, "split_size_or_sections" if node.op == "call_function" else "split_size")
        new: Any = pieces[0] if isinstance(arg, int) else type(arg)(pieces)
        if len(node.args) > 1:
            node.args = (node.args[0], new) + tuple(node.args[2:])
        else:
            key = "split_size_or_sections" if node.op == "call_function" else "split_size"
            node.kwargs = {**node.kwargs, key: new}

    def _edit_slice(self, node: fx.Node, slices: list, items: list, keep: dict[int, np.ndarray]) -> None:
        src, idx = node.args
        # the items were read from the graph this was built on; apply may edit a copy of it
        lookup = {n.name: n for n in node.graph.nodes}
        items = list(fx.node.map_arg(tuple(items), lambda n: lookup[n.name]))
        for pos, src_name, d in slices:
            layout = self.dims[src_name][d]
            mask = self.keep_mask(layout, keep)
            if mask.all():
                # nothing removed here: keep the bounds as written, or a batch dim's `:` would
                # become the traced batch size (0:2) and the graph would only run at that batch
                continue
            start, stop, _ = items[pos].indices(layout.size)
            before = np.concatenate([[0], np.cumsum(mask)])
            items[pos] = slice(int(before[start]), int(before[max(start, stop)]))
        node.args = (src, tuple(items) if isinstance(idx, tuple) or len(items) > 1 else items[0])


def _mk(kind: type, parts: Iterable[Layout], size: int) -> Layout:
    parts = tuple(parts)
    if kind is Prod:
        parts = tuple(p for p in parts if p.size != 1)
        if not parts:
            return Fixed(size)
    else:
        parts = tuple(p for p in parts if p.size != 0)
        if not parts:
            return Fixed(0)
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Fixed) for p in parts):
        return Fixed(size)
    return kind(parts, size)


def _bounds(layout: Cat) -> list[int]:
    out, offset = [0], 0
    for p in layout.parts:
        offset += p.size
        out.append(offset)
    return out


def build(gm: fx.GraphModule) -> ChannelGraph:
    """Channel layouts and coupled groups of a traced, shape-annotated GraphModule."""
    return ChannelGraph(gm)


__all__ = ["ChannelGraph", "Group", "Member", "Fixed", "Leaf", "Prod", "Cat", "build",
           "format_ranges"]
