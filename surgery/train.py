"""One training loop for `train` (from scratch) and `finetune` (after surgery, optionally distilled).

CUDA when available (autocast, channels_last, optional torch.compile), CPU otherwise;
several processes through torchrun (DDP: NCCL on GPU, Gloo on CPU). The data order is a
function of (seed, epoch) and every random draw of a step (augmentation, dropout) of
(seed, epoch, batch), so a run resumed from any checkpoint, even one taken mid-epoch,
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CHECKPOINT_DIR,
    STATE_FILE,
    RunState,
    check_same_run,
    data_identity,
    load_checkpoint,
    model_identity,
    read_checkpoint,
    save_checkpoint,
)
from .data import ImageData, make_loader
from .errors import Interrupted, SurgeryError
from .progress import bar
from .progress import enabled as progress_enabled
from .validate import ValidationError

if TYPE_CHECKING:
    from .schedule import ProgressiveResize

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``lr``/``weight_decay`` None: a default per optimizer."""

    epochs: int = 10
    max_steps: int | None = None  # a step budget: stop after this many optimizer steps
    batch_size: int = 64  # global: split over the processes of a DDP run
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    distill_weight: float = 0.5  # share of the KL term when a teacher is given
    distill_temperature: float = 4.0
    clip_grad: float | None = None  # largest global gradient norm per step; None: no clipping
    seed: int = 0
    amp: bool | None = None  # None: on with CUDA
    channels_last: bool | None = None  # None: on with CUDA
    compile: bool = False
    deterministic: bool = False
    workers: int | None = None  # DataLoader processes; None: surgery.data.default_workers
    device: str | None = None  # "cpu", "cuda", "cuda:N"; None: CUDA when available
    progress: bool = True

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05


def run_config(cfg: TrainConfig, *, amp: bool, channels_last: bool, processes: int = 1,
               schedule: ProgressiveResize | None = None) -> dict[str, Any]:
    """The options that shape the math, resolved for this run (defaults filled in).

    Not ``progress``, nor ``device`` (its effect on the math is in ``amp`` and
    ``channels_last``), nor ``workers``: like its default (which follows the machine's cores),
    it decides which process draws which augmentation, so runs are bit-identical at equal workers.
    """
    out = asdict(cfg)
    del out["progress"], out["device"], out["workers"]
    out.update(lr=cfg.resolved_lr(), weight_decay=cfg.resolved_weight_decay(), amp=amp,
               channels_last=channels_last, processes=processes, schedule=_schedule_text(schedule))
    return out


def _schedule_text(schedule: Any) -> str:
    if schedule is None:
        return "none"
    args = ", ".join(f"{f.name}={getattr(schedule, f.name)}" for f in fields(schedule) if f.init)
    return f"{type(schedule).__name__}({args})"


# --- processes and devices ---------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def pick_device(d: Dist, requested: str | None = None) -> torch.device:
    """``requested`` (cpu, cuda, cuda:N) if this machine has it; else CUDA when there is a GPU."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise SurgeryError(f"--device {requested!r} is not a device; give cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SurgeryError(f"--device {requested}: this machine has no CUDA device; use --device cpu")
            index = device.index if device.index is not None else d.local_rank
            if index >= torch.cuda.device_count():
                raise SurgeryError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) here")
            return torch.device("cuda", index)
        if device.type != "cpu":
            raise SurgeryError(f"--device {requested}: surgery trains on cpu or cuda")
        return device
    return torch.device("cuda", d.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _amp_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --- schedule and losses --------------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``base * min_ratio``: a pure function of the step."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by ``temperature``, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No decay on norms and biases: the usual recipe, and it keeps BN scales meaningful.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.resolved_weight_decay())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.resolved_lr(), momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.resolved_lr())


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData | Any, *, batch_size: int = 256, device: torch.device | None = None,
             d: Dist | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy on the val split (sharded over DDP ranks)."""
    d = d or Dist()
    device = device or next(model.parameters()).device
    dataset = data.val if isinstance(data, ImageData) else data
    if d.world > 1:
        dataset = torch.utils.data.Subset(dataset, range(d.rank, len(dataset), d.world))
    loader = make_loader(dataset, batch_size, train=False)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in bar(loader, "evaluate", unit="batch") if d.main else loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                               hit.any(1).sum().double(), torch.tensor(float(len(y)), device=device).double()])
    if d.world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    n = max(1.0, totals[3].item())
    return {"val_loss": totals[0].item() / n, "val_top1": totals[1].item() / n, "val_top5": totals[2].item() / n,
            "val_images": int(totals[3].item())}


