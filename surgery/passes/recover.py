"""Pass `recover`: fit the layers the passes before it rewrote to the source model's activations.

The passes of one run declare what each rewritten layer or block should compute (their
``ctx.fits``); the pipeline composes them against its input graph. This pass runs
:func:`surgery.recover.recover` on all of them at once: the same as ``recover=on`` on
each pass, but after the whole chain (``prune -> bilinear -> recover`` fits each layer
once, against the original). On an artifact, ``source=`` names the model it was made
from: the artifact's recorded passes are replayed on it to know what to align. The
weights it fits are saved with the artifact; replay (``surgery.load``) has nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .. import recover as engine
from ..errors import SurgeryError
from . import PassContext, register


@dataclass
class RecoverConfig:
    """Fit rewritten layers to the original's activations on calibration images (no training)."""

    data: str | None = field(default=None, metadata={
        "doc": "calibration images: digits or an ImageFolder path (default: the run's --data)"})
    calib: int = field(default=256, metadata={"doc": "calibration images to use from data"})
    rows: int = field(default=engine.Options.rows, metadata={
        "doc": "sampled rows (pixels, tokens) per layer for the least-squares fits"})
    ridge: float = field(default=engine.Options.ridge, metadata={
        "doc": "ridge of the least squares, relative to the mean input energy"})
    sweeps: int = field(default=engine.Options.sweeps, metadata={"doc": "alternating least-squares sweeps (bilinear)"})
    steps: int = field(default=engine.Options.steps, metadata={"doc": "Adam steps per distilled block"})
    lr: float = field(default=engine.Options.lr, metadata={"doc": "learning rate of the distillation"})
    seed: int = field(default=0, metadata={"doc": "seed of calibration sampling"})
    source: str | None = field(default=None, metadata={
        "doc": "applied to an artifact: the model it was made from (an artifact folder or a model spec with its "
               "weights); its recorded passes are replayed on it to know what to align"})

    def validate(self) -> None:
        for name in ("calib", "rows", "sweeps", "steps"):
            if getattr(self, name) < 1:
                raise SurgeryError(f"recover:{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ridge < 1e3 or not 0.0 < self.lr <= 1.0:
            raise SurgeryError(f"recover: ridge must be in [0, 1000) and lr in (0, 1], got {self.ridge}, {self.lr}")


@register("recover", RecoverConfig)
def recover(gm: fx.GraphModule, cfg: RecoverConfig, ctx: PassContext) -> fx.GraphModule:
    """Fit every layer the earlier passes of this run rewrote; the architecture stays as it is."""
    if ctx.replay:
        return gm
    if ctx.source is None or not ctx.lineage:
        ctx.reason = ("nothing to align: no pass before it in this run rewrote a layer it can fit (put recover "
                      "after prune, bilinear or ebcle in the same run, or give source= the model an artifact was "
                      "made from; after rescale it starts afresh)")
        return gm
    opts = engine.Options(rows=cfg.rows, ridge=cfg.ridge, sweeps=cfg.sweeps, steps=cfg.steps, lr=cfg.lr)
    engine.run(ctx.source, gm, ctx.lineage, ctx, cfg.data, cfg.calib, cfg.seed, "recover", opts)
    return gm
