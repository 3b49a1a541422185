"""Pass `prune`: structured channel pruning over coupled channel groups.

The groups come from :mod:`surgery.channels` (shared with other passes); this module is
the policy: importance of each channel, how many to keep in each group (a ratio, or a
FLOPs target found by bisection over the ratio), rounding, and the plan that lets
``surgery.load`` slice a fresh model identically. The result is physically smaller:
sliced weights, no masks.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import fx

from .. import recover
from ..channels import ChannelGraph, Group, Member, build, einsum_parts, format_ranges
from ..data import Calibration, load_calibration
from ..errors import SurgeryError
from ..graph import finalize, get_module, node_shape
from ..inputs import size_of
from ..progress import bar
from ..recover import Fit
from ..report import count_model
from ..validate import MAX_CHANNELS, ValidationError, at, expect_dict, expect_int, expect_number, expect_ranges
from . import PassContext, register

DEFAULT_RATIO = 0.3
FLOPS_SEARCH_STEPS = 24
MAX_LISTED = 4


@dataclass
class PruneConfig:
    """Remove channels (whole coupled groups at once): physically smaller conv/linear/norm layers."""

    ratio: float | None = field(default=None, metadata={
        "doc": f"fraction of the prunable channels to remove (default {DEFAULT_RATIO} when flops is not given)"})
    flops: float | None = field(default=None, metadata={
        "doc": "target FLOPs as a fraction of the original (the ratio is searched to meet it)"})
    importance: Literal["l1", "l2", "bn", "taylor", "random"] = field(default="l2", metadata={
        "doc": "channel score: weight magnitude summed over the group (l1, l2), norm scale |gamma| (bn), "
               "first-order |weight x gradient| on the data (taylor), or random (a control)"})
    scope: Literal["global", "uniform"] = field(default="global", metadata={
        "doc": "global: rank channels of all groups together (scores normalised per group); "
               "uniform: remove the same fraction from every group"})
    round_to: int = field(default=8, metadata={
        "doc": "keep channel counts multiples of this (hardware friendly); 1 to disable"})
    max_ratio: float = field(default=0.9, metadata={
        "doc": "most of one group's channels that may be removed"})
    ignore: list[str] = field(default_factory=list, metadata={
        "doc": "glob(s) of module names whose layers keep their shape, joined by +"})
    heads: bool = field(default=True, metadata={"doc": "prune whole attention heads"})
    head_dims: bool = field(default=False, metadata={
        "doc": "also prune dimensions inside each attention head (the attention scale is pinned)"})
    recover: bool = field(default=False, metadata={
        "doc": "refit each layer that lost input channels by least squares on the data, to reproduce "
               "its old output (recovers accuracy without training; surgery.recover)"})
    compensate: bool = field(default=False, metadata={"doc": "the earlier name of recover"})
    data: str | None = field(default=None, metadata={
        "doc": "calibration images for taylor and recover: digits or an ImageFolder path "
               "(default: the run's --data, where the pipeline passes it)"})
    calib: int = field(default=64, metadata={"doc": "calibration images to use from data"})
    ridge: float = field(default=1e-3, metadata={
        "doc": "ridge of the recovery least squares, relative to the mean input energy"})
    seed: int = field(default=0, metadata={"doc": "seed of the random importance and of calibration sampling"})

    def validate(self) -> None:
        if self.ratio is not None and self.flops is not None:
            raise SurgeryError("prune: give ratio or flops, not both")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise SurgeryError(f"prune:ratio must be in [0, 1), got {self.ratio}")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise SurgeryError(f"prune:flops must be in (0, 1], got {self.flops}")
        if self.round_to < 1:
            raise SurgeryError(f"prune:round_to must be >= 1, got {self.round_to}")
        if not 0.0 < self.max_ratio < 1.0:
            raise SurgeryError(f"prune:max_ratio must be in (0, 1), got {self.max_ratio}")
        if self.calib < 1 or self.ridge < 0:
            raise SurgeryError("prune:calib must be >= 1 and prune:ridge >= 0")


# --- importance ------------------------------------------------------------------------


def _param(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


ROLES = ("out", "in", "norm", "param")  # member axes that score a channel (not running stats)


def _to_groups(cg: ChannelGraph, groups: list[Group], per_position: list[tuple[Member, np.ndarray]]
               ) -> dict[int, np.ndarray]:
    """Add per-position scores of member axes into the channels of their groups."""
    scores = {g.id: np.zeros(g.size) for g in groups}
    for m, values in per_position:
        for r, coords in cg.atoms(m.layout).items():
            if r in scores:
                valid = coords >= 0
                scores[r] += np.bincount(coords[valid], weights=values[valid], minlength=scores[r].size)
    return scores


def _per_axis(t: torch.Tensor, axis: int) -> np.ndarray:
    other = [d for d in range(t.dim()) if d != axis]
    return (t.sum(dim=other) if other else t).double().numpy()


def importance(gm: fx.GraphModule, cg: ChannelGraph, groups: list[Group], kind: str, seed: int = 0,
               calib: Calibration | None = None) -> tuple[dict[int, np.ndarray], int]:
    """Score of every channel of every group; also how many groups fell back to l2 (bn).

    l1 / l2: magnitude of every weight that produces or consumes the channel, summed over
    the group. bn: |scale| of the group's norm layers. taylor: |sum of weight x gradient|
    per member axis, accumulated over the calibration batches (first-order loss change).
    """
    if kind == "random":
        rng = np.random.default_rng(seed)
        return {g.id: rng.random(g.size) for g in groups}, 0
    ids = {g.id for g in groups}
    members = [m for m in cg.members if m.role in ROLES and any(r in ids for r in cg.roots(m.layout))]
    if kind == "taylor":
        if calib is None:
            raise SurgeryError("prune:importance=taylor needs calibration data: add data=digits or data=FOLDER")
        return _to_groups(cg, groups, _taylor(gm, members, calib)), 0
    power = 1 if kind == "l1" else 2
    cache: dict[str, torch.Tensor] = {}
    per_position = []
    for m in members:
        if m.param not in cache:
            t = _param(gm, m.param).detach().float()
            cache[m.param] = t.abs() if power == 1 else t.square()
        per_position.append((m, _per_axis(cache[m.param], m.axis)))
    scores = _to_groups(cg, groups, per_position)
    if power == 2:
        scores = {g: np.sqrt(s) for g, s in scores.items()}
    if kind != "bn":
        return scores, 0
    scales = [(m, _per_axis(_param(gm, m.param).detach().float().abs(), m.axis)) for m in members
              if m.role == "norm" and m.param.endswith("weight")]
    bn = _to_groups(cg, groups, scales)
    with_scale = {r for m, _ in scales for r in cg.roots(m.layout)}
    fallback = sum(1 for g in groups if g.id not in with_scale)
    return {g: (bn[g] if g in with_scale else s) for g, s in scores.items()}, fallback


def _taylor(gm: fx.GraphModule, members: list[Member], calib: Calibration) -> list[tuple[Member, np.ndarray]]:
    """|sum over a channel's weights of w * dL/dw|, summed over batches, for each member axis.

    The loss is cross-entropy against the labels when the data has as many classes as the
    model has outputs, else against the model's own predictions (label-free sensitivity).
    """
    names = sorted({m.param for m in members})
    tensors = [_param(gm, n) for n in names]
    was_training = gm.training
    gm.eval()
    totals = [np.zeros(tensors[names.index(m.param)].shape[m.axis]) for m in members]
    flags = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        for images, labels in bar(calib.batches, "prune: taylor importance", unit="batch"):
            logits = gm(images)
            target = labels if logits.shape[-1] == calib.num_classes else logits.argmax(-1).detach()
            loss = torch.nn.functional.cross_entropy(logits, target)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            wg = {n: (t.detach() * g).float() for n, t, g in zip(names, tensors, grads) if g is not None}
            for i, m in enumerate(members):
                if m.param in wg:
                    totals[i] += np.abs(_per_axis(wg[m.param], m.axis))
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
        gm.train(was_training)
    return list(zip(members, totals))


# --- recovery: what the refitted layers must reproduce ----------------------------------------


def _consumers(gm: fx.GraphModule, cg: ChannelGraph, keep: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Conv2d (groups 1) and Linear layers that lost input channels: the mask of their kept outputs."""
    out = {}
    for name, (kind, ports) in cg.modules.items():
        m = gm.get_submodule(name)
        if kind not in ("conv", "linear") or not recover.fittable(m):
            continue  # dynamic or string padding, grouped, other dims: left as pruned
        in_mask = cg.keep_mask(ports["in"], keep)
        if not in_mask.all() and in_mask.any():
            out[name] = cg.keep_mask(ports["out"], keep)
    return out