def check_head(model: nn.Module, data: ImageData, input_size: tuple[int, ...]) -> None:
    """The model's output count must equal the data's class count; say how to fix it."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    if out.shape[-1] != data.num_classes:
        raise SurgeryError(
            f"the model has {out.shape[-1]} outputs but {data.name} has {data.num_classes} classes; "
            f"build it with --num-classes {data.num_classes}, or give an artifact a new head with "
            f"`surgery apply DIR --pass head:num_classes={data.num_classes}`"
        )


# --- the loop ---------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _point_seed(seed: int, epoch: int, batch: int, rank: int, what: str) -> int:
    """A seed for one point of a run: the random state there depends on the position, not on the path to it."""
    key = f"{seed}/{epoch}/{batch}/{rank}/{what}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class _ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without saving (the state may be mid-step)."""


class _StopRequested(Exception):
    """Ctrl-C was pressed: raised at the next batch boundary, where the state is whole."""


class _CtrlC:
    """The first Ctrl-C asks the loop to stop at the next batch boundary; a second stops at once.

    A KeyboardInterrupt raised anywhere (mid optimizer step, mid BatchNorm update) could leave
    a state that no checkpoint should hold. While a checkpoint is written, Ctrl-C only asks.
    """

    def __init__(self) -> None:
        self.requested = self.saving = self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and not self.saving:
            raise _ForcedStop
        self.requested = True
        log.info("Ctrl-C: stopping after this batch and saving a checkpoint (Ctrl-C again: stop at once)")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


