"""`apply`: trace a model, run passes in order, measure; `rebuild`: replay a recipe."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import limits
from . import passes as registry
from .errors import SurgeryError
from .graph import block_names, node_shape, propagate_shapes, timm_notrace_blocks, trace
from .inputs import as_json, as_tuple, batch_of, check_example_inputs, describe, normalize, random_inputs, size_of
from .models import IO_KEYS, LoadedModel, build_source, input_norm, io_fields, load_model
from .progress import Steps
from .recipe import RECIPE_FORMAT
from .recover import compose
from .report import DRIFT_BATCH, LATENCY_BATCHES, compare_models, count_model
from .validate import ValidationError, expect_dict

TRACE_BATCH = 2


def example_batch(input_size: Sequence[Any], batch: int = TRACE_BATCH, seed: int = 0) -> Any:
    """A seeded random batch (a tuple of them for a model of several inputs): tracing needs concrete inputs."""
    return random_inputs(input_size, batch, seed)


PassLike = str | tuple[str, Any] | Any


def resolve_passes(passes: PassLike | Sequence[PassLike]) -> list[tuple[registry.PassInfo, Any]]:
    """Accept "name:k=v" strings, (name, config) pairs or config instances (dispatch on type)."""
    if isinstance(passes, (str, tuple)) or not isinstance(passes, Sequence):
        passes = [passes]
    by_config = {info.config_cls: info for info in registry.available().values()}
    resolved = []
    for p in passes:
        if isinstance(p, str):
            name, cfg = registry.parse_spec(p)
            resolved.append((registry.get(name), cfg))
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
            info = registry.get(p[0])
            cfg = p[1] if isinstance(p[1], info.config_cls) else registry.make_config(p[0], dict(p[1] or {}))
            resolved.append((info, cfg))
        elif type(p) in by_config:
            resolved.append((by_config[type(p)], p))
        else:
            raise SurgeryError(f"cannot read pass {p!r}; give 'name:key=value' or a pass config object")
    return resolved


@dataclass
class SurgeryResult:
    """What `apply` returns: the rewritten model, its report and the recipe to rebuild it."""

    model: fx.GraphModule
    report: dict[str, Any]
    recipe: dict[str, Any]
    original: nn.Module

    @property
    def input_size(self) -> Any:
        return normalize(self.recipe["input_size"])

    def as_loaded(self) -> LoadedModel:
        """The rewritten model with its provenance: what train/finetune/apply accept to chain on."""
        return LoadedModel(self.model, self.input_size, self.recipe["source"], self.recipe["passes"],
                           io={k: self.recipe[k] for k in IO_KEYS if k in self.recipe})

    def save(self, out: str | Path, *, onnx: bool = False, force: bool = False) -> Path:
        """Write recipe.json, model.safetensors, report.json (and model.onnx) to ``out``."""
        from .artifact import save_artifact

        return save_artifact(self, out, onnx=onnx, force=force)


def _to_graph(loaded: LoadedModel, example: torch.Tensor, leaf_modules: Sequence[str]) -> fx.GraphModule:
    if isinstance(loaded.model, fx.GraphModule):
        gm = copy.deepcopy(loaded.model).eval()  # an artifact: already a verified graph
        propagate_shapes(gm, example)
        return gm
    return trace(loaded.model, example, leaf_modules=leaf_modules)


MAX_NAMES = 16  # rewritten module names listed in an effect; the counts are complete


def _state(gm: fx.GraphModule) -> tuple[dict, dict, dict]:
    """Module types, tensors (parameters and buffers) and node signatures, by name."""
    modules = {name: type(m).__name__ for name, m in gm.named_modules()}
    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    # Live nodes only: dropping dead ones (finalize's clean-up) changes no compute.
    live, todo = set(), [n for n in gm.graph.nodes if n.op == "output"]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    nodes = {n.name: (n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes if n in live}
    return modules, tensors, nodes


def _outermost(names: set[str]) -> set[str]:
    """Drop names inside another listed one: a removed block, not each of its layers."""
    return {n for n in names if not any(n.startswith(p + ".") for p in names if p != n)}


def rewritten(before: fx.GraphModule, after: fx.GraphModule) -> dict[str, Any]:
    """What a pass rewrote: modules added, removed, retyped or with new weights; graph nodes."""
    mods_b, tens_b, nodes_b = _state(before)
    mods_a, tens_a, nodes_a = _state(after)
    touched = _outermost(set(mods_b) ^ set(mods_a))
    # The root's class name is fx's (it changes on recompile): its graph is compared by nodes.
    touched |= {n for n in set(mods_b) & set(mods_a) if n and mods_b[n] != mods_a[n]}
    for name in set(tens_b) | set(tens_a):
        a, b = tens_a.get(name), tens_b.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            touched.add(name.rpartition(".")[0] or "(root)")
    touched = _outermost(touched)
    return {"modules": len(touched), "names": sorted(touched)[:MAX_NAMES],
            "nodes_added": len(set(nodes_a) - set(nodes_b)), "nodes_removed": len(set(nodes_b) - set(nodes_a)),
            "nodes_changed": sum(nodes_a[n] != nodes_b[n] for n in set(nodes_a) & set(nodes_b))}


def _effect(before: dict, after: dict, rewrote: dict, sizes: tuple[tuple, tuple], reason: str | None,
            target: dict[str, Any] | None) -> dict[str, Any]:
    """A pass's measured effect: counts before/after (the report's counter), what it rewrote, changed."""
    effect: dict[str, Any] = {
        "changed": bool(rewrote["modules"] or rewrote["nodes_added"] or rewrote["nodes_removed"]
                        or rewrote["nodes_changed"] or sizes[0] != sizes[1]),
        "before": dict(before), "after": dict(after),
        "rewritten": rewrote,
    }
    if sizes[0] != sizes[1]:
        effect["input_size"] = [as_json(sizes[0]), as_json(sizes[1])]
    if not effect["changed"]:
        effect["reason"] = reason or "graph, weights and input size are as before"
    if target is not None:
        effect["target"] = check_target(target, before, after)
    return effect


TARGET_TOLERANCE = 0.01  # a pass's FLOPs prediction and the report's counter agree to 1%


def check_target(target: dict[str, Any], before: dict, after: dict) -> dict[str, Any]:
    """A pass's target (``ctx.target``) checked with the report's counter: ``reached_flops``, ``met``.

    ``bound``: "equal" (within the tolerance, relative), "at_most" (not above it), "less" or
    "more" (compute must fall or rise: a rescale's direction). A pass's own ``met: false``
    (a target it knows it could not reach) stands whatever the counter says.
    """
    out = dict(target)
    expected = target.get("expected_flops")
    if expected is None or not before["flops"]:
        out["met"] = bool(target.get("met", True))
        return out
    reached = after["flops"] / before["flops"]
    tol = float(target.get("tolerance", TARGET_TOLERANCE))
    bound = target.get("bound", "equal")
    met = {"equal": abs(reached - expected) <= tol * expected, "at_most": reached <= expected * (1 + tol),
           "less": reached < expected, "more": reached > expected}[bound]
    out.update(reached_flops=round(reached, 4), tolerance=tol, bound=bound,
               met=bool(met and target.get("met", True)))
    return out


def _run_passes(gm: fx.GraphModule, steps: list[tuple[registry.PassInfo, Any, dict | None]],
                example: torch.Tensor, data: str | None = None, *, counts: dict[str, Any] | None = None,
                norm: tuple[Any, Any] | None = None, lineage: Lineage | None = None,
                progress: Steps | None = None) -> tuple[fx.GraphModule, list[dict[str, Any]], torch.Tensor]:
    """Run passes in order; a pass that changes the input size (rescale) changes the example too.

    With ``counts`` (the input model's :func:`report.count_model`), each record gets its
    ``effect``: one count per pass boundary, the after of a pass the before of the next.
    ``progress``: each pass (with its count) is one step of it. ``lineage``: what `recover`
    aligns with (default: ``gm`` itself, and the fits of the passes run here), advanced in place.
    """
    records = []
    lineage = lineage if lineage is not None else Lineage(gm)
    for i, (info, cfg, plan) in enumerate(steps):
        with progress.step(info.name) if progress is not None else contextlib.nullcontext():
            gm, record, example, counts = _run_pass(gm, i, info, cfg, plan, example, data, counts, lineage, norm)
        records.append(record)
    return gm, records, example


@dataclass
class Lineage:
    """The pipeline's input graph and the fits of the passes so far against it (for `recover`)."""

    source: fx.GraphModule
    fits: list = field(default_factory=list)

    def advance(self, info: registry.PassInfo, fits: list, after: fx.GraphModule) -> None:
        if info.resizes_input:  # the source runs at the old size: align with the resized model from here
            self.source, self.fits = after, []
            return
        self.fits = compose(self.fits, fits, {n.name for n in after.graph.nodes})


def _run_pass(gm: fx.GraphModule, i: int, info: registry.PassInfo, cfg: Any, plan: dict | None,
              example: torch.Tensor, data: str | None, counts: dict[str, Any] | None, lineage: Lineage | None = None,
              norm: tuple[Any, Any] | None = None,
              ) -> tuple[fx.GraphModule, dict[str, Any], torch.Tensor, dict[str, Any] | None]:
    """One pass on its copy of the graph: its record (and effect, with ``counts``), the example after it."""
    size = size_of(example)
    # A replay's steps are all the recipe's passes (rebuild): i is the index in recipe["passes"].
    where = f"$.passes[{i}].plan" if plan is not None else "plan"
    ctx = registry.PassContext(example_inputs=as_tuple(example), plan=dict(plan or {}), replay=plan is not None,
                               input_size=size, data=data, norm=norm, where=where,
                               source=lineage.source if lineage else None, lineage=lineage.fits if lineage else [])
    previous = gm
    gm = info.run(gm, cfg, ctx)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"pass {info.name} returned {type(gm).__name__}, not a GraphModule")
    record = {"pass": info.name, "config": registry.config_to_dict(cfg), "plan": ctx.plan, "notes": ctx.notes}
    if ctx.recovery:
        record["recovery"] = ctx.recovery
    if lineage is not None:
        lineage.advance(info, ctx.fits, gm)
    if tuple(ctx.input_size) != size:
        example = example_batch(ctx.input_size, batch=batch_of(example))
        record["input_size"] = as_json(ctx.input_size)
    gm.eval()
    propagate_shapes(gm, example)
    if counts is not None:
        after = count_model(gm, size_of(example))
        record["effect"] = _effect(counts, after, rewritten(previous, gm), (size, size_of(example)),
                                   ctx.reason, ctx.target)
        counts = after
    return gm, record, example, counts


def apply(
    model: nn.Module | str | LoadedModel,
    passes: PassLike | Sequence[PassLike],
    example_inputs: torch.Tensor | None = None,
    *,
    input_size: Sequence[int] | str | None = None,
    measure: bool = True,
    latency: bool = True,
    data: str | None = None,
    pretrained: bool = False,
) -> SurgeryResult:
    """Trace ``model`` and run ``passes`` on it in order; the caller's model is not touched.

    ``model`` is an nn.Module, a spec for :func:`surgery.load_model` or a LoadedModel.
    ``passes``: "name:key=value,..." strings, (name, options) pairs or config objects.
    Every pass record has its measured ``effect`` (params, MACs, FLOPs before/after, what it rewrote);
    with ``measure`` the report also has the totals, CPU latency (unless ``latency=False``) and output
    drift. ``report["seconds"]``: where the time went, step by step.
    ``data`` (digits or an ImageFolder path) is the calibration data for passes that use it.
    ``pretrained``: a model name loads the library's pretrained weights (see :func:`load_model`).
    """
    steps = resolve_passes(passes)  # bad pass specs fail before any slow work
    if example_inputs is not None:
        check_example_inputs(example_inputs, SurgeryError)
        if isinstance(example_inputs, list):
            example_inputs = tuple(example_inputs)
    # The largest batch this call runs, for the memory checks: the latency batches, else the drift's,
    # the example's or the trace's.
    batch = max(LATENCY_BATCHES) if measure and latency else max(
        DRIFT_BATCH if measure else 0, batch_of(example_inputs) if example_inputs is not None else TRACE_BATCH)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if isinstance(model, nn.Module) and input_size is None and isinstance(example_inputs, torch.Tensor) \
                and example_inputs.dim() == 4:
            # A module built for this size (a ViT at img_size=64): the recipe's source must say so.
            input_size = tuple(example_inputs.shape[1:])
        loaded = load_model(model, input_size=input_size, pretrained=pretrained, batch=batch)
    if example_inputs is not None:
        loaded.input_size = size_of(example_inputs)
    # Before the example batch and the traced and pass copies exist: the passes' growth is known.
    names = " -> ".join(info.name for info, _ in steps)
    limits.check_model(loaded.model, loaded.input_size, passes=[cfg for _, cfg in steps], data=data is not None,
                       batch=batch,
                       what=f"{loaded.name} at {describe(loaded.input_size)}"
                            + (f" with {names}" if names else ""))
    example = example_inputs if example_inputs is not None else example_batch(loaded.input_size)
    leaf_modules = list(loaded.source.get("leaf_modules", []))
    if any(info.resizes_input for info, _ in steps) and not isinstance(loaded.model, fx.GraphModule):
        # Blocks timm marks untraceable compute from the input's shape (windows, padding); traced through,
        # those sizes are fixed at the example's. As modules they follow the new size rescale gives.
        leaf_modules += block_names(loaded.model, timm_notrace_blocks())
    with Steps(f"apply {loaded.name}", 2 + len(steps) + bool(measure)) as progress:
        with progress.step("trace"):
            gm = _to_graph(loaded, example, leaf_modules)
        if not isinstance(loaded.model, fx.GraphModule):
            leaf_modules = sorted(set(leaf_modules) | set(gm.meta["surgery"].leaf_fallbacks))
        with progress.step("count"):
            first = count_model(loaded.model, loaded.input_size)
        sources = [cfg.source for info, cfg in steps if info.name == "recover" and getattr(cfg, "source", None)]
        lineage = aligned_lineage(loaded, sources[0]) if sources else None
        gm, records, final_example = _run_passes(gm, [(info, cfg, None) for info, cfg in steps], example, data,
                                                 counts=first, progress=progress, norm=input_norm(loaded),
                                                 lineage=lineage)
        measured = {}
        if measure:
            # The totals are the first and last pass boundaries' counts: one counter, counted once.
            last = records[-1]["effect"]["after"] if records else first
            with progress.step("latency and drift" if latency else "drift"):
                measured = compare_models(loaded.model, gm, loaded.input_size, size_of(final_example),
                                          latency=latency, counts=(first, last))
    source = dict(loaded.source)
    source.setdefault("input_size", as_json(loaded.input_size))  # the size the source is traced at
    if leaf_modules:
        source["leaf_modules"] = list(leaf_modules)
    recipe = {
        "format": RECIPE_FORMAT,
        "source": source,
        "input_size": as_json(size_of(final_example)),
        "passes": loaded.passes + [{k: v for k, v in r.items() if k not in ("notes", "effect", "recovery")}
                                   for r in records],
        **io_fields(loaded.io, _output_width(gm)),  # a new head (head pass) drops the old class names
    }
    report: dict[str, Any] = {"model": loaded.name, "passes": records, **measured,
                              "seconds": {name: t for name, t in _unique(progress.timings)}}
    return SurgeryResult(model=gm, report=report, recipe=recipe, original=loaded.model)


def _output_width(gm: fx.GraphModule) -> int | None:
    """The last dimension of the graph's (first) output, from the propagated shapes."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    first = output.args[0]
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    shape = node_shape(first) if isinstance(first, fx.Node) else None
    return shape[-1] if shape else None


def _unique(timings: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Step names made unique for a dict (a pass applied twice: prune, prune #2)."""
    seen: dict[str, int] = {}
    out = []
    for name, t in timings:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name} #{seen[name]}", t))
    return out


