"""Pass `rescale`: resize conv kernels and the input resolution together (kernel rescaling).

de Gusmão, Francini, Lepsøy, Magli, "Fast Training of Convolutional Neural Networks via
Kernel Rescaling", 2016 (arXiv 1610.03623); method notes in design/methods.md section 1.

Convolution commutes with scaling: if y = x * k then x(u/s) * k(u/s) = s^2 y(u/s). So a
network that sees images shrunk by ``factor`` computes (approximately) the shrunk response
of the full network when each kernel is resampled to ``K * ratio`` taps and multiplied by
(K_old / K_new)^2, which keeps the kernel's sum (its response to a flat image).

How the pass follows the graph:

- The new input is round(H * factor) x round(W * factor) (``ctx.input_size`` is set).
- Strides stay, so every feature map shrinks by about the factor and every layer gets
  cheaper. Each conv's kernel is rescaled by the ratio by which *its* input feature map
  shrank, read from shapes propagated at the new size (not assumed).
- 1x1 kernels, biases, norm layers and classifiers after global pooling are scale-free.
  A kernel whose new size would be <= ``min_kernel`` is clamped to the smallest size above
  it, never above its own size (so a 3x3 at factor 0.5 stays 3x3; min_kernel=0 lets it go
  to 1x1).
- Patchify layers (stride == kernel, no padding: a ViT's 16x16/16 stem, ConvNeXt's 4x4/4
  stem and 2x2/2 downsamplers) are resolution reducers, not filters: they stay as they are
  and the grid after them shrinks by the factor. Shrinking such a kernel under a kept stride
  would skip pixels.
- Fixed pooling windows follow the conv rule; a window that covered its whole input (a
  global pool in disguise) covers the new whole input.
- ViT absolute position embeddings are resampled to the new token grid (timm's
  resample_abs_pos_embed; the prefix-token count is read from the shapes) and the traced
  image-size checks of timm's PatchEmbed (``eq`` against the old size) follow the new size.
- Anything else that cannot follow the new size (Swin windows that no longer divide the
  grid, a reshape to a fixed grid, a Linear after flatten) is refused with a SurgeryError
  naming the module.

Recoverable sizes: the source kernel, padding and input size of every layer and the
cumulative factor are kept in ``gm.meta['rescale']`` (rebuilt on replay), and every
application computes the new size from the source size * cumulative factor. So shrinking
then growing returns the source sizes exactly: 7 -> 3 -> 7, 5 -> 3 -> 5.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import SurgeryError
from ..graph import finalize, node_shape, propagate_shapes, set_module
from ..report import flops_by_node
from ..validate import (
    MAX_CHANNELS,
    ValidationError,
    at,
    expect_dict,
    expect_int,
    expect_list,
    expect_name,
    expect_number,
)
from . import PassContext, register

META_KEY = "rescale"
_SAME_SCALE = 1e-9  # a cumulative factor this close to 1 is 1: sizes return to the source exactly


@dataclass
class RescaleConfig:
    """Rescale conv kernels and the input resolution by a factor (kernel rescaling, for progressive training)."""

    factor: float = field(default=0.5, metadata={"doc": "input and kernel scale: 0.5 shrinks, 2 grows back"})
    min_kernel: int = field(default=1, metadata={
        "doc": "a kernel whose new size would be <= this is clamped to the smallest size above it (never grown)"})
    mode: Literal["bilinear", "bicubic", "area"] = field(default="bicubic", metadata={
        "doc": "interpolation of the kernel weights (antialiased when shrinking)"})
    odd: bool = field(default=True, metadata={
        "doc": "round new kernel sizes to odd, so 'same' padding stays symmetric"})
    keep_sum: bool = field(default=True, metadata={
        "doc": "correct each resampled kernel so that its sum is kept exactly (interpolation keeps it only roughly)"})

    def validate(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise SurgeryError(f"rescale:factor must be a positive number, got {self.factor}")
        if self.min_kernel < 0:
            raise SurgeryError(f"rescale:min_kernel must be >= 0, got {self.min_kernel}")


# --- the size rules ----------------------------------------------------------------------


def _round(x: float) -> int:
    return int(math.floor(round(x, 6) + 0.5))  # half up; round(x, 6) absorbs float fuzz such as 3.4999999


def _nearest_odd(x: float) -> int:
    """The odd integer nearest to ``x`` (at least 1); ties go to the smaller."""
    x = round(x, 6)
    if x <= 1:
        return 1
    lo = 2 * math.floor((x - 1) / 2) + 1
    return lo if x - lo <= lo + 2 - x else lo + 2


def new_kernel_size(k0: int, ratio: float, *, odd: bool = True, min_kernel: int = 1) -> int:
    """The size of a source kernel of ``k0`` taps at ``ratio`` times its source resolution."""
    if k0 <= 1 or abs(ratio - 1) < _SAME_SCALE:
        return k0
    k = _nearest_odd(k0 * ratio) if odd else max(1, _round(k0 * ratio))
    if k <= min_kernel:
        floor_k = min_kernel + 1
        if odd and floor_k % 2 == 0:
            floor_k += 1
        k = min(k0, floor_k)
    return k


def _new_padding(p0: int, k0: int, k: int, dilation: int) -> int:
    if p0 == (k0 - 1) // 2 * dilation:
        return (k - 1) // 2 * dilation  # "same" padding stays "same"
    if p0 == 0:
        return 0
    return _round(p0 * k / k0)


def resample_kernel(weight: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                    keep_sum: bool = True) -> torch.Tensor:
    """Resample the last two dims of ``weight`` to ``size`` by the area-preserving rule.

    ``interpolate(k, size) * (K_old / K_new)^2``: the sum of each kernel is kept (exactly
    with ``keep_sum``, by spreading the small remainder of the interpolation evenly).
    """
    *lead, kh, kw = weight.shape
    nh, nw = size
    if (kh, kw) == (nh, nw):
        return weight.clone()
    flat = weight.detach().float().reshape(-1, 1, kh, kw)
    kwargs: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": nh < kh or nw < kw}
    out = F.interpolate(flat, size=(nh, nw), mode=mode, **kwargs) * (kh * kw) / (nh * nw)
    if keep_sum:
        out = out + (flat.sum((2, 3), keepdim=True) - out.sum((2, 3), keepdim=True)) / (nh * nw)
    return out.reshape(*lead, nh, nw).to(weight.dtype)


# --- following the graph at the new size ---------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _is_pool(m: nn.Module) -> bool:
    return isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))


def _where(node: fx.Node) -> str:
    """The module a node belongs to, for messages."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    if node.op == "get_attr":
        return str(node.target)
    return f"node {node.name}"


