"""Pass `ebcle`: a depth bound from the data set's entropy, and collapse of the blocks past it.

EBCLE (Gowdra et al., Pattern Recognition 2021) holds that a data set's entropy bounds the
depth worth training: past it, blocks learn near-identity maps. The paper's exact map
from entropy to depth was not recovered, so the bound is a pluggable *rule*
(:data:`RULES`, :func:`register_rule`); the default and its reasoning are in docs/ebcle.md.

Blocks and stages come from :mod:`surgery.blocks` (shared, architecture-agnostic); this
module is the policy: how many blocks each stage keeps, which ones go (the most
identity-like on calibration data, or the last ones), the optional widening of what is
left, and the plan that lets ``surgery.load`` rebuild the result without data.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx, nn

from .. import recover
from ..blocks import Block, Structure, collapse, find_structure, identity_scores, owned_span
from ..data import load_calibration
from ..entropy import MAX_NATS
from ..errors import SurgeryError
from ..graph import compare_outputs, propagate_shapes
from ..inputs import first_rows
from ..progress import enabled as progress_enabled
from ..recover import Fit
from ..report import flops_by_node
from ..validate import (
    MAX_CHANNELS,
    MAX_ITEMS,
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

# --- depth rules: entropy (nats) and blocks per stage -> blocks to keep in total ----------

RuleFn = Callable[[float, list[int]], float]
RULES: dict[str, tuple[RuleFn, str]] = {}


def register_rule(name: str, doc: str) -> Callable[[RuleFn], RuleFn]:
    """Decorator: ``@register_rule("mine", "what it does")`` on ``fn(entropy_nats, blocks_per_stage)``.

    The function returns how many blocks to keep in total (any number: it is rounded and
    clipped to [one per stage, all]); the pass spreads them over the stages.
    """

    def deco(fn: RuleFn) -> RuleFn:
        RULES[name] = (fn, doc)
        return fn

    return deco


@register_rule("linear", "keep H / ln 256 of the blocks: depth in proportion to the share of the 8-bit "
                         "alphabet the images use")
def _rule_linear(entropy: float, counts: list[int]) -> float:
    return entropy / MAX_NATS * sum(counts)


@register_rule("sqrt", "keep sqrt(H / ln 256) of the blocks: a milder cut for low-entropy data")
def _rule_sqrt(entropy: float, counts: list[int]) -> float:
    return math.sqrt(max(entropy, 0.0) / MAX_NATS) * sum(counts)


DEFAULT_RULE = "linear"
MAX_LISTED = 8


@dataclass
class EbcleConfig:
    """Collapse residual (and dense) blocks past a depth bound set by the data set's entropy."""

    data: str | None = field(default=None, metadata={
        "doc": "digits or an ImageFolder path: its entropy sets the bound and it calibrates select=identity "
               "(default: the run's --data)"})
    entropy: float | None = field(default=None, metadata={
        "doc": "the data set's entropy in nats, if already known (skips measuring it)"})
    rule: str = field(default=DEFAULT_RULE, metadata={
        "doc": "entropy -> depth rule: " + ", ".join(RULES) + " (docs/ebcle.md)"})
    depth: int | None = field(default=None, metadata={
        "doc": "blocks to keep in total (overrides the rule), spread over stages in proportion to their length"})
    keep: list[int] = field(default_factory=list, metadata={
        "doc": "blocks to keep in each stage, joined by + (overrides rule and depth)"})
    select: Literal["auto", "identity", "position"] = field(default="auto", metadata={
        "doc": "which blocks go: identity (the most identity-like on calibration data), position (the last "
               "of each stage); auto: identity when there is data"})
    metric: Literal["branch", "output"] = field(default="branch", metadata={
        "doc": "identity score: branch ||f(x)||/||x|| (one forward), or output: relative change of the "
               "model's output when the block alone goes (one forward per block); dense layers always use output"})
    calib: int = field(default=32, metadata={"doc": "calibration images for select=identity and recover"})
    widen: float = field(default=1.0, metadata={
        "doc": "multiply the inner channels of the blocks left by this (1 = off); new channels start "
               "function-preserving (their outgoing weights are zero)"})
    recover: bool = field(default=False, metadata={
        "doc": "train the block next to each removed run to reproduce the removed blocks' output on calibration "
               "images (local distillation, surgery.recover); needs data"})
    steps: int = field(default=200, metadata={"doc": "Adam steps per recovered block (recover)"})
    seed: int = field(default=0, metadata={"doc": "seed of calibration sampling and of new channels' weights"})

    def validate(self) -> None:
        if self.rule not in RULES:
            raise SurgeryError(f"ebcle:rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.depth is not None and self.depth < 1:
            raise SurgeryError(f"ebcle:depth must be >= 1, got {self.depth}")
        if self.keep and self.depth is not None:
            raise SurgeryError("ebcle: give depth or keep, not both")
        if any(k < 1 for k in self.keep):
            raise SurgeryError(f"ebcle:keep needs >= 1 block per stage, got {'+'.join(map(str, self.keep))}")
        if self.entropy is not None and not 0.0 <= self.entropy <= MAX_NATS + 1e-9:
            raise SurgeryError(f"ebcle:entropy is in nats, between 0 and ln 256 = {MAX_NATS:.3f}; got {self.entropy}")
        if self.calib < 1:
            raise SurgeryError(f"ebcle:calib must be >= 1, got {self.calib}")
        if self.steps < 1:
            raise SurgeryError(f"ebcle:steps must be >= 1, got {self.steps}")
        if not 1.0 <= self.widen <= 16.0:
            raise SurgeryError(f"ebcle:widen is a factor between 1 (off) and 16, got {self.widen}")


# --- how many blocks each stage keeps --------------------------------------------------------


def spread(counts: list[int], total: int) -> list[int]:
    """Split ``total`` kept blocks over stages of ``counts`` blocks, in proportion, >= 1 each."""
    n = sum(counts)
    total = min(max(total, len(counts)), n)
    target = [total * c / n for c in counts]
    keep = [min(c, max(1, math.floor(t))) for c, t in zip(counts, target)]
    while sum(keep) < total:  # largest shortfall first; ties: the longer stage
        i = max((i for i, c in enumerate(counts) if keep[i] < c), key=lambda i: (target[i] - keep[i], counts[i]))
        keep[i] += 1
    while sum(keep) > total:
        i = min((i for i in range(len(counts)) if keep[i] > 1), key=lambda i: (target[i] - keep[i], -counts[i]))
        keep[i] -= 1
    return keep


def _score(scores: dict[str, dict[str, float]], block: Block, metric: str) -> float:
    s = scores.get(block.name, {})
    key = "output" if block.kind == "dense" or metric == "output" else "branch"
    return s.get(key, math.inf)


def choose(structure: Structure, keep: list[int], select: str,
           scores: dict[str, dict[str, float]] | None = None, metric: str = "branch") -> list[Block]:
    """The blocks to remove: per stage, all but ``keep[i]``; the head always stays."""
    removed = []
    for stage, k in zip(structure.stages, keep):
        free = stage.collapsible
        n_keep = k - (1 if stage.head else 0)
        if select == "position":
            stay = free[:n_keep]
        else:  # the least identity-like stay; ties: the earlier one
            ranked = sorted(free, key=lambda b: (-_score(scores or {}, b, metric), free.index(b)))
            stay = ranked[:n_keep]
        removed += [b for b in free if b not in stay]
    return removed


# --- widening: more inner channels, function unchanged -----------------------------------------


def _inner_groups(cg, blocks: list[Block]) -> list:
    """Prunable channel groups that live inside one of ``blocks`` and are safe to grow."""
    from ..channels import Leaf

    owned = {m: b.name for b in blocks for m in b.modules}
    out = []
    for g in cg.groups():
        if not g.prunable or g.tags:
            continue
        owners = {owned.get(m.param.rpartition(".")[0]) for m in g.members}
        if len(owners) != 1 or None in owners:
            continue
        if any(m.role not in ("out", "in", "norm", "stat") for m in g.members):
            continue
        if any(not (isinstance(r := cg.resolve(m.layout), Leaf) and r.id == g.id) for m in g.members):
            continue
        kinds = [kind for name, (kind, ports) in cg.modules.items()
                 if any(g.id in cg.roots(p) for p in ports.values())]
        if any(k not in ("conv", "linear", "bn") for k in kinds):
            continue  # a layer norm over these channels would see new statistics
        touched = False
        for name, kind, _ in cg.edits:
            dims = cg.dims.get(name, []) + [d for item in cg.tuples.get(name, []) for d in item]
            if kind != "cat" and any(g.id in cg.roots(d) for d in dims):
                touched = True
        if not touched:
            out.append(g)
    return out


def _grown(t: torch.Tensor, axis: int, extra: int, role: str, name: str, gen: torch.Generator) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] = extra
    if role == "out" and t.dim() > 1:
        fill = torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype) * t.detach().float().std()
    elif (role == "norm" and name.endswith("weight")) or (role == "stat" and "var" in name):
        fill = torch.ones(shape, dtype=t.dtype)
    else:  # biases, shifts, means, and every weight that reads a new channel: zero
        fill = torch.zeros(shape, dtype=t.dtype)
    return torch.cat([t.detach(), fill.to(t.device)], axis)


