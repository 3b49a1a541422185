"""ONNX export with proof: checker, a really dynamic batch axis, parity with torch, latency.

The dynamo exporter (``torch.export``) is tried first because it is the one PyTorch
maintains; the TorchScript exporter is the fallback for graphs ``torch.export``
cannot capture. Which one produced a file is written into the file itself
(metadata key ``surgery.exporter``), so :func:`verify_onnx` can report it later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from .errors import ParityError, SurgeryError
from .graph import output_tensors
from .inputs import as_json, as_tuple, random_inputs, sample_shapes
from .predict import META_PREFIX  # the metadata contract, read there without torch
from .progress import Steps
from .safeio import atomic_file, check_parent

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
EXPORTER_KEY = META_PREFIX + "exporter"
# protobuf refuses to serialise a message of 2 GiB or more; keep 64 MiB of headroom for
# the graph itself and for constants the exporter folds in next to the weights.
SINGLE_FILE_LIMIT = 2**31 - 2**26
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_LINE = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>: (.*)$")


VERIFY_STEPS = ("check", "parity", "latency")


# --- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _redirect_fd(fd: int, target: int) -> Iterator[None]:
    """Point file descriptor ``fd`` at ``target``; C++ code writes there, past sys.stdout."""
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (a daemon): nothing to silence
        yield
        return
    os.dup2(target, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@contextlib.contextmanager
def _quiet() -> Iterator[list[str]]:
    """Silence exporter chatter; yields a list that receives the swallowed text on exit.

    The TorchScript exporter warns that it is deprecated (plus TracerWarnings) and its C++
    side dumps the TorchScript IR to stdout when it fails; torch.export prints partial
    graphs to stderr and logs every failed capture strategy as ERROR records with full
    tracebacks (torch._guards) before trying the next one; onnxscript logs each optimizer
    pass. None of it is actionable for a CLI user: a real failure reaches them as the
    exception, and the text is kept for a DEBUG log record. ``logging.disable`` is
    process-wide, acceptable for the span of an export in a single-threaded CLI.
    """
    captured: list[str] = []
    previous_disable = logging.root.manager.disable
    # torch's setup_onnx_logging tests the function object instead of calling it, so the
    # TorchScript exporter switches the C++ ONNX log on and never off again; undo that.
    onnx_log = getattr(torch._C, "_jit_is_onnx_log_enabled", lambda: False)()
    for stream in (sys.stdout, sys.stderr):  # what Python buffered belongs before the redirect
        if stream is not None:
            stream.flush()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(tempfile.TemporaryFile(mode="w+", errors="replace"))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(contextlib.redirect_stdout(sink))
        stack.enter_context(contextlib.redirect_stderr(sink))
        stack.enter_context(_redirect_fd(1, sink.fileno()))
        stack.enter_context(_redirect_fd(2, sink.fileno()))
        logging.disable(logging.CRITICAL)
        try:
            yield captured
        finally:
            logging.disable(previous_disable)
            if hasattr(torch._C, "_jit_set_onnx_log_enabled"):
                torch._C._jit_set_onnx_log_enabled(onnx_log)
            sink.flush()
            sink.seek(0)
            captured.append(sink.read())


def _short(exc: BaseException, limit: int = 160) -> str:
    """One line naming the error; torch.onnx buries the cause under '## Exception summary'."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    name, text = type(exc).__name__, (lines[0] if lines else "")
    match = _CLASS_LINE.match(text)
    if match:  # "<class 'torch._dynamo.exc.UserError'>: ..." -> "UserError: ..."
        name, text = match.groups()
    msg = f"{name}: {text}" if text else name
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _weight_bytes(model: nn.Module) -> int:
    # named_parameters/named_buffers skip tied tensors, so shared weights count once.
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _batch_dim(proto: onnx.ModelProto) -> onnx.TensorShapeProto.Dimension | None:
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME] or list(proto.graph.input[:1])
    if not inputs or not inputs[0].type.tensor_type.shape.dim:
        return None
    return inputs[0].type.tensor_type.shape.dim[0]


def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _file_bytes(path: Path, proto: onnx.ModelProto) -> int:
    """Size of the .onnx file plus the external data files its initializers point to."""
    locations = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file()
    )