def rebuild(recipe: dict[str, Any], base_model: nn.Module | None = None,
            lineage: Lineage | None = None) -> fx.GraphModule:
    """The architecture a recipe describes, with fresh weights: source, trace, replayed passes.

    ``base_model``: the source's weights instead of fresh ones (a GraphModule is used as it is,
    not traced again). ``lineage``: filled with the source graph and the replayed passes' fits."""
    source = recipe["source"]
    steps = []
    for i, step in enumerate(recipe["passes"]):
        try:
            info = registry.get(step["pass"])
        except SurgeryError as exc:
            raise ValidationError(f"$.passes[{i}].pass", str(exc)) from None
        try:
            cfg = registry.make_config(step["pass"], step.get("config", {}))
        except SurgeryError as exc:
            raise ValidationError(f"$.passes[{i}].config", str(exc)) from None
        # Read from disk: a null plan would make the pass decide anew, a list would break dict().
        steps.append((info, cfg, expect_dict(step.get("plan", {}), f"$.passes[{i}].plan")))
    size = source.get("input_size", recipe["input_size"])
    # Sizes read from disk (num_classes, img_size, input size, passes) are checked on meta before building.
    kwargs = source.get("kwargs") if isinstance(source.get("kwargs"), dict) else {}
    check = {"what": f"the recipe's {source.get('name') or source.get('class', 'model')}"
                     + "".join(f" {k}={str(v)[:40]}" for k, v in kwargs.items()),
             "passes": [cfg for _, cfg, _ in steps], "batch": TRACE_BATCH, "replay": True,
             "hint": "check its recipe.json, or raise the limit (--max-memory, surgery.limits.set_max_memory)"}
    if base_model is not None:
        limits.check_model(base_model, size, **check)
    else:
        n = kwargs.get("num_classes")
        limits.check_build(lambda: build_source(source), size, num_classes=n if type(n) is int else None, **check)
    model = base_model if base_model is not None else build_source(source)
    example = example_batch(size)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model).eval()
        propagate_shapes(gm, example)
    else:
        gm = trace(model, example, leaf_modules=source.get("leaf_modules", ()), verify=False)
    if lineage is not None:
        lineage.source = gm
    gm, _, _ = _run_passes(gm, steps, example, lineage=lineage)
    return gm


def aligned_lineage(loaded: LoadedModel, spec: str) -> Lineage:
    """The model ``spec`` names (the one an artifact was made from, with its weights) as `recover`'s
    source, and the artifact's recorded passes replayed on it for the fits to align."""
    if not loaded.passes:
        raise SurgeryError(f"recover:source= aligns an artifact with the model it was made from, but {loaded.name} "
                           "holds no passes; put recover after the passes in one run instead")
    if any(registry.get(p["pass"]).resizes_input for p in loaded.passes):
        raise SurgeryError("recover cannot align an artifact made with rescale: its source runs at another size")
    source = load_model(spec)
    want = {k: tuple(v.shape) for k, v in build_source(loaded.source).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in source.model.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:1]
        raise SurgeryError(f"recover:source={spec} is not the architecture this artifact was made from "
                           f"({loaded.name}; first difference: {diff[0][0] if diff else '?'}); give that model")
    lineage = Lineage(source.model)
    recipe = {"source": loaded.source, "input_size": as_json(loaded.input_size), "passes": loaded.passes}
    rebuild(recipe, base_model=source.model, lineage=lineage)
    return lineage