_PRIORITY = {"out": 0, "norm": 1, "stat": 1, "in": 2}


def grow(gm: fx.GraphModule, cg, sizes: dict[int, int], seed: int = 0) -> fx.GraphModule:
    """Give channel group ``id`` ``sizes[id]`` channels: new producer rows random, new reader columns zero."""
    gen = torch.Generator().manual_seed(seed)
    old = {g.id: g for g in cg.groups()}
    for gid, new in sorted(sizes.items()):
        extra = new - old[gid].size
        axes: dict[tuple[str, int], str] = {}
        for m in old[gid].members:  # one growth per tensor axis; a reader's zero wins (always safe)
            prev = axes.get((m.param, m.axis))
            axes[(m.param, m.axis)] = m.role if prev is None or _PRIORITY[m.role] > _PRIORITY[prev] else prev
        for (param, axis), role in axes.items():
            owner, _, attr = param.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            t = getattr(module, attr)
            grown = _grown(t, axis, extra, role, attr, gen)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(grown, requires_grad=t.requires_grad)
            else:
                module._buffers[attr] = grown
    for name, (kind, ports) in cg.modules.items():
        if not any(gid in cg.roots(p) for p in ports.values() for gid in sizes):
            continue
        m = gm.get_submodule(name)
        if kind == "conv":
            m.in_channels, m.out_channels = cg.kept(ports["in"], sizes), cg.kept(ports["out"], sizes)
            m.groups = cg.kept(ports["groups"], sizes)
        elif kind == "linear":
            m.in_features, m.out_features = cg.kept(ports["in"], sizes), cg.kept(ports["out"], sizes)
        elif kind == "bn":
            m.num_features = cg.kept(ports["c"], sizes)
    gm.recompile()
    return gm


