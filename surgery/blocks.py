"""Residual blocks and stages found in a shape-annotated fx graph, architecture-agnostic.

A **residual** is an add ``x + f(x)`` whose skip input (``x``, possibly through identity
modules such as ConvNeXt's ``shortcut``) is an ancestor of the other input, with the same
shape in and out; ``f`` may end in a layer scale (``gamma * f``), a drop-path or
anything else: its *span* is every node on a path from ``x`` to the branch output.

A **block** is what a model's code calls one: the residuals whose add sits in the same
module (``nn_module_stack``; the common prefix of the branch's modules when the graph
lacks it) and that follow each other. A ViT block is therefore the pair attention
residual + MLP residual of one transformer block (both live in ``blocks.N``): collapsing
half a transformer block is not what depth means in the EBCLE sense. A ResNet, RegNet,
MBConv or ConvNeXt block is one residual.

A **dense** block is a DenseNet layer: its output is appended to a channel concat (``cat``
along dim 1 of 4-D tensors) that every later layer of its stage reads. Collapsing it
removes its nodes and its channels from every consumer (through :mod:`surgery.channels`).

A **stage** is a run of blocks with one shape, chained by parameter-free nodes; its
*head* is the shape-changing block before the run (ResNet's downsample block, the first
MBConv of an EfficientNet stage), found as the sibling module that produced the run's
input. Heads are listed but never collapsible. Stages without any collapsible block (an
EfficientNet stage of one block) are not listed.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .errors import SurgeryError
from .graph import finalize, node_shape, output_tensors
from .progress import bar

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
MAX_CHAIN = 8  # parameter-free nodes allowed between two blocks of one stage (an activation, a permute)
MAX_FLOW = 16  # one-input nodes of one size between one-block stages that join (a pointwise conv, a reshape)


def _identity_types() -> tuple[type, ...]:
    types: list[type] = [nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d]
    try:
        from timm.layers import DropPath

        types.append(DropPath)
    except ImportError:
        pass
    return tuple(types)


_IDENTITY_TYPES = _identity_types()


@dataclass
class Residual:
    """One ``x + f(x)`` add: node names in the graph it was found in."""

    add: str
    skip_index: int  # which argument of the add is the skip
    x: str  # the skip's source (identity hops removed)
    branch: str  # f(x), the other argument
    span: list[str]  # nodes of f, in graph order


@dataclass
class Block:
    """A unit of depth: one or more chained residuals, a dense layer, or a stage head."""

    name: str
    kind: str  # "residual" | "dense" | "head"
    input: str = ""  # node the block reads (residual: x of its first residual)
    output: str = ""  # node the block yields (residual: its last add; dense: the appended features)
    residuals: list[Residual] = field(default_factory=list)
    span: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # submodules its span calls or reads

    @property
    def collapsible(self) -> bool:
        return self.kind != "head"


@dataclass
class Stage:
    name: str
    shape: tuple[int, ...]
    blocks: list[Block]

    @property
    def head(self) -> Block | None:
        return self.blocks[0] if self.blocks and self.blocks[0].kind == "head" else None

    @property
    def collapsible(self) -> list[Block]:
        return [b for b in self.blocks if b.collapsible]


@dataclass
class Structure:
    stages: list[Stage]
    skipped: list[str] = field(default_factory=list)  # residual-looking adds left out, with the reason

    @property
    def counts(self) -> list[int]:
        return [len(s.blocks) for s in self.stages]

    @property
    def blocks(self) -> list[Block]:
        return [b for s in self.stages for b in s.blocks]

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)


# --- graph helpers -----------------------------------------------------------------------


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else key
        paths.append(path)
    if node.op in ("call_module", "get_attr"):  # a re-traced GraphModule has no stack: the name says it
        parts = str(node.target).split(".")
        for i in range(1, len(parts) + (node.op == "call_module")):
            prefix = ".".join(parts[:i])
            if prefix not in paths:
                paths.append(prefix)
    return [p for p in paths if p]


def owned_span(gm: fx.GraphModule, path: str, output: str) -> tuple[list[str], list[str]]:
    """The nodes module ``path`` computes up to node ``output`` (graph order, without it) and its modules.

    A node belongs when ``path`` is on its module stack, or when it reads a node that belongs
    and ``output`` depends on it (the adds and activations between the module's own calls).
    """
    nodes = list(gm.graph.nodes)
    end = next(i for i, n in enumerate(nodes) if n.name == output)
    needed = {nodes[end]}
    for n in reversed(nodes[:end + 1]):
        if n in needed:
            needed.update(n.all_input_nodes)
    span: list[fx.Node] = []
    inside: set[fx.Node] = set()
    for n in nodes[:end]:
        if n in needed and (path in _stack_paths(n) or any(a in inside for a in n.all_input_nodes)):
            span.append(n)
            inside.add(n)
    return [n.name for n in span], _span_modules(gm, span + [nodes[end]])


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths if p]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return ".".join(out)


def _span_modules(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[str]:
    mods = []
    for n in nodes:
        if n.op == "call_module":
            mods.append(str(n.target))
        elif n.op == "get_attr":
            mods.append(_parent(str(n.target)))
    return sorted({m for m in mods if m})


def _has_state(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return "alpha" not in node.kwargs and len(node.args) == 2
    return node.op == "call_method" and node.target in _ADD_METHODS and len(node.args) == 2 and not node.kwargs


def _identity_chain(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """``node`` and what it is an identity of, nearest first (ConvNeXt's shortcut, a contiguous())."""
    chain = [node]
    for _ in range(MAX_CHAIN):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _IDENTITY_TYPES) \
                and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
        elif node.op == "call_method" and node.target in _IDENTITY_METHODS and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        else:
            break
        chain.append(node)
    return chain


def _chained(gm: fx.GraphModule, src: fx.Node, dst: fx.Node) -> bool:
    """``dst`` is ``src`` or computed from it alone by a few parameter-free one-input nodes."""
    node = dst
    for _ in range(MAX_CHAIN + 1):
        if node is src:
            return True
        if len(node.all_input_nodes) != 1 or node.op == "placeholder" or _has_state(gm, node):
            return False
        node = node.all_input_nodes[0]
    return False


def _flows(src: fx.Node, dst: fx.Node) -> bool:
    """``dst`` is ``src`` passed through a few one-input nodes (layers with weights too) that keep its
    number of elements: a reshape, a per-position conv, a norm."""
    size = _numel(src)
    node = dst
    for _ in range(MAX_FLOW + 1):
        if node is src:
            return True
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr" and node_shape(a) is not None]
        if len(inputs) != 1 or node.op == "placeholder" or size is None or _numel(node) != size:
            return False
        node = inputs[0]
    return False


def _numel(node: fx.Node) -> int | None:
    shape = node_shape(node)
    return math.prod(shape) if shape is not None else None


def _join_single_blocks(gm: fx.GraphModule, stages: list[Stage]) -> list[Stage]:
    """Runs of one-block stages (ConvMixer: each residual followed by a pointwise conv; a Swin block's
    attention and MLP residuals on differently shaped views) become one stage where each block's input
    is the previous one's output through nodes of the same size: depth to collapse, not one
    untouchable block per stage."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: list[Stage] = []
    for s in stages:
        prev = out[-1] if out else None
        if (prev is not None and s.head is None and (len(s.blocks) == 1 or len(prev.blocks) == 1)
                and prev.blocks[-1].kind == "residual"
                and _flows(nodes[prev.blocks[-1].output], nodes[s.blocks[0].input])):
            prev.blocks += s.blocks
            continue
        out.append(s)
    return out


def _between(order: list[fx.Node], index: dict[fx.Node, int], x: fx.Node, y: fx.Node) -> set[fx.Node] | None:
    """Nodes on a path from ``x`` to ``y`` (``y`` included, ``x`` not); None if y does not depend on x."""
    desc = {x}
    for n in order[index[x] + 1:index[y] + 1]:
        if any(a in desc for a in n.all_input_nodes):
            desc.add(n)
    if y not in desc:
        return None
    span, todo = set(), [y]
    while todo:
        n = todo.pop()
        if n in span or n is x or n not in desc:
            continue
        span.add(n)
        todo.extend(n.all_input_nodes)
    # Side nodes that feed only the branch or nothing (an unused ``x.shape[1]``) go with it.
    for n in reversed(order[index[x] + 1:index[y]]):
        if n in desc and n not in span and n.op != "output" and all(u in span for u in n.users):
            span.add(n)
    return span


# --- finding residuals, dense layers, stages ----------------------------------------------


def find_residuals(gm: fx.GraphModule) -> tuple[list[Residual], list[str]]:
    """Every collapsible ``x + f(x)`` of the graph (outermost only), and why other adds were left out."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    found: list[tuple[Residual, set[fx.Node]]] = []
    skipped: list[str] = []
    for node in order:
        if not _is_add(node) or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        shape = node_shape(node)
        for skip_index in (1, 0):  # skip second first: x = f(x) + shortcut is the common spelling
            skip, branch = node.args[skip_index], node.args[1 - skip_index]
            if shape is None or node_shape(branch) != shape:
                continue
            span = x = None
            for x in _identity_chain(gm, skip):  # the nearest node the branch is computed from
                if x is branch or x.op == "get_attr" or node_shape(x) != shape or index[x] >= index[branch]:
                    continue
                span = _between(order, index, x, branch)
                if span is not None:
                    break
            if span is None:
                continue
            leak = next((n for n in span for u in n.users if u not in span and u is not node), None)
            if leak is not None:
                skipped.append(f"{node.name}: branch node {leak.name} is also used outside the branch")
                break
            span_list = sorted(span, key=index.__getitem__)
            found.append((Residual(node.name, skip_index, x.name, branch.name, [n.name for n in span_list]), span))
            break
    # A residual inside another one's branch goes with it (outermost wins).
    outer = []
    for r, _ in found:
        add = next(n for n in order if n.name == r.add)
        if not any(add in span for other, span in found if other is not r):
            outer.append(r)
    return outer, skipped


def _owner(gm: fx.GraphModule, add: fx.Node, span: Sequence[fx.Node]) -> str:
    paths = _stack_paths(add)
    if paths:
        return paths[-1]
    return _common_prefix(str(n.target) for n in span if n.op == "call_module")


def _residual_blocks(gm: fx.GraphModule, residuals: list[Residual]) -> list[Block]:
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks: list[Block] = []
    owners: list[str] = []
    for r in residuals:
        span = [nodes[s] for s in r.span]
        owner = _owner(gm, nodes[r.add], span)
        prev = blocks[-1] if blocks else None
        if prev is not None and owner and owner == owners[-1] and _chained(gm, nodes[prev.output], nodes[r.x]):
            prev.residuals.append(r)
            prev.output = r.add
            prev.span += r.span
            prev.modules = sorted(set(prev.modules) | set(_span_modules(gm, span)))
            continue
        blocks.append(Block(owner or r.add, "residual", r.x, r.add, [r], list(r.span), _span_modules(gm, span)))
        owners.append(owner)
    seen: dict[str, int] = {}
    for b in blocks:  # names must be unique: they are the plan's keys
        if b.name in seen:
            seen[b.name] += 1
            b.name = f"{b.name}#{seen[b.name]}"
        else:
            seen[b.name] = 0
    return blocks


def _head(gm: fx.GraphModule, first: Block, x: fx.Node, names: set[str]) -> Block | None:
    """The sibling module (same parent as ``first``) that produced the stage's input, if any."""
    parent = _parent(first.name.split("#")[0])
    for path in reversed(_stack_paths(x)):
        if _parent(path) == parent and path != first.name and path not in names and parent:
            return Block(path, "head", output=x.name)
    return None


def _dense_stages(gm: fx.GraphModule) -> list[Stage]:
    """DenseNet-style stages: layers whose features are appended to channel concats of one input."""
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    by_first: dict[fx.Node, list[fx.Node]] = {}
    for n in order:
        if n.op != "call_function" or n.target is not torch.cat:
            continue
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        shape = node_shape(n)
        if not isinstance(tensors, (list, tuple)) or shape is None or len(shape) != 4 or dim % 4 != 1:
            continue
        if not all(isinstance(t, fx.Node) for t in tensors):
            continue
        by_first.setdefault(tensors[0], []).append(n)
    stages = []
    for first, cats in by_first.items():
        members: set[fx.Node] = set()
        for c in cats:
            members.update(c.args[0][1:])
        layers = []
        for n in sorted(members, key=index.__getitem__):
            if not all(u in cats for u in n.users) or node_shape(n) is None or len(node_shape(n)) != 4:
                continue
            span = {n}
            for m in reversed(order[:index[n]]):
                if m.op not in ("placeholder", "output") and m.users and all(u in span for u in m.users):
                    span.add(m)
            if not any(_has_state(gm, m) for m in span) or _between(order, index, first, n) is None:
                continue
            span_list = sorted(span, key=index.__getitem__)
            mods = _span_modules(gm, span_list)
            name = _common_prefix(str(m.target) for m in span_list if m.op == "call_module") or n.name
            layers.append(Block(name, "dense", first.name, n.name, [], [m.name for m in span_list], mods))
        if layers:
            stage_name = _common_prefix(b.name for b in layers) if len(layers) > 1 else _parent(layers[0].name)
            stages.append(Stage(stage_name or first.name, node_shape(first), layers))
    return stages


def find_structure(gm: fx.GraphModule) -> Structure:
    """Residual and dense blocks of ``gm`` grouped into stages, in graph order."""
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise SurgeryError("the graph has no shapes: run surgery.graph.propagate_shapes (or surgery.trace) first")
    residuals, skipped = find_residuals(gm)
    blocks = _residual_blocks(gm, residuals)
    nodes = {n.name: n for n in gm.graph.nodes}
    names = {b.name for b in blocks}
    stages: list[Stage] = []
    for b in blocks:
        shape = node_shape(nodes[b.input])
        last = stages[-1] if stages else None
        if last is not None and last.shape == shape and _chained(gm, nodes[last.blocks[-1].output], nodes[b.input]):
            last.blocks.append(b)
            continue
        head = _head(gm, b, nodes[b.input], names)
        stages.append(Stage("", shape, ([head] if head else []) + [b]))
    stages = _join_single_blocks(gm, stages)
    for s in stages:
        runs = [b.name.split("#")[0] for b in s.blocks]
        s.name = _common_prefix(runs) if len(runs) > 1 else _parent(runs[0]) or runs[0]
    stages += _dense_stages(gm)
    index = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages.sort(key=lambda s: index[s.blocks[-1].output])
    used: dict[str, int] = {}
    for s in stages:  # stage names are shown and keyed: unique, never empty
        base = s.name or "stage"
        used[base] = used.get(base, 0) + 1
        s.name = base if used[base] == 1 else f"{base}#{used[base] - 1}"
    return Structure(stages, skipped)


# --- collapsing ---------------------------------------------------------------------------


def _dense_groups(cg: Any, gm: fx.GraphModule, blocks: list[Block]) -> dict[str, tuple[int, int]]:
    """(id, size) of the channel group of each dense layer's features; SurgeryError if they cannot go."""
    groups = {g.id: g for g in cg.groups()}
    out = {}
    for b in blocks:
        layout = cg.dims[b.output][1]
        roots = cg.roots(layout)
        size = node_shape(next(n for n in gm.graph.nodes if n.name == b.output))[1]
        g = groups.get(roots[0]) if len(roots) == 1 else None
        if g is None or g.size != size or not g.prunable or list(cg.atoms(layout)[g.id]) != list(range(size)):
            why = "; ".join(g.reasons) if g is not None and g.reasons else "its channels are coupled to others"
            raise SurgeryError(f"cannot remove dense layer {b.name}: {why}")
        out[b.name] = (g.id, g.size)
    return out


def collapse(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """Remove ``blocks`` from ``gm`` (found by :func:`find_structure` on this graph), in place.

    A residual block's output users read its input instead (x + f(x) -> x) and its branch
    goes; a dense layer leaves every concat and its channels leave every consumer.
    Unused submodules are deleted. Returns ``gm`` recompiled.
    """
    blocks = list({b.name: b for b in blocks}.values())
    if any(b.kind == "head" for b in blocks):
        raise SurgeryError("the first block of a stage changes the shape and cannot be collapsed")
    nodes = {n.name: n for n in gm.graph.nodes}
    dense = [b for b in blocks if b.kind == "dense"]
    if dense:
        from .channels import build

        cg = build(gm)
        group_of = _dense_groups(cg, gm, dense)
        keep = {gid: np.zeros(size, dtype=bool) for gid, size in group_of.values()}
        gone = {nodes[b.output] for b in dense}
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target is torch.cat and n.args:
                tensors = n.args[0]
                if isinstance(tensors, (list, tuple)) and any(t in gone for t in tensors):
                    left = [t for t in tensors if t not in gone]
                    if not left:
                        raise SurgeryError(f"removing these dense layers would empty concat {n.name}")
                    n.args = (type(tensors)(left),) + tuple(n.args[1:])
        cg.apply(gm, keep)
    for b in blocks:
        if b.kind != "residual":
            continue
        for r in reversed(b.residuals):
            add = nodes[r.add]
            skip = add.args[r.skip_index]
            add.replace_all_uses_with(skip)
            gm.graph.erase_node(add)
            _out_of_place(gm, skip)
        # The branch goes with its checks: dead-code elimination keeps a traced `_assert` (impure) and
        # with it the convs feeding it (skresnet's shape check), so the block's own nodes go here.
        for name in reversed(b.span):
            n = nodes.get(name)
            if n is not None and n.graph is gm.graph and not n.users and n.op != "output":
                gm.graph.erase_node(n)
                nodes.pop(name)
    return finalize(gm)


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Readers of ``node`` that were in-place (ResNet's ReLU after the add) must not be any more.

    They used to overwrite the add's fresh output; now they would overwrite ``x``, which
    autograd still needs (the previous activation's output).
    """
    for u in node.users:
        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        elif u.op == "call_function" and u.kwargs.get("inplace") is True:
            u.kwargs = {**u.kwargs, "inplace": False}
        elif u.op == "call_method" and isinstance(u.target, str) and u.target.endswith("_") \
                and not u.target.endswith("__") and u.args and u.args[0] is node:
            u.target = u.target[:-1]


# --- how close each block is to the identity ------------------------------------------------


class _Probe(fx.Interpreter):
    """Runs the graph, recording block inputs and outputs; optionally skips blocks."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, list[str]], skip: dict[str, int]):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch  # node name -> block names reading it (as input or output)
        self.skip = skip  # add node name -> skip index: replace the add by its skip
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.skip:
            return self.env[n.args[self.skip[n.name]]]
        out = super().run_node(n)
        if n.name in self.watch:
            self.values[n.name] = out.detach()
        return out


def _norm2(t: torch.Tensor) -> float:
    return float(t.double().square().sum())


def identity_scores(gm: fx.GraphModule, structure: Structure, batches: Iterable[torch.Tensor],
                    *, output_change: bool = False) -> dict[str, dict[str, float]]:
    """For each collapsible block: ``branch`` = ||out - x|| / ||x|| (residual blocks) and, with
    ``output_change`` (always for dense layers), ``output`` = ||y' - y|| / ||y||: the relative
    change of the model's output when the block alone is collapsed. Sums run over all batches.
    """
    batches = list(batches)
    blocks = [b for b in structure.blocks if b.collapsible]
    residual = [b for b in blocks if b.kind == "residual"]
    watch: dict[str, list[str]] = {}
    for b in residual:
        watch.setdefault(b.input, []).append(b.name)
        watch.setdefault(b.output, []).append(b.name)
    num = dict.fromkeys((b.name for b in residual), 0.0)
    den = dict.fromkeys((b.name for b in residual), 0.0)
    was_training = gm.training
    gm.eval()
    outputs = []
    scores: dict[str, dict[str, float]] = {b.name: {} for b in blocks}
    try:
        with torch.no_grad():
            for images in batches:
                probe = _Probe(gm, watch, {})
                outputs.append(probe.run(images))
                for b in residual:
                    x, y = probe.values[b.input], probe.values[b.output]
                    num[b.name] += _norm2(y - x)
                    den[b.name] += _norm2(x)
            for b in residual:
                scores[b.name]["branch"] = math.sqrt(num[b.name] / max(den[b.name], 1e-30))
            todo = [b for b in blocks if b.kind == "dense" or output_change]
            if todo:
                scale = sum(_norm2(_first_tensor(o)) for o in outputs)
                cg = None
                if any(b.kind == "dense" for b in todo):
                    from .channels import build

                    cg = build(gm)
                    groups = _dense_groups(cg, gm, [b for b in todo if b.kind == "dense"])
                for b in bar(todo, "identity scores", unit="block"):
                    diff = 0.0
                    if b.kind == "residual":
                        skip = {r.add: r.skip_index for r in b.residuals}
                        for images, ref in zip(batches, outputs):
                            diff += _norm2(_first_tensor(_Probe(gm, {}, skip).run(images)) - _first_tensor(ref))
                    else:
                        with _zeroed_consumers(gm, cg, groups[b.name][0]):
                            for images, ref in zip(batches, outputs):
                                diff += _norm2(_first_tensor(gm(images)) - _first_tensor(ref))
                    scores[b.name]["output"] = math.sqrt(diff / max(scale, 1e-30))
    finally:
        gm.train(was_training)
    return scores


def _first_tensor(out: Any) -> torch.Tensor:
    tensors = output_tensors(out)
    if not tensors:
        raise TypeError(f"model output has no tensor: {type(out).__name__}")
    return tensors[0]


class _zeroed_consumers:
    """Temporarily zero every weight that reads a channel group: as if its channels were removed."""

    def __init__(self, gm: fx.GraphModule, cg: Any, gid: int):
        self.items = []
        for m in cg.members:
            if m.role != "in":
                continue
            atoms = cg.atoms(m.layout).get(gid)
            if atoms is None:
                continue
            owner, _, attr = m.param.rpartition(".")
            tensor = getattr(gm.get_submodule(owner) if owner else gm, attr)
            idx = torch.as_tensor(np.flatnonzero(atoms >= 0))
            self.items.append((tensor, m.axis, idx))

    def __enter__(self) -> None:
        self.saved = [t.detach().index_select(axis, idx).clone() for t, axis, idx in self.items]
        with torch.no_grad():
            for t, axis, idx in self.items:
                t.index_fill_(axis, idx, 0.0)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for (t, axis, idx), old in zip(self.items, self.saved):
                t.index_copy_(axis, idx, old)


def zero_block(gm: fx.GraphModule, block: Block) -> None:
    """Make ``block`` compute nothing (for tests): its branch yields zeros, or its channels are unread.

    Residual: the last parameterised module (or layer-scale tensor) of every branch is zeroed,
    walking back from the branch output. Dense: every weight that reads its channels is zeroed.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    if block.kind == "dense":
        from .channels import build

        cg = build(gm)
        gid = _dense_groups(cg, gm, [block])[block.name][0]
        ctx = _zeroed_consumers(gm, cg, gid)
        ctx.__enter__()  # kept zero: no exit
        return
    for r in block.residuals:
        node = nodes[r.branch]
        for _ in range(64):
            stateful = [a for a in [node, *node.all_input_nodes] if _has_state(gm, a)]
            if stateful:
                target = stateful[0]
                with torch.no_grad():
                    if target.op == "get_attr":
                        owner, _, attr = target.target.rpartition(".")
                        getattr(gm.get_submodule(owner) if owner else gm, attr).zero_()
                    else:
                        for p in gm.get_submodule(target.target).parameters():
                            p.zero_()
                break
            node = node.all_input_nodes[0]
        else:
            raise RuntimeError(f"no parameter found on the branch of {block.name}")


__all__ = ["Residual", "Block", "Stage", "Structure", "find_residuals", "find_structure", "collapse",
           "identity_scores", "zero_block"]