def _fits(gm: fx.GraphModule, consumers: dict[str, np.ndarray]) -> list[Fit]:
    """Each consumer's call must reproduce its old output at its kept channels (same node names)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in consumers:
            linear = isinstance(gm.get_submodule(node.target), torch.nn.Linear)
            out.append(Fit(node.name, node.name, "linear", np.flatnonzero(consumers[node.target]).tolist(),
                           axis=-1 if linear else 1))
    return out


# --- selection -------------------------------------------------------------------------


@dataclass
class _Choice:
    group: Group
    score: np.ndarray  # raw importance
    step: int
    allowed: np.ndarray  # keep counts allowed, ascending


def _choices(groups: list[Group], scores: dict[int, np.ndarray], cfg: PruneConfig) -> list[_Choice]:
    out = []
    for g in groups:
        step = max(1, cfg.round_to // math.gcd(cfg.round_to, g.multiplicity))
        floor = max(step, math.ceil(g.size * (1 - cfg.max_ratio)))
        allowed = sorted({k for k in range(step, g.size + 1, step) if k >= floor} | {g.size})
        out.append(_Choice(g, scores[g.id], step, np.asarray(allowed)))
    return out


def _round(allowed: np.ndarray, target: float) -> int:
    i = int(np.argmin(np.abs(allowed - target) - 1e-9 * allowed))  # ties: keep more
    return int(allowed[i])


def _keep_counts(choices: list[_Choice], ratio: float, scope: str, order: np.ndarray | None,
                 owner: np.ndarray | None) -> list[int]:
    if not choices:
        return []
    if scope == "uniform" or ratio <= 0:
        return [_round(c.allowed, c.group.size * (1 - ratio)) for c in choices]
    removed = np.zeros(len(choices))
    n_remove = int(round(ratio * len(order)))
    np.add.at(removed, owner[order[:n_remove]], 1)
    return [_round(c.allowed, c.group.size - r) for c, r in zip(choices, removed)]


def _global_order(choices: list[_Choice]) -> tuple[np.ndarray, np.ndarray]:
    """All channels ranked by score normalised by their group's mean, lowest first."""
    normed, owner = [], []
    for i, c in enumerate(choices):
        mean = c.score.mean()
        normed.append(c.score / mean if mean > 0 else np.ones_like(c.score))
        owner.append(np.full(c.group.size, i))
    normed_all, owner_all = np.concatenate(normed), np.concatenate(owner)
    return np.argsort(normed_all, kind="stable"), owner_all


