"""Recovery: fit rewritten layers and blocks to the source model's activations on calibration data.

A pass that changes the function (prune, bilinear, ebcle) says what each of its rewritten
modules should compute as a :class:`Fit`: the node of the rewritten graph, the node of the
source graph whose value it must reproduce (and which channels of it), and how to fit:

* ``linear``: a Conv2d (groups 1) or Linear layer, least squares in closed form;
* ``bilinear``: a bilinear projection, alternating least squares over U and V (each is
  linear in the output once the other is fixed);
* ``distill``: anything else (a block whose neighbours were removed): a few hundred Adam
  steps on the block's parameters against the source's value (local distillation).

:func:`recover` runs the source once over the calibration batches, recording each target
(sampled rows for the closed forms, whole values for distillation), then walks the
rewritten graph node by node over all batches at once. A fit is solved when the walk
reaches its node, so it sees the input that the already recovered layers before it
produce. Two forwards in all, whatever the number of layers: the cost grows with the
calibration set once, not per layer. The closed forms read each layer at ``rows`` sampled
positions (pixels, tokens) spread over the batches: ridge least squares (in the rows'
kernel form when there are fewer rows than inputs), and for ALS the rows' second moments,
so that a sweep costs no pass over them. A fit that would not lower its layer's error on
the calibration rows is undone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .graph import get_module
from .nn.bilinear import BilinearConv2d, BilinearProjection, _linear_weight
from .progress import bar

KINDS = ("linear", "bilinear", "distill")


@dataclass
class Fit:
    """What one rewritten module (or block) must reproduce.

    ``node``: the rewritten graph's node whose value is fitted (a module call, or a block's
    output). ``source``: the node of the source graph whose value it must equal; ``channels``:
    the indices of that value it keeps along ``axis`` (None: all). ``span`` and ``modules``
    (distill only): the rewritten nodes computed on the way to ``node``, and the modules
    whose parameters are trained.
    """

    node: str
    source: str
    kind: str
    channels: list[int] | None = None
    axis: int = 1
    span: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


@dataclass
class Options:
    """How hard to fit: rows sampled per layer, ridge, ALS sweeps, distillation steps."""

    rows: int = 2048  # sampled rows (pixels, tokens) per layer over all calibration batches
    ridge: float = 1e-3  # relative to the mean input energy
    sweeps: int = 12  # alternating least-squares sweeps (bilinear)
    steps: int = 200  # Adam steps (distill)
    lr: float = 3e-3  # peak of a cosine decay over the steps


@dataclass
class Result:
    node: str
    kind: str
    before: float  # relative error of the node's value on the calibration rows
    after: float
    kept: bool  # False: the fit did not help and was undone

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "kind": self.kind, "before": round(self.before, 5),
                "after": round(self.after, 5), "kept": self.kept}


def compose(earlier: list[Fit], later: list[Fit], later_nodes: set[str]) -> list[Fit]:
    """Fits of two passes in a row, as fits against the first pass's source.

    ``later``'s sources are nodes of the graph between the passes: where an earlier fit
    produced that node, the later fit takes its source and channels (indexed through).
    Earlier fits whose node is gone, or that a later fit now covers, are dropped.
    """
    by_node = {f.node: f for f in earlier}
    out = []
    for f in later:
        g = by_node.get(f.source)
        if g is None:
            out.append(f)
            continue
        channels = g.channels if f.channels is None else (
            [g.channels[i] for i in f.channels] if g.channels is not None else f.channels)
        out.append(Fit(f.node, g.source, f.kind, channels, f.axis, f.span, f.modules))
    covered = {f.node for f in later}
    out += [g for g in earlier if g.node in later_nodes and g.node not in covered]
    return out


def fittable(module: nn.Module) -> bool:
    """A layer the linear fit can refit: nn.Linear, or nn.Conv2d with groups 1 and zero padding."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1
                                         and module.padding_mode == "zeros" and isinstance(module.padding, tuple))