def _shape_dim(node: Any) -> tuple[fx.Node, int] | None:
    """(tensor node, dim) when ``node`` is ``t.shape[d]``, ``t.size()[d]`` or ``t.size(d)``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        src = node.args[0]
        if isinstance(src, fx.Node) and (
                (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
                or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)):
            return src.args[0], node.args[1]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    return None


_ADAPTIVE_POOLS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)


class _Follow(fx.Interpreter):
    """Run the graph at the new size, resizing what must follow just before it runs."""

    def __init__(self, gm: fx.GraphModule, cfg: RescaleConfig, ctx: PassContext, sources: dict[str, dict],
                 hint: str = ""):
        super().__init__(gm)
        self.cfg, self.ctx, self.sources, self.hint = cfg, ctx, sources, hint
        self.planned: dict[str, dict] = ctx.plan.get("layers", {}) if ctx.replay else {}
        self.layers: dict[str, dict] = {}  # what changed
        self.kept: dict[str, int] = {}  # why layers with a kernel > 1 stayed, counted
        self.pos_embeds: dict[str, dict] = {}
        self.constants = 0
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    # -- hooks ---------------------------------------------------------------------------------

    def run_node(self, n: fx.Node) -> Any:
        try:
            if n.op == "call_module":
                module = self.module.get_submodule(n.target)
                if isinstance(module, nn.Conv2d) or _is_pool(module):
                    self._layer(n, module)
            elif n.op == "call_function" and n.target in (operator.eq, operator.ne):
                self._size_check(n)
            elif n.op == "get_attr" and str(n.target).rpartition(".")[2] == "pos_embed":
                self._pos_embed(n)
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                self.shapes[n] = tuple(out.shape)  # env drops values after their last use
                if self._fixed_resize(n):
                    self._pinned(n, out)
            return out
        except SurgeryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure here means: this part cannot follow
            _, h, w = self.ctx.input_size
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise SurgeryError(
                f"rescale: {_where(n)} cannot follow the input size {h}x{w} ({reason}); "
                + (self.hint or "choose another factor or leave this model at its size")
            ) from exc

    def _fixed_resize(self, n: fx.Node) -> bool:
        """A resize to a size of its own: F.interpolate(size=...) or Upsample(size=...), or any other
        function that gives back the model's original input size (timm's scale_image in crossvit).
        Adaptive pools are left alone: a pinned grid before a classifier is fine (VGG)."""
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            return isinstance(m, nn.Upsample) and m.size is not None
        if n.op != "call_function" or n.target in _ADAPTIVE_POOLS or not (n.args and isinstance(n.args[0], fx.Node)):
            return False
        if n.target is F.interpolate:
            return n.kwargs.get("size", n.args[1] if len(n.args) > 1 else None) is not None
        placeholder = next(p for p in self.module.graph.nodes if p.op == "placeholder")
        source, out = node_shape(placeholder), node_shape(n)
        return source is not None and out is not None and len(out) == 4 and tuple(out[2:]) == tuple(source[2:])

    def _pinned(self, n: fx.Node, out: torch.Tensor) -> None:
        """Refuse a resize that gives the size it gave before from an input that changed: past it the model
        computes at its old size, so the new input saves (or adds) nothing."""
        before_in = node_shape(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        before_out = node_shape(n)
        now_in = self.shapes.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
        if before_in is None or before_out is None or now_in is None or len(before_in) != 4 or len(out.shape) != 4:
            return
        if tuple(now_in[2:]) != tuple(before_in[2:]) and tuple(out.shape[2:]) == tuple(before_out[2:]):
            size = "x".join(map(str, out.shape[2:]))
            raise SurgeryError(f"rescale: {_where(n)} resizes its input to a fixed {size} inside the model, so "
                               "another input size changes nothing after it; leave this model at its size")

    def _in_hw(self, n: fx.Node) -> tuple[int, int]:
        x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise SurgeryError(f"rescale: cannot read the input size of {n.target}")
        return int(x.shape[-2]), int(x.shape[-1])

    def _source(self, n: fx.Node, m: nn.Module) -> dict:
        name = str(n.target)
        if name not in self.sources:
            old = node_shape(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            if old is None or len(old) < 3:
                raise SurgeryError(f"rescale: no recorded input shape for {name}; the graph lacks shapes")
            padding = m.padding if isinstance(m.padding, str) else list(_pair(m.padding))
            self.sources[name] = {"kernel": list(_pair(m.kernel_size)), "padding": padding,
                                  "stride": list(_pair(m.stride if m.stride is not None else m.kernel_size)),
                                  "in_hw": [int(old[-2]), int(old[-1])]}
        return self.sources[name]

    def _decide(self, n: fx.Node, m: nn.Module, src: dict) -> dict | None:
        """New kernel/padding/stride of one conv or pool, or None to keep it (with the reason counted)."""
        k0, s0, p0 = src["kernel"], src["stride"], src["padding"]
        if max(k0) <= 1:
            return None
        new_hw = self._in_hw(n)
        if isinstance(m, nn.Conv2d) and s0 == k0 and p0 == [0, 0]:
            self.kept["patchify"] = self.kept.get("patchify", 0) + 1
            return None
        if _is_pool(m) and k0 == src["in_hw"] and p0 == [0, 0]:
            # A window over the whole input: a global pool in disguise, it covers the new whole input.
            stride = list(new_hw) if s0 == k0 else s0
            return {"kernel": list(new_hw), "padding": [0, 0], "stride": stride}
        ratio = (new_hw[0] / src["in_hw"][0], new_hw[1] / src["in_hw"][1])
        if _is_pool(m) and s0 == k0 and p0 == [0, 0]:
            self.kept["patchify"] = self.kept.get("patchify", 0) + 1
            return None
        dilation = _pair(getattr(m, "dilation", 1))
        kernel = [new_kernel_size(k, r, odd=self.cfg.odd, min_kernel=self.cfg.min_kernel) for k, r in zip(k0, ratio)]
        if isinstance(p0, str):
            padding: Any = p0
        else:
            padding = [_new_padding(p, k, kn, d) for p, k, kn, d in zip(p0, k0, kernel, dilation)]
        if kernel == list(_pair(m.kernel_size)) and (padding == m.padding or padding == list(_pair(m.padding))):
            if kernel == k0 and any(abs(r - 1) > _SAME_SCALE for r in ratio):
                why = f"min_kernel={self.cfg.min_kernel}"
                self.kept[why] = self.kept.get(why, 0) + 1
            return None
        return {"kernel": kernel, "padding": padding, "stride": s0}

    def _layer(self, n: fx.Node, m: nn.Module) -> None:
        name = str(n.target)
        src = self._source(n, m)
        if self.ctx.replay:
            decision = self.planned.get(name)
            decision = None if decision is None else {k: decision[f"new_{k}"] for k in ("kernel", "padding", "stride")}
        else:
            decision = self._decide(n, m, src)
        if decision is None:
            return
        old = {"kernel": list(_pair(m.kernel_size)),
               "padding": m.padding if isinstance(m.padding, str) else list(_pair(m.padding)),
               "stride": list(_pair(m.stride if m.stride is not None else m.kernel_size))}
        new = copy.deepcopy(m)
        kernel, padding = tuple(decision["kernel"]), decision["padding"]
        new.kernel_size = kernel
        new.padding = padding if isinstance(padding, str) else tuple(padding)
        if _is_pool(m):
            new.stride = tuple(decision["stride"])
        else:
            new.weight = nn.Parameter(resample_kernel(m.weight.data, kernel, self.cfg.mode, self.cfg.keep_sum),
                                      requires_grad=m.weight.requires_grad)
            if not isinstance(padding, str):
                new._reversed_padding_repeated_twice = tuple(p for p in reversed(padding) for _ in range(2))
        set_module(self.module, name, new)
        self.layers[name] = {"type": type(m).__name__, **old, **{f"new_{k}": v for k, v in decision.items()}}

    def _size_check(self, n: fx.Node) -> None:
        """``x.shape[d] == OLD`` (timm's PatchEmbed asserts): the constant follows the new size."""
        for i, const in enumerate(n.args[:2]):
            other = n.args[1 - i]
            if not isinstance(const, int) or isinstance(const, bool):
                continue
            dim = _shape_dim(other)
            if dim is None:
                continue
            old_shape = node_shape(dim[0])
            new_value = self.env.get(other)
            if old_shape is None or not isinstance(new_value, int) or const != old_shape[dim[1]] or new_value == const:
                continue
            args = list(n.args)
            args[i] = new_value
            n.args = tuple(args)
            for user in list(n.users):
                if len(user.args) > 1 and isinstance(user.args[1], str):
                    user.args = (user.args[0], user.args[1].replace(f"({const})", f"({new_value})"), *user.args[2:])
            self.constants += 1

    def _pos_embed(self, n: fx.Node) -> None:
        """A ViT's absolute position embedding (1, prefix + gh*gw, D) follows the patch grid."""
        from timm.layers import resample_abs_pos_embed

        target = str(n.target)
        owner = target.rpartition(".")[0]
        pos = self.module.get_submodule(owner) if owner else self.module
        param = pos.pos_embed
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            return
        prefix_path = f"{owner}." if owner else ""
        proj = next((p for p in self.graph.nodes if p.op == "call_module"
                     and p.target == f"{prefix_path}patch_embed.proj"), None)
        if proj is None or proj not in self.shapes or node_shape(proj) is None:
            raise SurgeryError(f"rescale: {target} has no patch_embed.proj before it to read the token grid from")
        old_grid = tuple(node_shape(proj)[-2:])
        new_grid = tuple(self.shapes[proj][-2:])
        if old_grid == new_grid:
            return
        prefix = param.shape[1] - old_grid[0] * old_grid[1]
        if prefix < 0:
            raise SurgeryError(f"rescale: {target} has {param.shape[1]} tokens, fewer than the {old_grid} grid")
        mode = self.cfg.mode if self.cfg.mode != "area" else "bilinear"
        with torch.no_grad():
            resampled = resample_abs_pos_embed(param.detach().float(), list(new_grid), list(old_grid),
                                               num_prefix_tokens=prefix, interpolation=mode, antialias=True)
        pos.pos_embed = nn.Parameter(resampled.to(param.dtype), requires_grad=param.requires_grad)
        try:
            patch_embed = self.module.get_submodule(f"{prefix_path}patch_embed")
        except AttributeError:
            patch_embed = None
        if patch_embed is not None and hasattr(patch_embed, "grid_size"):
            # Cosmetic (the graph does not call PatchEmbed.forward), but keep the module honest.
            _, h, w = self.ctx.input_size
            patch_embed.img_size, patch_embed.grid_size = (h, w), new_grid
            patch_embed.num_patches = new_grid[0] * new_grid[1]
        self.pos_embeds[target] = {"grid": list(old_grid), "new_grid": list(new_grid), "prefix_tokens": prefix}


def _stride_hint(gm: fx.GraphModule, size: tuple[int, ...], new_size: tuple[int, ...]) -> str:
    """When the new input is no multiple of the model's total stride, say which sizes are."""
    h = size[1]
    heights = [s[-2] for n in gm.graph.nodes if (s := node_shape(n)) is not None and len(s) == 4 and s[-2] > 1]
    total = h // min(heights) if heights and h % min(heights) == 0 else 0
    if total <= 1 or h % total or new_size[1] % total == 0:
        return ""
    near = max(total, round(new_size[1] / total) * total)
    return (f"the model divides its input by {total}, and {new_size[1]} is no multiple of it: "
            f"try factor={near / h:.6g} (input {near})")


# --- the plan, read back -------------------------------------------------------------------------

_PLAN_KEYS = {"input_size", "scale", "source_input_size", "layers", "pos_embed"}
_LAYER_KEYS = {"type", "kernel", "padding", "stride", "new_kernel", "new_padding", "new_stride"}


def _expect_pair(value: Any, where: str, lo: int, hi: tuple[int, int]) -> list[int]:
    expect_list(value, where, min_len=2, max_len=2)
    return [expect_int(v, at(where, i), lo=lo, hi=h) for i, (v, h) in enumerate(zip(value, hi))]


def _expect_size(value: Any, where: str) -> list[int]:
    expect_list(value, where, min_len=3, max_len=3)
    return [expect_int(v, at(where, i), lo=1, hi=MAX_CHANNELS) for i, v in enumerate(value)]


def _geometry(m: nn.Module) -> dict[str, Any]:
    return {"kernel": list(_pair(m.kernel_size)),
            "padding": m.padding if isinstance(m.padding, str) else list(_pair(m.padding)),
            "stride": list(_pair(m.stride if m.stride is not None else m.kernel_size))}


def _check_plan(plan: dict, gm: fx.GraphModule, size: tuple[int, ...], source_size: list[int],
                new_size: tuple[int, ...], sources: dict[str, dict], where: str) -> None:
    """A replayed plan: the input size the factor gives, and for each resized conv or pool its present
    geometry and a new one no larger than its new input needs (a huge kernel or padding would exhaust
    memory before the layer could fail)."""
    expect_dict(plan, where, allowed=_PLAN_KEYS, required=("input_size", "layers"))
    planned = _expect_size(plan["input_size"], at(where, "input_size"))
    if planned != list(new_size):
        raise ValidationError(at(where, "input_size"), f"{planned} does not fit this model: factor and source "
                                                       f"size give {list(new_size)}")
    if "source_input_size" in plan:
        _expect_size(plan["source_input_size"], at(where, "source_input_size"))
    if "scale" in plan:
        expect_number(plan["scale"], at(where, "scale"), lo=0.0, hi=float(MAX_CHANNELS))
    grow = max(n / o for n, o in zip(new_size[1:], size[1:]))  # how much any feature map grows now
    total = max(n / o for n, o in zip(new_size[1:], source_size[1:]))  # and since the source
    resizable = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"
                 and (isinstance(m := gm.get_submodule(n.target), nn.Conv2d) or _is_pool(m))}
    layers = at(where, "layers")
    for name, e in expect_dict(plan["layers"], layers).items():
        w = at(layers, name)
        if name not in resizable:
            raise ValidationError(w, f"no conv or pooling layer {name!r} in this model")
        node, m = resizable[name], gm.get_submodule(name)
        expect_dict(e, w, allowed=_LAYER_KEYS, required=("new_kernel", "new_padding", "new_stride"))
        now = {"type": type(m).__name__, **_geometry(m)}
        for key, actual in now.items():
            if key in e and e[key] != actual:
                raise ValidationError(at(w, key), f"{e[key]!r} does not fit this model: {name} has {actual!r}")
        src = sources.get(name) or now
        in_hw = (node_shape(node.args[0]) or (0, 0))[-2:] if isinstance(node.args[0], fx.Node) else (0, 0)
        dilation = _pair(getattr(m, "dilation", 1))
        # The rules give at most k0 times a map's growth since the source (+2 for rounding small maps,
        # +1 to odd), or a whole new input map.
        hi_k = tuple(max(k, k0 * math.ceil(total + 2) + 1, math.ceil(h * grow) + 2)
                     for k, k0, h in zip(now["kernel"], src["kernel"], in_hw))
        kernel = _expect_pair(e["new_kernel"], at(w, "new_kernel"), 1, hi_k)
        if isinstance(src["padding"], str) or isinstance(e["new_padding"], str):
            if e["new_padding"] != src["padding"]:
                raise ValidationError(at(w, "new_padding"), f"{e['new_padding']!r} does not fit this model: "
                                                            f"{name} was padded {src['padding']!r}")
        else:  # "same" padding follows the kernel; other padding at most in proportion to it
            hi_p = tuple(max(p, p0, -(-max(p0, k0) * k // k0) * d) for p, p0, k0, k, d in zip(
                now["padding"], src["padding"], src["kernel"], kernel, dilation))
            _expect_pair(e["new_padding"], at(w, "new_padding"), 0, hi_p)
        hi_s = tuple(max(s, s0, k) for s, s0, k in zip(now["stride"], src["stride"], kernel))
        _expect_pair(e["new_stride"], at(w, "new_stride"), 1, hi_s)
    if "pos_embed" in plan:  # a record only: replay resamples from the shapes
        embeds = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for name, e in expect_dict(plan["pos_embed"], at(where, "pos_embed")).items():
            w = at(at(where, "pos_embed"), name)
            expect_name(name, w, embeds, "position embedding")
            expect_dict(e, w, allowed={"grid", "new_grid", "prefix_tokens"})
            for key in ("grid", "new_grid"):
                if key in e:
                    _expect_pair(e[key], at(w, key), 1, (MAX_CHANNELS, MAX_CHANNELS))
            if "prefix_tokens" in e:
                expect_int(e["prefix_tokens"], at(w, "prefix_tokens"), lo=0, hi=MAX_CHANNELS)


@register("rescale", RescaleConfig, resizes_input=True)
def rescale(gm: fx.GraphModule, cfg: RescaleConfig, ctx: PassContext) -> fx.GraphModule:
    """Rescale every conv kernel by its feature map's scale, and the input by ``factor``."""
    example = ctx.example_inputs[0]
    if len(ctx.example_inputs) != 1 or not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise SurgeryError("rescale needs one image batch (B, C, H, W) as the example input")
    propagate_shapes(gm, example)  # the shapes at the current size, the reference of every ratio
    size = tuple(ctx.input_size) or tuple(example.shape[1:])
    record = gm.meta.get(META_KEY) or {}
    source_size = list(record.get("input_size") or size)
    scale = float(record.get("scale", 1.0)) * cfg.factor
    if abs(scale - 1) < _SAME_SCALE:
        new_size = tuple(source_size)
    else:
        new_size = (source_size[0], _round(source_size[1] * scale), _round(source_size[2] * scale))
    if ctx.replay:
        _check_plan(ctx.plan, gm, size, source_size, new_size, record.get("layers", {}), ctx.where)
    if min(new_size[1:]) < 1:
        raise SurgeryError(f"rescale: factor {cfg.factor} leaves no pixel of the {size[1]}x{size[2]} input")
    ctx.input_size = new_size
    # Per-node FLOPs at the old size (the report's formulas): which compute follows the input.
    before = flops_by_node(gm, example[:1]) if not ctx.replay and new_size != size else None
    sources = copy.deepcopy(record.get("layers", {}))
    follow = _Follow(gm, cfg, ctx, sources, _stride_hint(gm, size, new_size))
    x = torch.randn(example.shape[0], *new_size, generator=torch.Generator().manual_seed(0)).to(example)
    try:
        with torch.no_grad():
            follow.run(x)
    except SurgeryError as exc:  # fx appends "While executing ..." to the message: keep it one line
        raise SurgeryError(str(exc).splitlines()[0]) from exc.__cause__
    gm = finalize(gm)
    gm.meta[META_KEY] = {"input_size": source_size, "scale": scale, "layers": sources}
    ctx.plan.update({"input_size": list(new_size), "scale": scale, "source_input_size": source_size,
                     "layers": follow.layers, "pos_embed": follow.pos_embeds})
    changed = ", ".join(f"{name} {'x'.join(map(str, v['kernel']))}->{'x'.join(map(str, v['new_kernel']))}"
                        for name, v in list(follow.layers.items())[:4])
    more = f" (+{len(follow.layers) - 4} more)" if len(follow.layers) > 4 else ""
    kept = ", ".join(f"{c} {why}" for why, c in follow.kept.items())
    ctx.note(f"input {size[1]}x{size[2]} -> {new_size[1]}x{new_size[2]}; {len(follow.layers)} kernels/windows "
             f"resized{': ' + changed + more if changed else ''}" + (f"; kept: {kept}" if kept else ""))
    if follow.constants:
        ctx.note(f"{follow.constants} traced size check(s) (x.shape[d] == old size) follow the new size")
    for name, v in follow.pos_embeds.items():
        ctx.note(f"{name}: grid {'x'.join(map(str, v['grid']))} -> {'x'.join(map(str, v['new_grid']))} "
                 f"({v['prefix_tokens']} prefix tokens kept)")
    if tuple(new_size) == tuple(size):
        ctx.reason = f"factor {cfg.factor:g} keeps the input at {size[1]}x{size[2]} (rounded to whole pixels)"
    if before is not None and sum(before.values()):
        _scaling(gm, before, x[:1], size, new_size, cfg, ctx)
    return gm


def _scaling(gm: fx.GraphModule, before: dict[str, int], x: torch.Tensor, size: tuple[int, ...],
             new_size: tuple[int, ...], cfg: RescaleConfig, ctx: PassContext) -> None:
    """The target: compute falls (or rises) with the pixels; the FLOPs that do not follow, named."""
    after = flops_by_node(gm, x)
    pixels = new_size[1] * new_size[2] / (size[1] * size[2])
    shrink = pixels < 1
    nodes = {n.name: n for n in gm.graph.nodes}
    fixed = sorted((n for n, f in before.items() if (after.get(n, 0) >= f if shrink else after.get(n, 0) <= f)),
                   key=lambda n: -before[n])
    total = sum(before.values())
    share = sum(before[n] for n in fixed) / total
    names = [str(nodes[n].target) if n in nodes and nodes[n].op == "call_module" else n for n in fixed]
    listed = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
    ctx.note(f"FLOPs {sum(after.values()) / total:.3f}x for {pixels:.3f}x the pixels (report's formulas, "
             f"per node); {share:.1%} of the FLOPs do not {'fall' if shrink else 'rise'} with the input"
             + (f": {listed}" if fixed else ""))
    ctx.target = {"kind": "factor", "requested": cfg.factor, "pixels": round(pixels, 6), "expected_flops": 1.0,
                  "bound": "less" if shrink else "more"}
    if share >= 1.0:
        ctx.target["cause"] = f"no counted layer follows the input size: {listed}"