def _new_size(size: int, factor: float) -> int:
    if size % 8 == 0:
        return max(size + 8, math.ceil(size * factor / 8) * 8)
    return max(size + 1, round(size * factor))


def _widen(gm: fx.GraphModule, blocks: list[Block], cfg: EbcleConfig, ctx: PassContext,
           example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    from ..channels import build

    propagate_shapes(gm, example)
    cg = build(gm)
    if ctx.replay:  # sizes were checked with the plan; the groups exist only now, after the collapse
        growable = {g.anchor: g for g in _inner_groups(cg, blocks)}
        where = at(ctx.where, "widen")
        sizes = {}
        for anchor, (old, new) in ctx.plan.get("widen", {}).items():
            g = growable.get(anchor)
            if g is None:
                raise ValidationError(at(where, anchor), "the plan does not fit this model: no channel group "
                                      f"{anchor!r} inside the blocks left can grow")
            if g.size != old:
                raise ValidationError(at(at(where, anchor), 0), f"the plan does not fit this model: the group "
                                                                 f"has {g.size} channels, not {old}")
            sizes[g.id] = new
        return grow(gm, cg, sizes, cfg.seed) if sizes else gm
    groups = _inner_groups(cg, blocks)
    sizes = {g.id: _new_size(g.size, cfg.widen) for g in groups}
    if not sizes:
        ctx.note("widen: no inner channel group of the blocks left can grow safely")
        return gm
    before = sum(p.numel() for p in gm.parameters())
    gm.eval()
    with torch.no_grad():
        ref = gm(*example)
    wide = grow(copy.deepcopy(gm), cg, sizes, cfg.seed)
    with torch.no_grad():
        diff = compare_outputs(ref, wide(*example))
    if not diff <= 1e-4 * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"widening changed the output by {diff:.3g}; this is a bug in ebcle.grow")
    ctx.plan["widen"] = {g.anchor: [g.size, sizes[g.id]] for g in groups}
    after = sum(p.numel() for p in wide.parameters())
    ctx.note(f"widen x{cfg.widen:g}: {len(sizes)} inner channel group(s) of {len(blocks)} block(s) grown, "
             f"params {before:,} -> {after:,}; output unchanged (max diff {diff:.1e})")
    return wide