def input_names(n: int) -> list[str]:
    """ONNX input names: ``input`` for a model of one input, ``input_0``, ``input_1``... for several."""
    return [INPUT_NAME] if n == 1 else [f"{INPUT_NAME}_{i}" for i in range(n)]


def _export_dynamo(model: nn.Module, xs: tuple[torch.Tensor, ...], path: Path, opset: int | None,
                   external: bool) -> None:
    # min=1: batch 1 is a valid size even though the example has batch >= 2.
    batch = torch.export.Dim(BATCH_DIM, min=1)
    torch.onnx.export(
        model,
        xs,
        str(path),
        dynamo=True,
        input_names=input_names(len(xs)),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=tuple({0: batch} for _ in xs),
        opset_version=opset,
        external_data=external,
        verbose=False,
    )


def _export_torchscript(model: nn.Module, xs: tuple[torch.Tensor, ...], path: Path, opset: int | None,
                       external: bool) -> None:
    # The TorchScript exporter switches to external data by itself once the proto would
    # pass 2 GiB (it needs a file path for that, hence str(path)); `external` is unused.
    del external
    names = input_names(len(xs))
    torch.onnx.export(
        model,
        xs,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=[OUTPUT_NAME],
        dynamic_axes={**{n: {0: BATCH_DIM} for n in names}, OUTPUT_NAME: {0: BATCH_DIM}},
        opset_version=opset,
        verbose=False,
    )




def onnx_metadata(input_size: Sequence[int], io: dict[str, Any] | None = None,
                  recipe: dict[str, Any] | None = None) -> dict[str, str]:
    """What a deployment needs besides the graph, as ONNX metadata_props (``surgery.*`` keys, JSON values).

    ``recipe_sha256`` hashes the recipe's architecture (format, source, input size, passes:
    canonical JSON), so a file can be matched with the artifact it came from.
    """
    meta = {"input_size": json.dumps(as_json(input_size))}
    for key in ("preprocess", "classes"):
        if (io or {}).get(key):
            meta[key] = json.dumps(io[key])
    if recipe is not None:
        arch = {k: recipe[k] for k in ("format", "source", "input_size", "passes") if k in recipe}
        meta["recipe_sha256"] = json.dumps(hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest())
    return {META_PREFIX + k: v for k, v in meta.items()}


def _finish(path: Path, exporter: str, metadata: dict[str, str] | None = None) -> None:
    """Stamp the exporter (and ``metadata``) into the file, insist on a symbolic batch dim, run the checker."""
    # Without external data: stamping only rewrites the graph file, weights stay put.
    proto = onnx.load(str(path), load_external_data=False)
    dim = _batch_dim(proto)
    if dim is None or not dim.HasField("dim_param"):
        fixed = "missing" if dim is None else dim.dim_value
        raise RuntimeError(f"the batch dimension of the first input came out fixed ({fixed})")
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, EXPORTER_KEY: exporter,
                                        **(metadata or {})})
    onnx.save(proto, str(path))
    # With a path (not a proto) the checker also handles external data and >2 GiB models.
    onnx.checker.check_model(str(path), full_check=True)


# --- public API --------------------------------------------------------------------------