def _keep_masks(choices: list[_Choice], counts: list[int]) -> dict[int, np.ndarray]:
    keep = {}
    for c, k in zip(choices, counts):
        if k >= c.group.size:
            continue
        top = np.argsort(-c.score, kind="stable")[:k]
        mask = np.zeros(c.group.size, dtype=bool)
        mask[top] = True
        keep[c.group.id] = mask
    return keep


# --- FLOPs of the pruned model, without building it -------------------------------------


def estimate_flops(gm: fx.GraphModule, cg: ChannelGraph, counts: dict[int, int]) -> int:
    """FLOPs (multiply-add = 2) of conv, linear, attention and matmul nodes at the traced batch."""
    nodes = {n.name: n for n in gm.graph.nodes}
    total = 0
    for name, kind in cg.compute:
        node = nodes[name]
        out = math.prod(cg.new_shape(name, counts))
        if kind == "conv":
            m = get_module(gm, node)
            k_in = cg.kept(cg.modules[node.target][1]["k_in"], counts)
            total += 2 * out * k_in * math.prod(m.kernel_size)
        elif kind == "conv_transpose":  # every input value feeds k_out x kernel outputs
            m = get_module(gm, node)
            k_out = cg.kept(cg.modules[node.target][1]["k_out"], counts)
            total += 2 * math.prod(cg.new_shape(node.args[0].name, counts)) * k_out * math.prod(m.kernel_size)
        elif kind in ("linear", "matmul"):
            total += 2 * out * cg.new_shape(node.args[0].name, counts)[-1]
        elif kind == "sdpa":
            q, k = (cg.new_shape(a.name, counts) for a in node.args[:2])
            total += 2 * math.prod(q) * k[-2] + 2 * out * k[-2]
        elif kind == "einsum":  # every combination of the letters' indices is one multiply-add
            specs, _, operands = einsum_parts(node)
            sizes = {c: n for spec, op in zip(specs, operands) for c, n in zip(spec, cg.new_shape(op.name, counts))}
            total += 2 * math.prod(sizes.values())
        elif kind == "window_attention":  # qkv and proj linears, q @ k and attn @ v inside each window
            c, tokens = cg.new_shape(name, counts)[-1], out // cg.new_shape(name, counts)[-1]
            window = math.prod(node.args[4])
            total += 2 * tokens * c * 4 * c + 4 * tokens * window * c
    return total


