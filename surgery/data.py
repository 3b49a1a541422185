"""Image data sets: the built-in `digits` set and any ImageFolder, with standard transforms.

`digits` is scikit-learn's handwritten digits (1797 images of 8x8, 10 classes), shipped
inside the scikit-learn wheel, so tests and demos need no download. Every data set also
gives raw 8-bit images (before any normalisation), which the EBCLE entropy needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import SurgeryError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = ("digits",)


@dataclass
class ImageData:
    """A train/val pair of data sets that yield (normalised CHW float tensor, class index)."""

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _seeded_split(n: int, val_fraction: float, seed: int, labels: list[int] | None = None):
    """Stratified when labels are given, so small sets keep every class on both sides."""
    g = np.random.default_rng(seed)
    if labels is None:
        order = g.permutation(n)
        n_val = max(1, round(n * val_fraction))
        return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
    labels_arr = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels_arr):
        idx = g.permutation(np.flatnonzero(labels_arr == c))
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def transforms(image_size: int, *, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip: bool = True):
    """Resize + (random crop with padding, optional flip) + normalise. Works on PIL or uint8 tensors."""
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train:
        steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="edge"))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class TensorImages(Dataset):
    """In-memory uint8 images (N, C, H, W) with labels, transformed on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def digits_uint8(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as RGB uint8 (N, 3, S, S): 0..16 ink scaled to 0..255, resized bilinearly."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.from_numpy(d.images).float().mul_(255.0 / 16.0)[:, None]  # (N, 1, 8, 8)
    big = torch.nn.functional.interpolate(small, size=(image_size, image_size), mode="bilinear",
                                          align_corners=False)
    images = big.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(d.target).long()


class SafeImageFolder(Dataset):
    """ImageFolder that skips unreadable images (counted, warned) instead of crashing mid-epoch."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], transform=None):
        self.root, self.classes, self.samples, self.transform = root, classes, samples, transform
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        with open(self.samples[i][0], "rb") as f:
            return Image.open(f).convert("RGB")

    def __getitem__(self, i: int):
        for step in range(len(self.samples)):
            j = (i + step) % len(self.samples)
            if j in self.bad:
                continue
            try:
                img = self.load(j)
            except (OSError, ValueError, SyntaxError) as exc:
                self.bad.add(j)
                log.warning("skipping unreadable image %s (%s); %d skipped so far",
                            self.samples[j][0], type(exc).__name__, len(self.bad))
                continue
            return (self.transform(img) if self.transform else img), self.samples[j][1]
        raise SurgeryError(f"no readable image in {self.root}")


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], int]:
    """Class folders and (path, class) samples; files that PIL cannot even identify are dropped."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SurgeryError(f"{root} has no class folders; expected {root}/CLASS_NAME/image.jpg (ImageFolder)")
    samples, unreadable = [], 0
    for idx, cls in enumerate(classes):
        for dirpath, _, files in os.walk(root / cls, followlinks=True):
            for name in sorted(files):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with Image.open(path) as im:  # reads the header only
                        im.size  # noqa: B018
                except (OSError, ValueError, SyntaxError):
                    unreadable += 1
                    continue
                samples.append((path, idx))
    if not samples:
        raise SurgeryError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples, unreadable


def _folder_splits(root: Path, val_fraction: float, seed: int):
    if (root / "train").is_dir():
        classes, train, bad = _scan_folder(root / "train")
        val_root = next((root / n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
        if val_root is not None:
            val_classes, val, bad_val = _scan_folder(val_root)
            if val_classes != classes:
                raise SurgeryError(f"{root}/train and {val_root} have different class folders")
            return classes, train, val, bad + bad_val
        root_samples, bad_total = train, bad
    else:
        classes, root_samples, bad_total = _scan_folder(root)
    tr, va = _seeded_split(len(root_samples), val_fraction, seed, [c for _, c in root_samples])
    return classes, [root_samples[i] for i in tr], [root_samples[i] for i in va], bad_total


def load_data(
    spec: str,
    *,
    image_size: int = 32,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    val_fraction: float = 0.2,
    seed: int = 0,
    hflip: bool | None = None,
    limit: int | None = None,
) -> ImageData:
    """`digits` or an ImageFolder path (train/ + val/ subfolders, or one folder split by ``seed``).

    ``hflip`` defaults to on for folders and off for digits (a mirrored 2 is not a 2).
    ``limit`` keeps the first N training images (stratified order), for quick runs and tests.
    """
    if spec == "digits":
        images, labels = digits_uint8(image_size)
        tr, va = _seeded_split(len(labels), val_fraction, seed, labels.tolist())
        flip = bool(hflip)
        train = TensorImages(images[tr], labels[tr], transforms(image_size, train=True, mean=mean, std=std,
                                                                  hflip=flip))
        val = TensorImages(images[va], labels[va], transforms(image_size, train=False, mean=mean, std=std))
        data = ImageData("digits", train, val, [str(i) for i in range(10)], image_size)
    else:
        root = Path(spec)
        if not root.exists():
            hint = f" (built-in: {', '.join(BUILTIN)})" if "/" not in spec else ""
            raise SurgeryError(f"data {spec!r} not found; give an ImageFolder path{hint}")
        if not root.is_dir():
            raise SurgeryError(f"data {spec!r} is a file; give a folder with one subfolder per class")
        classes, tr_samples, va_samples, bad = _folder_splits(root, val_fraction, seed)
        if bad:
            log.warning("skipped %d unreadable image file(s) under %s", bad, root)
        flip = True if hflip is None else hflip
        train = SafeImageFolder(root, classes, tr_samples,
                                transforms(image_size, train=True, mean=mean, std=std, hflip=flip))
        val = SafeImageFolder(root, classes, va_samples, transforms(image_size, train=False, mean=mean, std=std))
        data = ImageData(str(root), train, val, classes, image_size)
    if limit is not None:
        data.train = Subset(data.train, _spread(len(data.train), limit))
        data.val = Subset(data.val, _spread(len(data.val), max(1, limit // 4)))
    return data


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), so a small subset still covers every class."""
    k = min(k, n)
    return sorted({int(i * n / k) for i in range(k)})


def raw_images(spec: str, *, image_size: int | None = None) -> Iterator[np.ndarray]:
    """Every image of a data set as raw uint8 HxWxC, streamed (before resizing when image_size is None)."""
    if spec == "digits":
        from sklearn.datasets import load_digits

        if image_size is None:
            for img in load_digits().images:
                yield np.round(img * (255.0 / 16.0)).astype(np.uint8)[:, :, None]
        else:
            for img in digits_uint8(image_size)[0]:
                yield img.permute(1, 2, 0).numpy()
        return
    root = Path(spec)
    if not root.is_dir():
        raise SurgeryError(f"data {spec!r} not found; give an ImageFolder path (built-in: {', '.join(BUILTIN)})")
    splits = [root / "train", root / "val"] if (root / "train").is_dir() else [root]
    for split in splits:
        if not split.is_dir():
            continue
        classes, samples, _ = _scan_folder(split)
        ds = SafeImageFolder(split, classes, samples)
        for i in range(len(ds)):
            try:
                img = ds.load(i)
            except (OSError, ValueError, SyntaxError):
                continue
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            yield np.asarray(img)


def default_workers(dataset: Dataset) -> int:
    """In-memory sets load fastest in the main process; files get up to 8 workers, one core left free."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(base, TensorImages):
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                rank: int = 0, world: int = 1, workers: int | None = None) -> DataLoader:
    """A DataLoader whose order is a function of (seed, epoch) only, so runs resume exactly.

    The same sampler serves one process and many: with ``world`` processes, rank r takes
    every world-th sample of the one permutation, so a DDP step sees the same global
    batch as a single process with the whole batch.
    """
    workers = default_workers(dataset) if workers is None else workers
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                 drop_last=train and world > 1)
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train and len(dataset) > batch_size * world,
        num_workers=workers, generator=torch.Generator().manual_seed(seed * 1000 + epoch),
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )


@dataclass
class Calibration:
    """A few batches of real images (and their labels) for data-driven passes."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int


def load_calibration(spec: str, example: torch.Tensor, n_images: int, batch_size: int = 32,
                     seed: int = 0, who: str = "calibration") -> Calibration:
    """The first ``n_images`` training images of ``spec`` (digits or an ImageFolder) at the traced size.

    Passes use them to measure the model on real data (prune's taylor and compensate, ebcle's scores);
    ``who`` names the pass in error messages.
    """
    if example.dim() != 4 or example.shape[-1] != example.shape[-2]:
        raise SurgeryError(f"{who}: calibration data needs a square image input, not {tuple(example.shape[1:])}")
    data = load_data(spec, image_size=int(example.shape[-1]), limit=n_images, seed=seed)
    if example.shape[1] != 3:
        raise SurgeryError(f"{who}: calibration images are RGB but the model takes {example.shape[1]} channels")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the training transforms are random: same plan on every run
        items = [data.train[i] for i in range(min(n_images, len(data.train)))]
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = torch.stack([im for im, _ in chunk]).to(example.device, example.dtype)
        batches.append((images, torch.tensor([y for _, y in chunk], device=example.device)))
    return Calibration(batches, data.num_classes)