# --- the plan, read back ---------------------------------------------------------------------

PLAN_KEYS = {"entropy", "select", "keep", "blocks", "stages", "scores", "removed", "bound", "widen"}
MAX_WIDEN = 16  # EbcleConfig.widen's bound: _new_size gives at most 16 * size + 8


def _expect_counts(value: object, where: str) -> None:
    for i, v in enumerate(expect_list(value, where)):
        expect_int(v, at(where, i), lo=0, hi=MAX_ITEMS)


def _check_plan(plan: dict, structure: Structure, where: str) -> list[Block]:
    """The blocks a replayed plan removes (collapsible, once each, one block left per stage); the
    record-only fields are checked for type; widen's sizes here, its groups after the collapse."""
    expect_dict(plan, where, allowed=PLAN_KEYS, required=("removed",))
    if plan.get("entropy") is not None:
        expect_number(plan["entropy"], at(where, "entropy"), lo=0.0, hi=MAX_NATS + 1e-6)
    if "select" in plan:
        expect_str(plan["select"], at(where, "select"), choices=("identity", "position"))
    for key in ("keep", "blocks"):
        if key in plan:
            _expect_counts(plan[key], at(where, key))
    if "bound" in plan:
        expect_int(plan["bound"], at(where, "bound"), lo=1, hi=MAX_ITEMS)
    if "stages" in plan:
        for i, stage in enumerate(expect_list(plan["stages"], at(where, "stages"))):
            w = at(at(where, "stages"), i)
            expect_dict(stage, w, allowed={"name", "blocks", "removed"})
            if "name" in stage:
                expect_str(stage["name"], at(w, "name"))
            for key in ("blocks", "removed"):
                for j, name in enumerate(expect_list(stage.get(key, []), at(w, key))):
                    expect_str(name, at(at(w, key), j))
    if "scores" in plan:
        for name, score in expect_dict(plan["scores"], at(where, "scores")).items():
            for key, v in expect_dict(score, at(at(where, "scores"), name)).items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):  # inf and nan are fair scores
                    raise ValidationError(at(at(at(where, "scores"), name), key), "must be a number")
    if "widen" in plan:
        widen = at(where, "widen")
        for anchor, sizes in expect_dict(plan["widen"], widen).items():
            w = at(widen, anchor)
            expect_list(sizes, w, min_len=2, max_len=2)
            old = expect_int(sizes[0], at(w, 0), lo=1, hi=MAX_CHANNELS)
            expect_int(sizes[1], at(w, 1), lo=old + 1, hi=min(MAX_WIDEN * old + 8, MAX_CHANNELS))
    collapsible = {b.name: b for b in structure.blocks if b.collapsible}
    removed = at(where, "removed")
    names = expect_list(plan["removed"], removed, max_len=len(collapsible))
    blocks: list[Block] = []
    for i, name in enumerate(names):
        expect_name(name, at(removed, i), collapsible, "collapsible block")
        if collapsible[name] in blocks:
            raise ValidationError(at(removed, i), f"block {name!r} appears twice")
        blocks.append(collapsible[name])
    for stage in structure.stages:
        if stage.head is None and stage.collapsible and all(b in blocks for b in stage.collapsible):
            raise ValidationError(removed, f"removes every block of stage {stage.name}; a stage keeps at least one")
    return blocks


# --- the pass ------------------------------------------------------------------------------


def _fits(gm: fx.GraphModule, structure: Structure, gone: set[str]) -> list[Fit]:
    """Local distillation around each run of removed residual blocks.

    The kept block (or stage head) before the run learns to yield what the run's last block
    yielded; where nothing with parameters precedes the run in its stage, the kept block
    after it learns to yield its own old output from the input it now gets.
    """
    def fit(block: Block, source: str) -> Fit | None:
        span, modules = owned_span(gm, block.name.split("#")[0], block.output) if block.kind == "head" else (
            [n for n in block.span if n != block.output], block.modules)
        return Fit(block.output, source, "distill", span=span, modules=modules) if modules else None

    fits = []
    for stage in structure.stages:
        blocks = stage.blocks
        i = 0
        while i < len(blocks):
            if blocks[i].name not in gone:
                i += 1
                continue
            j = i
            while j + 1 < len(blocks) and blocks[j + 1].name in gone:
                j += 1
            if blocks[j].kind == "residual":
                before = fit(blocks[i - 1], blocks[j].output) if i > 0 and blocks[i - 1].kind != "dense" else None
                after = (fit(blocks[j + 1], blocks[j + 1].output)
                         if j + 1 < len(blocks) and blocks[j + 1].kind == "residual" else None)
                if before or after:
                    fits.append(before or after)
            i = j + 1
    return fits