# --- the FLOPs target: searched on the estimate, settled by the report's counter -------------

FLOPS_TOLERANCE = 0.01  # the report's counter within 1% of the target, or the record says why not
COUNTER_ROUNDS = 4  # counts of a candidate by the report's counter (each slices a copy)
MAX_FILL_SWEEPS = 64  # a tie in the scores (random init) can drop a wide group many steps below the target


def _next_score(c: _Choice, kept: int) -> float:
    """Normalised score of the best channel a group has removed: the one given back first."""
    ranked = np.sort(c.score)[::-1]
    mean = c.score.mean()
    return float(ranked[kept] / mean) if mean > 0 and kept < len(ranked) else 0.0


def _fill(choices: list[_Choice], counts: list[int], flops_of, budget: float) -> tuple[list[int], bool]:
    """Give channels back, best next channel first, while the FLOPs stay within ``budget``.

    One global ratio moves every group's rounding at once; from the ratio's bisection, each
    group can still take a step back that fits, which brings the result up to the target.
    Returns the counts and whether nothing more fits (False: stopped after MAX_FILL_SWEEPS).
    """
    counts = list(counts)
    jump = [1] * len(choices)  # steps a group tries at once: doubled after a fit, halved after a miss
    for _ in range(MAX_FILL_SWEEPS):
        moved = False
        for i in sorted((i for i, c in enumerate(choices) if counts[i] < c.group.size),
                        key=lambda i: -_next_score(choices[i], counts[i])):
            bigger = choices[i].allowed[choices[i].allowed > counts[i]]
            trial = counts[:i] + [int(bigger[min(jump[i], len(bigger)) - 1])] + counts[i + 1:]
            if flops_of(trial) <= budget:
                counts, moved = trial, True
                jump[i] *= 2
            elif jump[i] > 1:
                jump[i] //= 2
                moved = True  # a smaller step may still fit
        if not moved:
            return counts, True
    return counts, False