def select_providers() -> list[str]:
    """ORT execution providers to use: CUDA first only when a GPU is really usable."""
    import onnxruntime as ort

    # onnxruntime-gpu lists CUDA (and TensorRT) whether or not a GPU or the CUDA libraries
    # exist; asking for them then only yields load errors and a silent CPU fallback.
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis and return the checked file's path.

    Tries the dynamo exporter, then the TorchScript exporter. The model is exported in
    eval mode on CPU; its mode and device are restored afterwards. Input and output are
    named ``input`` and ``output`` (several inputs: ``input_0``, ``input_1``...).
    """
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"{path} is a folder; give a file name such as {path / 'model.onnx'}")
    check_parent(path, "ONNX file")
    xs = as_tuple(example_input)
    for t in xs:
        if t.dim() == 0 or t.shape[0] == 0:
            raise SurgeryError(f"example input of shape {tuple(t.shape)} has no batch; give a (batch, C, H, W) tensor")
    # torch.export specialises sizes 0 and 1 to constants; with a batch-1 example some
    # models (convnext) then fail to export with a dynamic batch at all.
    xs = tuple(t.detach().to("cpu") if t.shape[0] > 1 else t.detach().to("cpu").expand(2, *t.shape[1:]).contiguous()
               for t in xs)
    external = _weight_bytes(model) >= SINGLE_FILE_LIMIT

    was_training, device = model.training, _device(model)
    model.eval().to("cpu")
    errors: list[str] = []
    start = time.perf_counter()
    try:
        # Beside the target under a temporary name: a failed export leaves an existing file as it was.
        with atomic_file(path) as tmp:
            for exporter, fn in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
                for leftover in tmp.parent.iterdir():  # a failed attempt's files must not ship
                    leftover.unlink()
                try:
                    with _quiet() as chatter:
                        fn(model, xs, tmp, opset, external)
                        _finish(tmp, exporter, metadata)
                except Exception as exc:  # noqa: BLE001 - any failure means: try the next exporter
                    log.info("%s exporter failed: %s", exporter, _short(exc, 2000))
                    log.debug("%s exporter output:\n%s", exporter, "".join(chatter))
                    errors.append(f"{exporter} exporter: {_short(exc)}")
                    continue
                log.info("exported with the %s exporter in %.1fs", exporter, time.perf_counter() - start)
                break
            else:
                raise SurgeryError(
                    f"cannot export {type(model).__name__} to ONNX ({'; '.join(errors)}); "
                    "replace or simplify the part of the model these errors name"
                )
    finally:
        model.train(was_training).to(device)
    return path


def export_verified(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], **verify: Any) -> dict[str, Any]:
    """Export and verify (checker, parity, latency); ``path`` is replaced only if all of it passed."""
    path = Path(path)
    with atomic_file(path) as tmp:
        result = export_and_verify(model, tmp, input_shape, **verify)
    result["path"] = str(path)
    return result


def export_and_verify(model: nn.Module, path: Path, input_shape: tuple[int, ...], *, opset: int | None = None,
                      metadata: dict[str, str] | None = None, **verify: Any) -> dict[str, Any]:
    """Export to ``path`` and verify it (checker, parity, latency), one progress bar over the steps."""
    with Steps("onnx", 1 + len(VERIFY_STEPS)) as progress:
        with progress.step("export"):
            export_onnx(model, random_inputs(input_shape, 1, 0), path, opset=opset, metadata=metadata)
        return verify_onnx(model, path, input_shape, progress=progress, **verify)


def onnx_session(path: str | Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the providers from :func:`select_providers`."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path} does not exist; export the model first")
    options = ort.SessionOptions()
    # Errors and fatals only: provider probing and optimizer notes are noise to a CLI user.
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=select_providers())


def _parity(
    model: nn.Module,
    session: onnxruntime.InferenceSession,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    rtol: float,
    seed: int,
    atol: float = 0.0,
) -> dict[str, Any]:
    """Max |torch - onnxruntime| per batch size; a batch fails past atol + rtol * max|torch output|."""
    names = [i.name for i in session.get_inputs()]
    generator = torch.Generator().manual_seed(seed)
    device, was_training = _device(model), model.training
    abs_diff: dict[str, float] = {}
    rel_diff: dict[str, float] = {}
    scales: dict[str, float] = {}
    model.eval()
    try:
        for batch in batch_sizes:
            xs = as_tuple(random_inputs(input_shape, batch, generator))
            if len(xs) != len(names):
                raise ParityError(f"the ONNX file takes {len(names)} input(s) where the model takes {len(xs)}; "
                                  "re-export the model")
            with torch.no_grad():
                expected = [t.float().cpu().numpy() for t in output_tensors(model(*(x.to(device) for x in xs)))]
            got = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
            shapes = [e.shape for e in expected], [g.shape for g in got]
            if shapes[0] != shapes[1]:
                raise ParityError(
                    f"ONNX outputs have shapes {shapes[1]} where torch gives {shapes[0]} "
                    f"at batch {batch}; re-export the model"
                )
            diff = max((float(np.abs(e - g).max()) for e, g in zip(expected, got) if e.size), default=0.0)
            scale = max((float(np.abs(e).max()) for e in expected if e.size), default=0.0)
            abs_diff[str(batch)] = diff
            scales[str(batch)] = scale
            rel_diff[str(batch)] = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    finally:
        model.train(was_training)
    report: dict[str, Any] = {
        "batch_sizes": list(batch_sizes),
        "max_abs_diff": abs_diff,
        "max_rel_diff": rel_diff,
        "rtol": rtol,
        "atol": atol,
        "ok": True,
    }
    # `not <=` so that NaN counts as a failure.
    bad = [b for b, d in abs_diff.items() if not d <= atol + rtol * scales[b]]
    if bad:
        report["ok"] = False
        numbers = ", ".join(f"batch {b}: max abs diff {abs_diff[b]:.3g}, relative {rel_diff[b]:.3g}" for b in rel_diff)
        limit = f"rtol {rtol:g}" + (f" + atol {atol:g}" if atol else "")
        raise ParityError(
            f"ONNX output differs from torch beyond {limit} ({numbers}); "
            "the model changed after export or the exporter mistranslated it",
            report,
        )
    return report


def check_parity(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int] = (1, 4),
    rtol: float = 1e-4,
    atol: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ONNX Runtime with torch on seeded random inputs of shape ``(batch, *input_shape)``.

    The relative difference is max |torch - onnx| over max |torch|. Raises
    :class:`ParityError` when max |torch - onnx| exceeds ``atol + rtol * max |torch|`` at any batch size.
    """
    return _parity(model, onnx_session(path), input_shape, batch_sizes, rtol, seed, atol)


