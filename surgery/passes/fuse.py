"""Pass `fuse`: fold BatchNorm into the conv or linear layer before it.

Function-preserving in eval mode: y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
becomes W' x + b' with W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps).
timm's norm-act layers (BatchNormAct2d, ...) also apply dropout and an activation: the
BatchNorm part folds, the activation stays in the graph.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..graph import finalize, get_module, set_module
from ..validate import ValidationError, at, expect_dict, expect_list, expect_name
from . import PassContext, register


@dataclass
class FuseConfig:
    """Fold BatchNorm into the preceding conv/linear (function-preserving, for inference)."""

    skip: list[str] = field(default_factory=list,
                            metadata={"doc": "glob(s) of norm module names to leave, joined by +"})


def _norm_types() -> tuple[type, ...]:
    types: list[type] = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozen

        types.append(TvFrozen)
    except ImportError:
        pass
    try:
        from timm.layers import FrozenBatchNorm2d, FrozenBatchNormAct2d

        types += [FrozenBatchNorm2d, FrozenBatchNormAct2d]
    except ImportError:
        pass
    return tuple(types)


def _producer_types() -> tuple[type, ...]:
    types: list[type] = [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]
    try:
        from timm.layers import Conv2dSame  # dynamic padding, but reads self.weight/self.bias

        types.append(Conv2dSame)
    except ImportError:
        pass
    return tuple(types)


def _is_foldable_norm(m: nn.Module) -> bool:
    # Batch statistics at inference (no running stats) cannot be folded.
    return isinstance(m, _norm_types()) and getattr(m, "running_mean", None) is not None


def _is_plain_producer(m: nn.Module) -> bool:
    # Exact types: subclasses such as StdConv2d rewrite their weight in forward().
    return type(m) in _producer_types()


def _fold(producer: nn.Module, norm: nn.Module) -> nn.Module:
    """A copy of ``producer`` whose output equals ``norm(producer(x))`` in eval mode."""
    mean, var = norm.running_mean.float(), norm.running_var.float()
    gamma = norm.weight.float() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.float() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + norm.eps)
    fused = copy.deepcopy(producer)
    weight = producer.weight.detach().float()
    bias = producer.bias.detach().float() if producer.bias is not None else torch.zeros_like(mean)
    dtype = producer.weight.dtype
    shape = (-1,) + (1,) * (weight.dim() - 1)
    fused.weight = nn.Parameter((weight * scale.reshape(shape)).to(dtype))
    fused.bias = nn.Parameter(((bias - mean) * scale + beta).to(dtype))
    return fused


def _activation_of(norm: nn.Module) -> nn.Module | None:
    """What a norm-act layer applies after normalising, or None for a plain norm."""
    parts = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None))
             if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _candidates(gm: fx.GraphModule, skip: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for node in gm.graph.nodes:
        norm = get_module(gm, node)
        if norm is None or not _is_foldable_norm(norm):
            continue
        if any(fnmatch.fnmatchcase(node.target, pat) for pat in skip):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or len(src.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        producer = get_module(gm, src)
        if producer is None or not _is_plain_producer(producer):
            continue
        out_features = producer.weight.shape[0]
        if out_features != norm.running_mean.numel():
            continue
        if isinstance(producer, nn.Linear):
            # BatchNorm1d normalises dim 1: only a (B, C) output lines up with Linear's features.
            shape = src.meta.get("tensor_meta")
            if shape is None or len(shape.shape) != 2:
                continue
        pairs.append((src.target, node.target))
    return pairs


def _check_plan(plan: dict, gm: fx.GraphModule, cfg: FuseConfig, where: str) -> list[tuple[str, str]]:
    """The pairs of a replayed plan, each one this model can fold, each layer once."""
    expect_dict(plan, where, allowed={"folded"}, required=("folded",))
    folded = at(where, "folded")
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    foldable = set(_candidates(gm, cfg.skip))
    pairs: list[tuple[str, str]] = []
    used: set[str] = set()
    for i, item in enumerate(expect_list(plan["folded"], folded)):
        w = at(folded, i)
        expect_list(item, w, min_len=2, max_len=2)
        producer, norm = (expect_name(v, at(w, j), called, "layer") for j, v in enumerate(item))
        if (producer, norm) not in foldable:
            # Folding anything else (a shared output, a skipped norm) would change the function.
            raise ValidationError(w, f"{norm} cannot be folded into {producer} in this model "
                                     "(not a conv/linear feeding only this BatchNorm)")
        for j, name in enumerate((producer, norm)):
            if name in used:
                raise ValidationError(at(w, j), f"{name} is folded twice")
            used.add(name)
        pairs.append((producer, norm))
    return pairs


@register("fuse", FuseConfig)
def fuse(gm: fx.GraphModule, cfg: FuseConfig, ctx: PassContext) -> fx.GraphModule:
    """Fold every foldable BatchNorm into its producer."""
    if ctx.replay:
        pairs = _check_plan(ctx.plan, gm, cfg, ctx.where)
    else:
        pairs = _candidates(gm, cfg.skip)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    folded_acts = 0
    for producer_name, norm_name in pairs:
        norm_node = nodes[norm_name]
        producer_node = nodes[producer_name]
        norm = gm.get_submodule(norm_name)
        set_module(gm, producer_name, _fold(gm.get_submodule(producer_name), norm))
        act = _activation_of(norm)
        if act is None:
            norm_node.replace_all_uses_with(producer_node)
            gm.graph.erase_node(norm_node)
        else:
            set_module(gm, norm_name, act)  # the node now calls just the activation
            folded_acts += 1
    ctx.plan["folded"] = [list(p) for p in pairs]
    gm = finalize(gm)
    remaining = sum(isinstance(m, _norm_types()) for m in gm.modules())
    if not pairs:
        norms = sum(_is_foldable_norm(m) for m in gm.modules())
        ctx.reason = ("the model has no BatchNorm with running statistics" if not norms else
                      f"none of its {norms} BatchNorm layer(s) follows a plain conv/linear whose output only it "
                      "reads" + (" (or they are skipped)" if cfg.skip else ""))
    ctx.note(f"folded {len(pairs)} BatchNorm layers ({folded_acts} norm-act kept their activation); "
             f"{remaining} BatchNorm layers remain")
    return gm