def _next_goal(history: list[tuple[float, float]], target: float) -> float:
    """The estimate's next goal: the secant through the last two (goal, counted) points, or the
    first point scaled by target / counted; kept within (0, 1]."""
    (g1, r1) = history[-1]
    goal = g1 * target / r1 if r1 > 0 else g1
    if len(history) > 1:
        g0, r0 = history[-2]
        if r1 != r0 and g1 != g0 and (r1 - r0) / (g1 - g0) > 0:
            goal = g1 + (target - r1) * (g1 - g0) / (r1 - r0)
    return min(max(goal, 1e-6), 1.0)


def _flops_search(gm: fx.GraphModule, cg: ChannelGraph, choices: list[_Choice], counts_at, cfg: PruneConfig,
                  ctx: PassContext, groups: list[Group]) -> tuple[float, list[int]]:
    """Keep counts that meet ``cfg.flops`` by the report's counter (:func:`surgery.report.count_model`).

    The analytic estimate searches (bisection over the ratio, then :func:`_fill`); the
    counter measures the candidate; where they differ, the estimate's goal is corrected by
    their ratio and the search runs again. Sets ``ctx.target``, with the cause of a shortfall.
    """
    target = cfg.flops
    size = size_of(ctx.example_inputs)
    base_est = estimate_flops(gm, cg, {})
    base = count_model(gm, size)["flops"]

    def estimate(counts: list[int]) -> int:
        return estimate_flops(gm, cg, {c.group.id: k for c, k in zip(choices, counts)})

    def counted(counts: list[int]) -> float:
        sliced = finalize(cg.apply(copy.deepcopy(gm), _keep_masks(choices, counts)))
        return count_model(sliced, size)["flops"] / base

    ctx.target = {"kind": "flops", "requested": target, "expected_flops": target, "bound": "equal"}
    if not base or not base_est or not choices:  # nothing the target could be measured on: prune nothing
        ratio = 0.0
        counts = counts_at(ratio)
        ctx.target["cause"] = ("no prunable channel group" if not choices else
                               "no conv, linear or attention FLOPs to count")
        return ratio, counts
    goal, best, history = target, None, []
    filled = True
    for _ in bar(range(COUNTER_ROUNDS), "prune: FLOPs search (counted)", unit="round"):
        budget = goal * base_est
        if estimate(counts_at(cfg.max_ratio)) > budget:
            ratio, counts, reach = cfg.max_ratio, counts_at(cfg.max_ratio), False
        else:
            lo, hi = 0.0, cfg.max_ratio
            for _ in range(FLOPS_SEARCH_STEPS):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if estimate(counts_at(mid)) <= budget else (mid, hi)
            counts, filled = _fill(choices, counts_at(hi), estimate, budget)
            ratio, reach = hi, True
        real, est = counted(counts), estimate(counts) / base_est
        key = (real > target * (1 + FLOPS_TOLERANCE), abs(real - target))  # within the budget first
        if best is None or key < best[0]:
            best = (key, ratio, counts, real, est, reach, filled)
        if abs(real - target) <= FLOPS_TOLERANCE * target or not reach or abs(est - real) <= 1e-4:
            break  # met; out of reach; or the estimate is the counter and the gap is the channel steps
        history.append((goal, real))
        goal = _next_goal(history, target)
    _, ratio, counts, real, est, reach, filled = best
    ctx.note(f"FLOPs target {target:g}: {real:.3f}x by the report's counter (the search's estimate "
             f"{est:.3f}x); ratio {ratio:.3f}")
    if abs(real - target) > FLOPS_TOLERANCE * target:
        whole = [g for g in groups if not g.prunable]
        if not reach:
            why = f"removing up to max_ratio={cfg.max_ratio:g} of every prunable group"
            why += f"; {len(whole)} group(s) kept whole: {_reason_summary(whole)}" if whole else ""
        elif not filled:
            why = f"giving channels back stopped after {MAX_FILL_SWEEPS} sweeps"
        else:
            why = (f"the closest {len(choices)} group(s) reach in steps of round_to={cfg.round_to}"
                   + (" (round_to=1 for finer steps)" if cfg.round_to > 1 else " (one channel)"))
        ctx.target["cause"] = f"{real:.3f}x: {why}"
    return ratio, counts