def _fmt(block: Block, scores: dict[str, dict[str, float]], metric: str) -> str:
    s = _score(scores, block, metric)
    return f"{block.name} ({s:.3f})" if math.isfinite(s) else block.name


def _listing(blocks: list[Block], scores: dict, metric: str) -> str:
    names = [_fmt(b, scores, metric) for b in blocks[:MAX_LISTED]]
    more = f" and {len(blocks) - MAX_LISTED} more" if len(blocks) > MAX_LISTED else ""
    return ", ".join(names) + more if names else "none"


@register("ebcle", EbcleConfig)
def ebcle(gm: fx.GraphModule, cfg: EbcleConfig, ctx: PassContext) -> fx.GraphModule:
    """Collapse blocks past the depth bound; record the removed blocks (and widened groups) in the plan."""
    start = time.perf_counter()
    structure = find_structure(gm)
    if not any(s.collapsible for s in structure.stages):
        # Nothing to do is a no-op the report states (and --strict refuses), not an error;
        # a replayed plan that removes blocks this model lacks still fails its check.
        if ctx.replay:
            _check_plan(ctx.plan, structure, ctx.where)
        ctx.plan["removed"] = []
        ctx.reason = "the model has no residual (x + f(x)) or dense blocks to collapse"
        return gm
    stages = structure.stages
    counts = structure.counts
    example = tuple(ctx.example_inputs)
    scores: dict[str, dict[str, float]] = {}
    if ctx.replay:
        removed = _check_plan(ctx.plan, structure, ctx.where)
    else:
        spec = cfg.data or ctx.data
        entropy = cfg.entropy
        if entropy is None and spec:
            from ..entropy import dataset_entropy

            stats = dataset_entropy(spec, progress=progress_enabled())
            entropy = stats.mean
            ctx.note(f"entropy of {spec}: {stats.mean:.4f} nats (std {stats.std:.4f}, {stats.images} images; "
                     f"max ln 256 = {MAX_NATS:.3f})")
        elif entropy is not None:
            ctx.note(f"entropy given: {entropy:.4f} nats")
        if cfg.keep:
            if len(cfg.keep) != len(stages):
                raise SurgeryError(f"ebcle:keep has {len(cfg.keep)} value(s) but the model has {len(stages)} "
                                   f"stages ({'+'.join(map(str, counts))} blocks); give one per stage")
            over = [(s.name, k, c) for s, k, c in zip(stages, cfg.keep, counts) if k > c]
            if over:
                raise SurgeryError(f"ebcle:keep asks {over[0][1]} blocks of stage {over[0][0]}, which has {over[0][2]}")
            keep, how = list(cfg.keep), "keep= given"
        elif cfg.depth is not None:
            if not len(stages) <= cfg.depth <= sum(counts):
                raise SurgeryError(f"ebcle:depth must be between {len(stages)} (one block per stage) and "
                                   f"{sum(counts)} (all) for this model, got {cfg.depth}")
            keep, how = spread(counts, cfg.depth), "depth= given"
        else:
            if entropy is None:
                raise SurgeryError("ebcle needs the data set's entropy: add data=digits or data=FOLDER "
                                   "(or entropy=, depth= or keep=) to the pass")
            bound = RULES[cfg.rule][0](entropy, list(counts))
            total = min(max(round(bound), len(stages)), sum(counts))
            keep, how = spread(counts, total), f"rule {cfg.rule}: {bound:.2f} -> {total}"
            ctx.plan["bound"] = total
        select = cfg.select if cfg.select != "auto" else ("identity" if spec else "position")
        if select == "identity":
            if not spec:
                raise SurgeryError("ebcle:select=identity needs calibration images: add data=digits or "
                                   "data=FOLDER, or use select=position")
            calib = load_calibration(spec, example, cfg.calib, seed=cfg.seed, who="ebcle", norm=ctx.norm)
            scores = identity_scores(gm, structure, [b[0] for b in calib.batches],
                                     output_change=cfg.metric == "output")
        removed = choose(structure, keep, select, scores, cfg.metric)
        ctx.plan.update({
            "entropy": None if entropy is None else round(entropy, 6), "select": select,
            "keep": keep, "blocks": counts,
            "stages": [{"name": s.name, "blocks": [b.name for b in s.blocks],
                        "removed": [b.name for b in s.blocks if b in removed]} for s in stages],
            "scores": {n: {k: round(v, 6) for k, v in s.items()} for n, s in scores.items()},
        })
        ctx.plan["removed"] = [b.name for b in removed]
        ctx.note(f"depth: keep {sum(keep)} of {sum(counts)} blocks ({how}); per stage "
                 f"{'+'.join(map(str, keep))} of {'+'.join(map(str, counts))}; select={select}")
    with torch.no_grad():
        was_training = gm.training
        before = gm.eval()(*first_rows(example))
        gm.train(was_training)
    # The compute the removed blocks hold, by the report's formulas: what the counter must see leave.
    per_node = flops_by_node(gm, first_rows(example)) if removed else {}
    total = sum(per_node.values())
    held = sum(per_node.get(name, 0) for b in removed for name in b.span)
    original = copy.deepcopy(gm) if cfg.recover and not ctx.replay and removed else None
    gm = collapse(gm, removed)
    # A block counts as collapsed only when its compute left the graph (none of its nodes is left).
    live = {n.name for n in gm.graph.nodes}
    spans = {name for b in removed for name in b.span}
    # Nodes outside the spans that only the removed blocks used (a block's relative-position MLP) go too.
    held += sum(f for name, f in per_node.items() if name not in live and name not in spans)
    stayed = [b for b in removed if any(name in live for name in b.span)]
    gone = {b.name for b in removed}
    left = [b for b in structure.blocks if b.collapsible and b.name not in gone]
    if cfg.widen > 1.0 or (ctx.replay and ctx.plan.get("widen")):
        gm = _widen(gm, left, cfg, ctx, example)
    with torch.no_grad():
        was_training = gm.training
        after = gm.eval()(*first_rows(example))
        gm.train(was_training)
    if compare_outputs(before, after) == math.inf:
        raise RuntimeError("ebcle changed the model's output shapes; this is a bug in surgery.blocks")
    ctx.fits = _fits(gm, structure, {b.name for b in removed} - {b.name for b in stayed})
    if original is not None:
        recover.run(original, gm, ctx.fits, ctx, cfg.data, cfg.calib, cfg.seed, "ebcle",
                    recover.Options(steps=cfg.steps))
    if not ctx.replay:
        metric = cfg.metric
        if scores:
            what = "||f(x)||/||x||, dense layers: output change" if metric == "branch" else "output change"
            ctx.note(f"identity scores ({what}) on {cfg.calib} images: low = near-identity")
        for s in stages:
            kept = [b for b in s.blocks if b.name not in gone]
            dropped = [b for b in s.blocks if b.name in gone]
            head = f"{s.head.name} (head), " if s.head else ""
            ctx.note(f"{s.name}: {len(kept)}/{len(s.blocks)} kept: {head}"
                     f"{_listing([b for b in kept if b.collapsible], scores, metric)}; removed: "
                     f"{_listing(dropped, scores, metric)}")
    ctx.note(f"collapsed {len(removed) - len(stayed)} block(s){' (replayed)' if ctx.replay else ''} "
             f"in {time.perf_counter() - start:.2f} s")
    if stayed:
        ctx.note(f"{len(stayed)} chosen block(s) still compute in the graph (not counted as collapsed): "
                 + ", ".join(b.name for b in stayed[:MAX_LISTED]) + (" ..." if len(stayed) > MAX_LISTED else ""))
    if not removed:
        ctx.reason = "the depth bound keeps every block"
    elif total and not (cfg.widen > 1.0 or (ctx.replay and ctx.plan.get("widen"))):  # widening adds compute
        kept_blocks = sum(1 for b in structure.blocks if b.name not in gone)
        ctx.target = {"kind": "depth", "requested": f"{kept_blocks} of {len(structure.blocks)} blocks",
                      "expected_flops": round(1 - held / total, 6),
                      # dense layers also shrink the concats they fed: at most; residual: exactly
                      "bound": "at_most" if any(b.kind == "dense" for b in removed) else "equal"}
        if stayed:
            ctx.target["cause"] = f"{len(stayed)} chosen block(s) still compute: " + \
                ", ".join(b.name for b in stayed[:MAX_LISTED])
        ctx.note(f"the removed blocks held {held / total:.1%} of the FLOPs (report's formulas, per node)")
    return gm