def downstream_layers(gm: fx.GraphModule, changed: set[str]) -> list[Fit]:
    """Linear fits for the plain layers (called once) whose input the nodes ``changed`` feed, directly or not.

    Their weights were not rewritten, but what they read was: refitting them (the classifier,
    most of all) takes up what the rewritten layers could not reproduce.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    seen: set[fx.Node] = set()
    todo = [nodes[c] for c in changed if c in nodes]
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    out = []
    for n in gm.graph.nodes:
        if n in seen and n.op == "call_module" and n.name not in changed and calls[n.target] == 1 \
                and fittable(gm.get_submodule(n.target)):
            out.append(Fit(n.name, n.name, "linear", axis=1 if isinstance(gm.get_submodule(n.target), nn.Conv2d)
                           else -1))
    return out


def tail(gm: fx.GraphModule, start: str) -> Fit | None:
    """Distillation of everything from node ``start`` (exclusive) to the model's output: the last block,
    the final norm and the classifier trained together against the source's output (logits)."""
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    end = output.args[0]
    while isinstance(end, (tuple, list)) and end:
        end = end[0]
    nodes = {n.name: n for n in gm.graph.nodes}
    if not isinstance(end, fx.Node) or start not in nodes:
        return None
    ancestors: set[fx.Node] = set()
    todo = [end]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in ancestors:
                ancestors.add(a)
                todo.append(a)
    after: set[fx.Node] = {nodes[start]}
    span = []
    for n in gm.graph.nodes:
        if n is not nodes[start] and n in ancestors and any(a in after for a in n.all_input_nodes):
            after.add(n)
            span.append(n)
    modules = sorted({str(n.target) for n in span + [end] if n.op == "call_module"}
                     | {str(n.target).rpartition(".")[0] for n in span + [end] if n.op == "get_attr"} - {""})
    return Fit(end.name, end.name, "distill", span=[n.name for n in span], modules=modules) if modules else None


# --- rows: what a layer reads, at sampled positions --------------------------------------------


def _pick(n: int, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:rows] if n > rows else torch.arange(n)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, BilinearConv2d))