# --- the pass ----------------------------------------------------------------------------


def _flat(value: object) -> list:
    if isinstance(value, (list, tuple)):
        return [y for v in value for y in _flat(v)]
    if isinstance(value, dict):
        return [y for v in value.values() for y in _flat(v)]
    return [value]


def _policy_fixes(gm: fx.GraphModule, cg: ChannelGraph, cfg: PruneConfig) -> None:
    """What the options keep whole: ignored modules, heads, per-head dims, group widths."""
    for m in cg.members:
        module = m.param.rpartition(".")[0]
        for pat in cfg.ignore:
            if fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(m.param, pat):
                cg.fix(m.layout, f"ignored ({pat})")
    for g in cg.groups():
        if "heads" in g.tags and not cfg.heads:
            cg.fix_group(g.id, "attention heads (heads=off)")
        if "head_dim" in g.tags and not cfg.head_dims:
            cg.fix_group(g.id, "dimensions inside attention heads (head_dims=off)")
        if "group_width" in g.tags:
            cg.fix_group(g.id, "width of each group of a grouped conv (whole groups are pruned)")


def _reason_summary(groups: list[Group]) -> str:
    kinds: Counter[str] = Counter()
    example: dict[str, str] = {}
    for g in groups:
        reason = g.reasons[0] if g.reasons else "unknown"
        kind = reason.split(" at ")[0]
        kinds[kind] += 1
        example.setdefault(kind, g.anchor)
    return "; ".join(f"{n} x {k} (e.g. {example[k]})" for k, n in kinds.most_common())


def _check_plan(plan: dict, by_anchor: dict[str, Group], where: str) -> dict[int, np.ndarray]:
    """The kept-channel masks of a replayed plan, by group id: groups of this model, indices in range."""
    expect_dict(plan, where, allowed={"ratio", "groups"}, required=("groups",))
    if "ratio" in plan:
        expect_number(plan["ratio"], at(where, "ratio"), lo=0.0, hi=1.0)
    groups = at(where, "groups")
    keep = {}
    for anchor, entry in expect_dict(plan["groups"], groups).items():
        w = at(groups, anchor)
        g = by_anchor.get(anchor)
        if g is None or not g.prunable:
            raise ValidationError(w, f"the plan does not fit this model: it has no prunable channel group "
                                     f"{anchor!r}; rebuild the artifact with this surgery version")
        expect_dict(entry, w, allowed={"size", "keep"}, required=("size", "keep"))
        size = expect_int(entry["size"], at(w, "size"), lo=1, hi=MAX_CHANNELS)
        if size != g.size:
            raise ValidationError(at(w, "size"), f"the plan does not fit this model: the group has {g.size} "
                                                 f"channels, not {size}")
        mask = np.zeros(g.size, dtype=bool)
        mask[expect_ranges(entry["keep"], at(w, "keep"), g.size)] = True
        keep[g.id] = mask
    return keep