def _all_agree(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when any rank says so: DDP ranks must stop at the same batch."""
    if d.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _interrupted(state: RunState, ckpt_dir: Path | None, *, saved: bool) -> str:
    head = f"interrupted at epoch {state.epoch + 1}, step {state.step}"
    if ckpt_dir is None:
        return f"{head}; nothing was saved (no --out)"
    if saved:
        return f"{head}; checkpoint saved in {ckpt_dir}, continue with --resume"
    if (ckpt_dir / STATE_FILE).is_file():
        return f"{head}, at once (not saved); the last checkpoint in {ckpt_dir} is intact, continue with --resume"
    return f"{head}, at once; no checkpoint was saved yet"


def fit(
    model: nn.Module,
    data: ImageData,
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    resume_anyway: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    schedule: ProgressiveResize | None = None,
    model_info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``data``; returns the per-epoch history.

    With ``out_dir`` a checkpoint is written after every epoch (and on Ctrl-C) to
    ``out_dir/checkpoint``, rank 0 only; ``resume`` continues from it exactly. A checkpoint
    of another model or data is refused, one of other options too unless ``resume_anyway``;
    ``model_info`` ({"source", "passes"}) joins the model's identity. Ctrl-C stops at the
    next batch, saves, and raises :class:`Interrupted`.
    A ``schedule`` (surgery.schedule.ProgressiveResize) trains a shrunk copy at low
    resolution first and switches to ``model`` at full size at an epoch boundary.
    """
    d = setup_distributed()
    device = pick_device(d, cfg.device)
    use_cuda = device.type == "cuda"
    amp = cfg.amp if cfg.amp is not None else use_cuda
    channels_last = cfg.channels_last if cfg.channels_last is not None else use_cuda
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)
    if cfg.batch_size % d.world:
        raise SurgeryError(f"--batch-size {cfg.batch_size} must divide by the {d.world} processes")
    per_rank_batch = cfg.batch_size // d.world

    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    identity = {"config": run_config(cfg, amp=amp, channels_last=channels_last, processes=d.world, schedule=schedule),
                "model": model_identity(model, model_info), "data": data_identity(data)}
    saved = None
    if (resume or resume_anyway) and ckpt_dir is not None:
        if d.main:
            from .safeio import recover

            recover(ckpt_dir)  # what a save killed mid-way left
        if d.world > 1:
            dist.barrier()
        saved = read_checkpoint(ckpt_dir)
        check_same_run(ckpt_dir, saved, identity, resume_anyway=resume_anyway)
    # What trains now (net on net_data): ``model`` itself, or a schedule's shrunk copy until the switch.
    net, net_data = model, data
    if schedule is not None:
        net, net_data = schedule.begin(model, data, start_epoch=saved["state"]["epoch"] if saved else 0)

    def place(m: nn.Module) -> nn.Module:
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)
        return m

    def wrap(m: nn.Module) -> nn.Module:
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            m = DDP(m, device_ids=[d.local_rank] if use_cuda else None)
        return torch.compile(m) if cfg.compile else m

    place(model)
    place(net)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = make_optimizer(net, cfg)
    state = load_checkpoint(ckpt_dir, saved, net, optimizer) if saved is not None and ckpt_dir else RunState()
    if saved is not None and d.main:
        log.info("resuming after epoch %d, step %d", state.epoch, state.step)
    train_model = wrap(net)

    steps_per_epoch = len(make_loader(data.train, per_rank_batch, train=True, rank=d.rank, world=d.world))
    if state.batches_in_epoch > steps_per_epoch:
        raise ValidationError(f"{ckpt_dir / STATE_FILE if ckpt_dir else STATE_FILE}: $.state.batches_in_epoch",
                              f"{state.batches_in_epoch} is more than the {steps_per_epoch} batches of an epoch; "
                              "start without --resume")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    base_lr = cfg.resolved_lr()
    scaler = torch.amp.GradScaler("cuda", enabled=amp and use_cuda and _amp_dtype() == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=_amp_dtype())) if amp and use_cuda else nullcontext
    ctrl_c = _CtrlC()
    mid_step = False  # weights, BatchNorm statistics or counters are changing: no checkpoint now

    def checkpoint() -> None:
        if ckpt_dir is not None and d.main:
            with ctrl_c.deferred():
                save_checkpoint(ckpt_dir, net, optimizer, state, identity)

    with ctrl_c:
        try:
            for epoch in range(state.epoch, cfg.epochs):
                if state.step >= total_steps:
                    break
                loader = make_loader(net_data.train, per_rank_batch, train=True, seed=cfg.seed, epoch=epoch,
                                     rank=d.rank, world=d.world, workers=cfg.workers)
                train_model.train()
                if not state.batches_in_epoch:
                    state.partial = {"loss": 0.0, "correct": 0.0, "n": 0.0, "distill": 0.0, "lr": None}
                sums = state.partial
                t0, seen = time.perf_counter(), 0
                bar = _progress(loader, epoch, cfg, d)
                # Every draw is seeded from its position (epoch, batch): a run resumed at any batch
                # boundary, skipping what it already did, draws exactly what the uninterrupted run drew.
                seed_everything(_point_seed(cfg.seed, epoch, 0, d.rank, "fetch"))
                for i, (x, y) in enumerate(bar):
                    if i >= state.batches_in_epoch:  # else trained on before an interruption: skipped
                        if state.step >= total_steps:
                            break
                        if _all_agree(ctrl_c.requested, d, device):
                            raise _StopRequested
                        seed_everything(_point_seed(cfg.seed, epoch, i, d.rank, "step"))  # dropout, drop-path
                        mid_step = True
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        lr = lr_at(state.step, total_steps, warmup, base_lr, cfg.min_lr_ratio)
                        for g in optimizer.param_groups:
                            g["lr"] = lr
                        with autocast():
                            logits = train_model(x)
                            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                            if teacher is not None:
                                with torch.no_grad():
                                    t_logits = teacher(schedule.teacher_input(x) if schedule else x).float()
                                kd = distill_loss(logits.float(), t_logits, cfg.distill_temperature)
                                loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
                                sums["distill"] += kd.item() * len(y)
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        if cfg.clip_grad:
                            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                            torch.nn.utils.clip_grad_norm_(
                                [p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
                        scaler.step(optimizer)
                        scaler.update()
                        state.step += 1
                        state.batches_in_epoch = i + 1
                        sums["loss"] += loss.item() * len(y)
                        sums["correct"] += (logits.argmax(1) == y).sum().item()
                        sums["n"] += len(y)
                        sums["lr"] = lr
                        mid_step = False
                        seen += len(y) * d.world
                        if hasattr(bar, "set_postfix"):
                            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}",
                                            acc=f"{sums['correct'] / sums['n']:.3f}",
                                            img_s=f"{seen / (time.perf_counter() - t0):.0f}", lr=f"{lr:.2e}")
                    # The next batch's augmentation is drawn while fetching it.
                    seed_everything(_point_seed(cfg.seed, epoch, i + 1, d.rank, "fetch"))
                mid_step = True
                seconds = time.perf_counter() - t0
                n = max(1.0, sums["n"])
                record = {"epoch": epoch + 1, "step": state.step, "lr": sums["lr"],
                          "train_loss": sums["loss"] / n, "train_acc": sums["correct"] / n,
                          "images_per_s": seen / max(seconds, 1e-9), "seconds": seconds}
                if teacher is not None:
                    record["distill_loss"] = sums["distill"] / n
                record.update(evaluate(net, net_data, batch_size=max(per_rank_batch, 64), device=device, d=d))
                if schedule is not None:
                    record.update(schedule.record(epoch))
                state.history.append(record)
                state.epoch, state.batches_in_epoch, state.partial = epoch + 1, 0, {}
                if schedule is not None and schedule.switch_due(state.epoch):
                    # Before the checkpoint: one saved after the switch epoch holds the full-size model.
                    net, net_data, optimizer = schedule.switch(net, model, data, optimizer,
                                                               lambda m: make_optimizer(m, cfg))
                    train_model = wrap(place(net))
                mid_step = False
                if d.main:
                    log.info("epoch %d/%d  loss %.4f  acc %.3f  | val top1 %.4f top5 %.4f loss %.4f | %.0f img/s  "
                             "%.1fs", epoch + 1, cfg.epochs, record["train_loss"], record["train_acc"],
                             record["val_top1"], record["val_top5"], record["val_loss"], record["images_per_s"],
                             seconds)
                checkpoint()
                if on_epoch is not None:
                    on_epoch(record)
                finished = state.epoch >= cfg.epochs or state.step >= total_steps
                if _all_agree(ctrl_c.requested, d, device) and not finished:  # a finished run just ends
                    raise Interrupted(_interrupted(state, ckpt_dir, saved=True))
        except _StopRequested:
            checkpoint()
            raise Interrupted(_interrupted(state, ckpt_dir, saved=True)) from None
        except _ForcedStop:
            raise Interrupted(_interrupted(state, ckpt_dir, saved=False)) from None
        except KeyboardInterrupt:  # from a callback, or where no handler could be installed
            if not mid_step:
                checkpoint()
            raise Interrupted(_interrupted(state, ckpt_dir, saved=not mid_step)) from None
    if schedule is not None:
        schedule.finish(net, model)
    model.eval()
    return state.history


def _progress(loader, epoch: int, cfg: TrainConfig, d: Dist):
    if not (cfg.progress and d.main and progress_enabled()):
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True, unit="batch")


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