def _median_ms(fn: Any, warmup: int, runs: int) -> float:
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _ort_latency_ms(
    session: onnxruntime.InferenceSession,
    input_shape: Sequence[int],
    batch_size: int,
    warmup: int,
    runs: int,
) -> float:
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal((batch_size, *shape), dtype=np.float32)
            for i, shape in zip(session.get_inputs(), sample_shapes(input_shape))}
    return _median_ms(lambda: session.run(None, feed), warmup, runs)


def onnx_latency_ms(
    path: str | Path,
    input_shape: tuple[int, ...],
    batch_size: int,
    *,
    warmup: int = 3,
    runs: int = 10,
) -> float:
    """Median milliseconds of one ONNX Runtime ``session.run`` (after ``warmup`` runs)."""
    return _ort_latency_ms(onnx_session(path), input_shape, batch_size, warmup, runs)


def _torch_latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int, warmup: int, runs: int) -> float:
    device, was_training = _device(model), model.training
    xs = tuple(x.to(device) for x in as_tuple(random_inputs(input_shape, batch_size, 0)))

    def step() -> None:
        model(*xs)
        if device.type == "cuda":  # kernels are asynchronous; time their completion
            torch.cuda.synchronize(device)

    model.eval()
    try:
        with torch.inference_mode():
            return _median_ms(step, warmup, runs)
    finally:
        model.train(was_training)


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int] = (1, 4),
    rtol: float = 1e-4,
    atol: float = 0.0,
    progress: Steps | None = None,
) -> dict[str, Any]:
    """Checker, parity and batch-1 latency (ONNX Runtime vs torch) as a JSON-able dict.

    ``progress``: the caller's bar (export_verified's), else one of its own.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"{path} does not exist; export the model first")
    with contextlib.nullcontext(progress) if progress is not None else Steps("onnx", len(VERIFY_STEPS)) as steps:
        # The checker before the session: it names what is wrong with a damaged file.
        with steps.step(VERIFY_STEPS[0]):
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise SurgeryError(f"{path} is not a valid ONNX model ({_short(exc)}); re-export it") from exc
            proto = onnx.load(str(path), load_external_data=False)
            session = onnx_session(path)
        with steps.step(VERIFY_STEPS[1]):
            parity = _parity(model, session, input_shape, batch_sizes, rtol, seed=0, atol=atol)
        with steps.step(VERIFY_STEPS[2]):
            latency = {"onnxruntime": _ort_latency_ms(session, input_shape, 1, warmup=3, runs=10),
                       "torch": _torch_latency_ms(model, input_shape, 1, warmup=3, runs=10)}
    return {
        "path": str(path),
        "bytes": _file_bytes(path, proto),
        "exporter": {p.key: p.value for p in proto.metadata_props}.get(EXPORTER_KEY, "unknown"),
        "opset": _opset(proto),
        "providers": session.get_providers(),
        "parity": parity,
        "latency_ms": latency,
    }