@register("prune", PruneConfig)
def prune(gm: fx.GraphModule, cfg: PruneConfig, ctx: PassContext) -> fx.GraphModule:
    """Prune channels group by group; record the kept indices in the plan."""
    start = time.perf_counter()
    cg = build(gm)
    _policy_fixes(gm, cg, cfg)
    groups = cg.groups()
    prunable = [g for g in groups if g.prunable]
    by_anchor = {g.anchor: g for g in groups}
    if ctx.replay:
        keep = _check_plan(ctx.plan, by_anchor, ctx.where)
    else:
        calib = None
        needs = [w for w, on in (("importance=taylor", cfg.importance == "taylor"),
                                 ("recover", cfg.recover or cfg.compensate)) if on]
        if needs:
            spec = cfg.data or getattr(ctx, "data", None)  # the option, else the run's --data
            if not spec:
                raise SurgeryError(f"prune:{' and '.join(needs)} needs calibration images: add data=digits "
                                   "or data=FOLDER to the pass")
            calib = load_calibration(spec, ctx.example_inputs, cfg.calib, seed=cfg.seed, who="prune",
                                     norm=ctx.norm)
        scores, fallback = importance(gm, cg, prunable, cfg.importance, cfg.seed, calib)
        choices = _choices(prunable, scores, cfg)
        order, owner = _global_order(choices) if choices and cfg.scope == "global" else (None, None)

        def counts_at(r: float) -> list[int]:
            return _keep_counts(choices, r, cfg.scope, order, owner)

        if cfg.flops is not None:
            ratio, counts_list = _flops_search(gm, cg, choices, counts_at, cfg, ctx, groups)
        else:
            ratio = cfg.ratio if cfg.ratio is not None else DEFAULT_RATIO
            counts_list = counts_at(ratio)
        keep = _keep_masks(choices, counts_list)
        ctx.plan["ratio"] = round(ratio, 6)
        if fallback:
            ctx.note(f"importance bn: {fallback} group(s) have no norm scale and use l2")
        ctx.plan["groups"] = {}
        for g in prunable:
            if g.id in keep:
                ctx.plan["groups"][g.anchor] = {"size": g.size,
                                                "keep": format_ranges(np.flatnonzero(keep[g.id]).tolist())}
    counts = {g: int(k.sum()) for g, k in keep.items()}
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    expected = [node_shape(n)[1:] for n in _flat(output.args) if node_shape(n) is not None]
    ctx.fits = _fits(gm, _consumers(gm, cg, keep))
    original = copy.deepcopy(gm) if (cfg.recover or cfg.compensate) and not ctx.replay else None
    gm = finalize(cg.apply(gm, keep))
    was_training = gm.training
    with torch.no_grad():  # one sample, in eval mode, is enough to prove that every shape still fits
        out = gm.eval()(*(x[:1] if isinstance(x, torch.Tensor) else x for x in ctx.example_inputs))
    gm.train(was_training)
    got = [tuple(t.shape[1:]) for t in _flat(out) if isinstance(t, torch.Tensor)]
    if got != expected:
        raise RuntimeError(f"pruned model outputs {got} instead of {expected}; this is a bug in surgery.channels")
    # Notes: what was pruned, and what was left whole and why.
    total = sum(g.size for g in prunable)
    kept_total = sum(counts.get(g.id, g.size) for g in prunable)
    ctx.note(f"pruned {len(keep)} of {len(prunable)} prunable channel groups: {total} -> {kept_total} "
             f"channels ({'replayed' if ctx.replay else f'{cfg.importance}, {cfg.scope}'}) "
             f"in {time.perf_counter() - start:.2f} s")
    whole = [g for g in groups if not g.prunable]
    if whole:
        ctx.note(f"{len(whole)} group(s) left whole: {_reason_summary(whole)}")
    if not keep:
        ctx.reason = (f"no prunable channel group; {len(whole)} group(s) kept whole: {_reason_summary(whole)}"
                      if not prunable else f"all {len(prunable)} prunable group(s) kept every channel "
                      f"(at ratio {ctx.plan.get('ratio', 0):g}, round_to={cfg.round_to})")
    small = [g for g in prunable if g.id not in keep]
    if small and not ctx.replay:
        ctx.note(f"{len(small)} prunable group(s) kept all channels (round_to={cfg.round_to} or "
                 f"their scores), e.g. {', '.join(g.anchor for g in small[:MAX_LISTED])}")
    if cg.unsupported:
        listed = ", ".join(cg.unsupported[:MAX_LISTED])
        more = f" and {len(cg.unsupported) - MAX_LISTED} more" if len(cg.unsupported) > MAX_LISTED else ""
        ctx.note(f"ops the channel analysis does not know (their channels stay whole): {listed}{more}")
    if original is not None:  # after the notes on what was pruned: its own note, with its own time
        recover.run(original, gm, ctx.fits, ctx, None, 0, cfg.seed, "prune",
                    recover.Options(ridge=cfg.ridge), calib=calib)
    return gm