def input_rows(module: nn.Module, x: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """The input of a conv (patches, in its weight's order) or linear layer, at sampled positions."""
    if not _is_conv(module):
        flat = x.reshape(-1, x.shape[-1])
        return flat[_pick(flat.shape[0], rows, seed)].float()
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = module.kernel_size, module.stride, module.dilation, module.padding
    b, c, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pick = _pick(b * ho * wo, rows, seed)
    bi, oy, ox = pick // (ho * wo), (pick // wo) % ho, pick % wo
    ys = oy[:, None] * sh - ph + torch.arange(kh)[None, :] * dh
    xs = ox[:, None] * sw - pw + torch.arange(kw)[None, :] * dw
    # Gathered from x itself (no padded copy of the whole map): outside positions are zeroed.
    patches = x[bi[:, None, None], :, ys.clamp(0, h - 1)[:, :, None], xs.clamp(0, w - 1)[:, None, :]]
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    patches = patches * inside[..., None].to(patches.dtype)  # (n, kh, kw, c)
    return patches.permute(0, 3, 1, 2).reshape(len(pick), c * kh * kw).float()


def _select(value: torch.Tensor, fit: Fit) -> torch.Tensor:
    if fit.channels is None:
        return value
    return value.index_select(fit.axis, torch.as_tensor(fit.channels, device=value.device))


def output_rows(value: torch.Tensor, fit: Fit, conv: bool, rows: int, seed: int) -> torch.Tensor:
    """The source's value at the same sampled positions as :func:`input_rows` (channels last)."""
    value = _select(value, fit)
    flat = value.movedim(1, -1).reshape(-1, value.shape[1]) if conv else value.reshape(-1, value.shape[-1])
    return flat[_pick(flat.shape[0], rows, seed)].float()


# --- closed forms -----------------------------------------------------------------------------


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def _error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """sqrt(sum |y - W x|^2 / sum |y|^2) over the rows."""
    energy = y.double().square().sum().item()
    residual = (y - x @ w.T.to(x.dtype)).double().square().sum().item()
    return math.sqrt(residual / energy) if energy > 0 else 0.0


def _cholesky_solve(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """g^-1 c for a symmetric positive definite g (the pseudo-inverse if it is not, to working precision)."""
    try:
        return torch.cholesky_solve(c, torch.linalg.cholesky(g))
    except RuntimeError:
        return torch.linalg.pinv(g, hermitian=True) @ c


def ridge_solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W |y - x W^T|^2 + lam |W|^2, lam = ridge * mean(diag x^T x).

    With fewer rows than inputs (deep layers at small resolution) the same solution comes
    from the rows' n x n kernel, W = y^T (x x^T + lam I)^-1 x: cheaper than the d x d system.
    """
    n, d = x.shape
    lam = ridge * max(x.double().square().sum().item() / d, 1e-12)
    if n >= d:
        g = (x.T @ x).double()
        g.diagonal().add_(lam)
        return _cholesky_solve(g, (x.T @ y).double()).T
    k = (x @ x.T).double()
    k.diagonal().add_(lam)
    return _cholesky_solve(k, y.double()).T @ x.double()


@dataclass
class Moments:
    """sum x x^T, sum x, n, sum y x^T, sum y over the sampled rows (float64): what ALS needs."""

    xx: torch.Tensor
    x: torch.Tensor
    n: int
    yx: torch.Tensor
    y: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> Moments:
        return cls((x.T @ x).double(), x.sum(0).double(), x.shape[0], (y.T @ x).double(), y.sum(0).double())


def _dense(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight as a (K, D) matrix and its bias (a bilinear layer: its K base outputs)."""
    if isinstance(module, (BilinearProjection, BilinearConv2d)):
        w = module.to_dense_weight().detach()
        index = _output_index(module)
        return w[index], None if module.bias is None else module.bias.detach()[index]
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    return w, None if module.bias is None else module.bias.detach()


def _output_index(module: nn.Module) -> torch.Tensor:
    if isinstance(module, BilinearProjection):
        return module.output_index()
    return torch.arange(module.out_channels)


def _augmented(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return w if b is None else torch.cat([w, b[:, None]], 1)


def fit_linear(module: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float
               ) -> tuple[float, float, Callable[[], None]]:
    """Least squares W (and b) on the rows: the errors before and after, and how to write the fit."""
    w0, b0 = _dense(module)
    xa = x if b0 is None else _with_ones(x)
    before = _error(xa, y, _augmented(w0, b0))
    wb = ridge_solve(xa, y, ridge)
    after = _error(xa, y, wb)
    w, b = (wb[:, :-1], wb[:, -1]) if b0 is not None else (wb, None)

    def write() -> None:
        with torch.no_grad():
            module.weight.copy_(w.reshape(module.weight.shape).to(module.weight.dtype))
            if b is not None:
                module.bias.copy_(b.to(module.bias.dtype))

    return before, after, write


def fit_bilinear(module: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float, sweeps: int
                 ) -> tuple[float, float, Callable[[], None]]:
    """Alternating least squares on the factors of the layer's base (unscaled) output block.

    y[a, b] = sum_r sum_ij U[r, i, a] X[i, j] V[r, j, b] is linear in U for fixed V and in V
    for fixed U; both normal equations come from the rows' second moments (reshaped to
    (d1, d2, d1, d2)), so a sweep costs no pass over the rows. A bias is fitted by
    centring. Padded inputs are zero; padded outputs are fitted to zero.
    """
    w0, b0 = _dense(module)
    before = _error(x if b0 is None else _with_ones(x), y, _augmented(w0, b0))
    m = Moments.of(x, y)
    k, d = w0.shape
    (d1, d2) = module.in_shape
    (u1, u2) = getattr(module, "base_out_shape", module.out_shape)
    if b0 is not None and m.n:
        xx = m.xx - torch.outer(m.x, m.x) / m.n
        yx = m.yx - torch.outer(m.y, m.x) / m.n
    else:
        xx, yx = m.xx, m.yx
    cov = torch.zeros(d1 * d2, d1 * d2, dtype=torch.float64)
    cov[:d, :d] = xx
    cross = torch.zeros(u1 * u2, d1 * d2, dtype=torch.float64)
    cross[:k, :d] = yx
    c4 = cov.reshape(d1, d2, d1, d2)
    t4 = cross.reshape(u1, u2, d1, d2)
    U = module.U.detach().double()[:, :, :u1].clone()
    V = module.V.detach().double()[:, :, :u2].clone()
    r = U.shape[0]

    def solve(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g.diagonal().add_(ridge * g.diagonal().mean().clamp_min(1e-12))
        return _cholesky_solve(g, c.T).T

    for _ in range(sweeps):
        # U step: features Z_r[i, b] = sum_j X[i, j] V[r, j, b].
        gu = torch.einsum("ijkl,rjb,slb->risk", c4, V, V).reshape(r * d1, r * d1)
        cu = torch.einsum("abij,rjb->ari", t4, V).reshape(u1, r * d1)
        U = solve(gu, cu).reshape(u1, r, d1).permute(1, 2, 0).contiguous()
        # V step: features W_r[a, j] = sum_i U[r, i, a] X[i, j].
        gv = torch.einsum("ijkl,ria,ska->rjsl", c4, U, U).reshape(r * d2, r * d2)
        cv = torch.einsum("abij,ria->brj", t4, U).reshape(u2, r * d2)
        V = solve(gv, cv).reshape(u2, r, d2).permute(1, 2, 0).contiguous()
        # Same product, balanced factors: the ridge then shrinks both alike.
        nu = U.flatten(1).norm(dim=1).clamp_min(1e-12)
        nv = V.flatten(1).norm(dim=1).clamp_min(1e-12)
        s = (nv / nu).sqrt()[:, None, None]
        U, V = U * s, V / s
    w = _linear_weight(U, V)[:k, :d]
    b = (m.y - w @ m.x) / m.n if b0 is not None else None
    after = _error(x if b is None else _with_ones(x), y, _augmented(w, b))

    def write() -> None:
        with torch.no_grad():
            module.U[:, :, :u1] = U.to(module.U.dtype)
            module.V[:, :, :u2] = V.to(module.V.dtype)
            if b is not None:
                module.bias[_output_index(module)] = b.to(module.bias.dtype)

    return before, after, write


# --- local distillation ---------------------------------------------------------------------------


def segment(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The nodes as a GraphModule of their own (sharing gm's modules), and the outside values it reads."""
    inside = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outside: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a in inside or a in env:
                continue
            if a.op == "get_attr":
                env[a] = graph.node_copy(a)
            else:
                env[a] = graph.placeholder(a.name)
                outside.append(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph), outside


def _relative(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    num = sum((y - t).double().square().sum().item() for y, t in pairs)
    den = sum(t.double().square().sum().item() for _, t in pairs)
    return math.sqrt(num / den) if den > 0 else 0.0


def distill(gm: fx.GraphModule, fit: Fit, inputs: list[list[torch.Tensor]], targets: list[torch.Tensor],
            opts: Options, seed: int) -> tuple[float, float, bool]:
    """Adam on the fit's modules so that the segment maps its inputs to the targets; undone if no better."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sub, _ = segment(gm, [nodes[name] for name in fit.span + [fit.node]])
    params = list({id(p): p for name in fit.modules for p in gm.get_submodule(name).parameters()}.values())
    # Batch norms of the block train on batch statistics, so that their running statistics follow the
    # new weights: eval (the fit) and train mode (a fine-tune after it) then compute the same block.
    norms = list({id(m): m for name in fit.modules for m in gm.get_submodule(name).modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}.values())
    saved = [p.detach().clone() for p in params] + [b.detach().clone() for m in norms for b in m.buffers()]
    buffers = [b for m in norms for b in m.buffers()]

    def error() -> float:
        with torch.no_grad():
            return _relative([(sub(*xs), t) for xs, t in zip(inputs, targets)])

    before = error()
    if not params:
        return before, before, False
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=opts.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, opts.steps)  # few steps: decay to settle
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    scales = [t.square().mean().clamp_min(1e-12) for t in targets]
    for m in norms:
        m.train()
    try:
        with torch.enable_grad():
            for step in range(opts.steps):
                i = int(order[step % len(order)])
                loss = (sub(*inputs[i]) - targets[i]).square().mean() / scales[i]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for m in norms:
            m.eval()
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
        p.grad = None
    after = error()
    if after >= before:
        with torch.no_grad():
            for p, s in zip(params + buffers, saved):
                p.copy_(s)
        return before, after, False
    return before, after, True


# --- the walk ---------------------------------------------------------------------------------------


def _source_values(source: fx.GraphModule, fits: list[Fit], batches: list[torch.Tensor], convs: list[bool],
                   opts: Options) -> list[list[torch.Tensor]]:
    """Per fit (in order) and batch: the source's value at sampled rows (closed forms) or whole (distill)."""
    wanted: dict[str, list[int]] = {}
    for i, f in enumerate(fits):
        wanted.setdefault(f.source, []).append(i)
    out: list[list[torch.Tensor]] = [[] for _ in fits]
    rows = _rows_per_batch(opts, len(batches))

    class Recorder(fx.Interpreter):
        batch = 0

        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            for i in wanted.get(n.name, ()):
                f = fits[i]
                if f.kind == "distill":
                    out[i].append(_select(value, f).detach().clone())
                else:
                    out[i].append(output_rows(value.detach(), f, convs[i], rows, self.batch))
            return value

    recorder = Recorder(source)
    with torch.no_grad():
        for i, images in enumerate(batches):
            recorder.batch = i
            recorder.run(images)
    return out


def _rows_per_batch(opts: Options, batches: int) -> int:
    return max(64, -(-opts.rows // max(1, batches)))


def check(source: fx.GraphModule, gm: fx.GraphModule, fits: list[Fit]) -> tuple[list[Fit], list[str]]:
    """The fits that can run on these graphs, and why the others cannot (one line each)."""
    src = {n.name for n in source.graph.nodes}
    nodes = {n.name: n for n in gm.graph.nodes}
    ok, skipped = [], []
    for f in fits:
        node = nodes.get(f.node)
        if node is None or f.source not in src or any(s not in nodes for s in f.span):
            skipped.append(f"{f.node}: not in the graph any more")
            continue
        if f.kind in ("linear", "bilinear"):
            module = get_module(gm, node)
            fits_kind = (isinstance(module, (BilinearProjection, BilinearConv2d)) if f.kind == "bilinear"
                         else fittable(module))
            if not fits_kind:
                skipped.append(f"{f.node}: {type(module).__name__} is no {f.kind} layer")
                continue
        ok.append(f)
    return ok, skipped


def recover(source: fx.GraphModule, gm: fx.GraphModule, fits: list[Fit], batches: list[torch.Tensor],
            opts: Options | None = None, *, label: str = "recover") -> list[Result]:
    """Fit ``gm``'s modules in place so that each fit's node reproduces the source's value.

    ``batches``: calibration inputs. One forward of the source, then one walk of ``gm``
    node by node over all batches; closed forms are solved when the walk reaches their
    node, distillation when it reaches the block's output (then the block runs again).
    Both models are evaluated in eval mode and left in the mode they came in.
    """
    opts = opts or Options()
    fits, _ = check(source, gm, fits)
    if not fits:
        return []
    nodes = {n.name: n for n in gm.graph.nodes}
    convs = [f.kind != "distill" and _is_conv(get_module(gm, nodes[f.node])) for f in fits]
    modes = source.training, gm.training
    source.eval()
    gm.eval()
    results: list[Result] = []
    rows = _rows_per_batch(opts, len(batches))
    # Per node: its closed-form fits first, then its distillations, in the order declared.
    by_node: dict[str, list[int]] = {}
    for i in sorted(range(len(fits)), key=lambda i: fits[i].kind == "distill"):
        by_node.setdefault(fits[i].node, []).append(i)
    try:
        targets = _source_values(source, fits, batches, convs, opts)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last_use: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        spans: dict[int, tuple[list[fx.Node], list[fx.Node]]] = {}
        for i, f in enumerate(fits):
            if f.kind != "distill":
                continue
            span = [nodes[s] for s in f.span] + [nodes[f.node]]
            outside = segment(gm, span)[1]
            spans[i] = span, outside
            # The segment's outside inputs live until it has been fitted and run again.
            for a in outside:
                if order[last_use.get(a, a)] < order[nodes[f.node]]:
                    last_use[a] = nodes[f.node]
        runners = [fx.Interpreter(gm, garbage_collect_values=False) for _ in batches]
        for runner, images in zip(runners, batches):
            runner.args_iter = iter([images])
        with torch.no_grad():
            for node in bar(list(gm.graph.nodes), label, unit="node"):
                if node.op == "output":
                    break
                for i in by_node.get(node.name, ()):
                    fit = fits[i]
                    if fit.kind != "distill":
                        results.append(_closed_form(gm, node, fit, runners, targets[i], rows, opts))
                        continue
                    span, outside = spans[i]
                    inputs = [[runner.env[a] for a in outside] for runner in runners]
                    before, after, kept = distill(gm, fit, inputs, targets[i], opts, len(results))
                    results.append(Result(node.name, fit.kind, before, after, kept))
                    for runner in runners:  # the block's inner values, with its new parameters
                        for inner in span[:-1]:
                            runner.env[inner] = runner.run_node(inner)
                for runner in runners:
                    runner.env[node] = runner.run_node(node)
                    for arg in node.all_input_nodes:
                        if last_use.get(arg) is node:
                            runner.env.pop(arg, None)
    finally:
        source.train(modes[0])
        gm.train(modes[1])
    return results


def _closed_form(gm: fx.GraphModule, node: fx.Node, fit: Fit, runners: list[fx.Interpreter],
                 targets: list[torch.Tensor], rows: int, opts: Options) -> Result:
    """Least squares (or ALS) from the layer's input rows in the walk to the source's rows."""
    module = get_module(gm, node)
    x = torch.cat([input_rows(module, runner.env[node.args[0]], rows, i) for i, runner in enumerate(runners)])
    y = torch.cat(targets)
    k = _dense(module)[0].shape[0]
    if y.shape[1] != k or y.shape[0] != x.shape[0]:
        raise RuntimeError(f"recover: {node.name} yields {k} channels at {x.shape[0]} rows but its source "
                           f"{fit.source} {y.shape[1]} at {y.shape[0]}; this is a bug in the pass that declared "
                           "the fit")
    before, after, write = (fit_linear(module, x, y, opts.ridge) if fit.kind == "linear"
                            else fit_bilinear(module, x, y, opts.ridge, opts.sweeps))
    kept = after < before
    if kept:
        write()
    return Result(node.name, fit.kind, before, after, kept)


def summary(results: list[Result], images: int, seconds: float) -> str:
    """One line for the report: how many fits, on what, how long, and the median error before -> after."""
    if not results:
        return "recover: nothing to fit"
    kinds = ", ".join(f"{sum(r.kind == k for r in results)} {k}" for k in KINDS if any(r.kind == k for r in results))
    med = sorted(results, key=lambda r: r.before)[len(results) // 2].before
    after = sorted(r.after if r.kept else r.before for r in results)[len(results) // 2]
    undone = sum(not r.kept for r in results)
    return (f"recover: fitted {len(results)} layer(s)/block(s) ({kinds}) on {images} calibration images in "
            f"{seconds:.1f} s; relative activation error median {med:.3f} -> {after:.3f}"
            + (f"; {undone} fit(s) did not help and were undone" if undone else ""))


def run(source: fx.GraphModule, gm: fx.GraphModule, fits: list[Fit], ctx: Any, spec: str | None, images: int,
        seed: int, who: str, opts: Options | None = None, calib: Any = None) -> None:
    """A pass's ``recover=on``: calibration from ``spec`` (else the run's --data), the fits, the report.

    ``calib``: calibration the pass already loaded. Writes the summary note, one row per fit
    in ``ctx.recovery`` (the report's table) and a note for the fits that cannot run here.
    """
    if calib is None:
        from .data import load_calibration
        from .errors import SurgeryError

        spec = spec or getattr(ctx, "data", None)
        if not spec:
            raise SurgeryError(f"{who}:recover needs calibration images: add data=digits or data=FOLDER to the "
                               "pass (or --data to the run)")
        calib = load_calibration(spec, ctx.example_inputs, images, seed=seed, who=who, norm=ctx.norm)
    runnable, skipped = check(source, gm, fits)
    start = time.perf_counter()
    results = recover(source, gm, runnable, [b[0] for b in calib.batches], opts, label=f"{who}: recover")
    seconds = time.perf_counter() - start
    ctx.note(summary(results, sum(len(b[1]) for b in calib.batches), seconds))
    if skipped:
        ctx.note(f"recover: {len(skipped)} fit(s) not run: " + "; ".join(skipped[:4])
                 + (" ..." if len(skipped) > 4 else ""))
    ctx.recovery.extend(r.as_dict() for r in results)
