"""Dataset entropy as EBCLE defines it (Gowdra et al. 2021, from the authors' code).

For each image: the Shannon entropy of the histogram of its raw 8-bit pixel values, all
channels pooled, in nats. The data set's figure is the mean over its images (max ln 256).
Files the loader skips (corrupt, decompression bombs, links out of the class folder; see
``surgery.data``) are left out of the mean and counted in ``EntropyStats.skipped``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError
from .safeio import atomic_file

MAX_NATS = math.log(256)


def image_entropy(image: np.ndarray, *, base: float = math.e) -> float:
    """Entropy of one uint8 image's pixel-value histogram (all channels pooled)."""
    if image.dtype != np.uint8:
        raise SurgeryError(f"entropy needs raw 8-bit pixels, got {image.dtype}; compute it before normalisation")
    counts = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return h / math.log(base) if base != math.e else h


@dataclass
class EntropyStats:
    """Mean (the EBCLE figure), spread and per-image values of a data set's entropy."""

    data: str
    unit: str
    images: int
    mean: float
    std: float
    min: float
    max: float
    values: list[float] = field(repr=False, default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files or links left out

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_values:
            d.pop("values")
        return d


def dataset_entropy(spec: str, *, bits: bool = False, progress: bool = False,
                    images: Iterable[np.ndarray] | None = None) -> EntropyStats:
    """Stream the raw images of ``spec`` (digits or an ImageFolder) and summarise their entropy."""
    from .data import SkipReport, raw_images

    base = 2.0 if bits else math.e
    report = SkipReport(spec)
    source = images if images is not None else raw_images(spec, report=report)
    if progress:
        from .progress import bar

        source = bar(source, "entropy", unit="img")
    values = np.fromiter((image_entropy(img, base=base) for img in source), dtype=np.float64)
    if values.size == 0:
        raise SurgeryError(f"no readable image in {report.summary() or spec}")
    return EntropyStats(spec, "bits" if bits else "nats", int(values.size), float(values.mean()),
                        float(values.std()), float(values.min()), float(values.max()), values.tolist(),
                        report.to_dict())


def plot_histogram(stats: EntropyStats, path: str | Path) -> Path:
    """A PNG of the per-image entropy distribution, with the mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(stats.values, bins=40, color="#4c72b0")
    ax.axvline(stats.mean, color="#c44e52", label=f"mean {stats.mean:.3f} {stats.unit}")
    top = MAX_NATS if stats.unit == "nats" else 8.0
    ax.set_xlim(0, top)
    ax.set_xlabel(f"per-image pixel entropy ({stats.unit}; max {top:.2f})")
    ax.set_ylabel("images")
    ax.set_title(f"{stats.data}: {stats.images} images")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:  # never through a link, never a half-written file
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
