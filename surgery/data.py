"""Image data sets: the built-in `digits` set and any ImageFolder, with standard transforms.

`digits` is scikit-learn's handwritten digits (1797 images of 8x8, 10 classes), shipped
inside the scikit-learn wheel, so tests and demos need no download. Every data set also
gives raw 8-bit images (before any normalisation), which the EBCLE entropy needs.

ImageFolder safety rules (``_walk_class``, ``check_image``):

- Links: each class folder is walked by its real path, real subfolders only. A symlinked
  file is used only if its real path stays inside the class folder; a symlinked folder is
  never descended: if it leaves the class folder it is refused, and if it stays inside, its
  real folder is listed anyway (so following it could only loop or duplicate). Every folder
  is thus listed once, whatever the links. A class folder may itself be a link (its real
  path is then the boundary), unless it points at the data root or above (a loop).
- Size: an image over PIL's ``Image.MAX_IMAGE_PIXELS`` (PIL's default: about 89 M pixels)
  is a decompression bomb and is skipped, both when scanning (header only) and when loading.
- Corrupt files: anything PIL raises for a bad file (``IMAGE_ERRORS``) skips that file.
- Skips are counted by reason (``SkipReport``), logged once per data set in one line, and
  kept on ``ImageData.skipped``; a data set left with no readable image is a one-line
  ``SurgeryError``. Files are only ever opened for reading.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .errors import SurgeryError
from .models import IMAGENET_MEAN, IMAGENET_STD
from .progress import bar

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = ("digits",)

# What PIL raises for a corrupt, truncated or hostile file (its plugins leak more than OSError).
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
                struct.error, zlib.error) + BOMB_ERRORS

# Skip reasons: image files, then links, then folders.
TOO_LARGE = "too large (decompression bomb)"
UNREADABLE = "corrupt or not an image"
LINK_OUTSIDE = "leave the class folder"
LINK_INSIDE_DIR = "folder inside, already listed (loop or alias)"
LINK_BROKEN = "broken or looping"
CLASS_LOOP = "class folder pointing at the data root or above"
UNLISTABLE = "folder that could not be listed"
FILE_REASONS = (TOO_LARGE, UNREADABLE)
LINK_REASONS = (LINK_OUTSIDE, LINK_INSIDE_DIR, LINK_BROKEN, CLASS_LOOP)


@dataclass
class SkipReport:
    """How many image files a scan found and what it skipped, by reason (the rules are in the module doc)."""

    root: str = ""
    files: int = 0  # image-named files looked at, skipped ones included
    skipped: Counter = field(default_factory=Counter)

    def add(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def merge(self, other: SkipReport) -> SkipReport:
        self.files += other.files
        self.skipped.update(other.skipped)
        return self

    @property
    def bad_files(self) -> int:
        return sum(self.skipped[r] for r in FILE_REASONS)

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.skipped.items()) if v}

    def summary(self) -> str | None:
        """One line: ``ROOT: skipped 3 unreadable image file(s) of 40 (...); did not follow 2 symlink(s) (...)``."""
        def detail(reasons):
            return ", ".join(f"{self.skipped[r]} {r}" for r in reasons if self.skipped[r])

        parts = []
        if self.bad_files:
            parts.append(f"skipped {self.bad_files} unreadable image file(s) of {self.files} ({detail(FILE_REASONS)})")
        links = sum(self.skipped[r] for r in LINK_REASONS)
        if links:
            parts.append(f"did not follow {links} symlink(s) ({detail(LINK_REASONS)})")
        if self.skipped[UNLISTABLE]:
            parts.append(f"could not list {self.skipped[UNLISTABLE]} folder(s)")
        return f"{self.root}: {'; '.join(parts)}" if parts else None

    def log(self) -> None:
        line = self.summary()
        if line:
            log.warning("%s", line)


class NoReadableImages(SurgeryError):
    """Every image was bad. Stays one line when a DataLoader worker re-raises it with the traceback inside."""

    def __init__(self, message: str):
        line = message.strip().splitlines()[-1] if message.strip() else message
        prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
        super().__init__(line.removeprefix(prefix))


def open_image(path: str) -> Image.Image:
    """Decode one image as RGB; a decompression bomb raises (PIL would only warn below 2x its limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")


def check_image(path: str) -> str | None:
    """Why ``path`` cannot be used (a skip reason), from its header only; None if it looks fine."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only; PIL checks the pixel count here
                im.size  # noqa: B018
    except BOMB_ERRORS:
        return TOO_LARGE
    except IMAGE_ERRORS:
        return UNREADABLE
    return None


def skip_reason(exc: BaseException) -> str:
    return TOO_LARGE if isinstance(exc, BOMB_ERRORS) else UNREADABLE


@dataclass
class ImageData:
    """A train/val pair of data sets that yield (normalised CHW float tensor, class index).

    ``skipped`` holds what the folder scan left out (None for built-in sets).
    """

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int
    skipped: SkipReport | None = None

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
    """ImageFolder that skips unreadable images (counted, warned) instead of crashing mid-epoch.

    ``skipped`` counts load-time skips by reason, in this process (each DataLoader worker keeps its own).
    """

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]], transform=None):
        self.root, self.classes, self.samples, self.transform = root, classes, samples, transform
        self.bad: set[int] = set()
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        return open_image(self.samples[i][0])

    def __getitem__(self, i: int):
        for step in range(len(self.samples)):
            j = (i + step) % len(self.samples)
            if j in self.bad:
                continue
            try:
                img = self.load(j)
            except IMAGE_ERRORS as exc:
                self.bad.add(j)
                self.skipped[skip_reason(exc)] += 1
                log.warning("skipping unreadable image %s (%s); %d skipped so far",
                            self.samples[j][0], type(exc).__name__, len(self.bad))
                continue
            return (self.transform(img) if self.transform else img), self.samples[j][1]
        raise NoReadableImages(f"no readable image in {self.root}: all {len(self.samples)} failed to load")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_class(folder: str, report: SkipReport) -> Iterator[str]:
    """Image files of one class folder (sorted, depth first), by the link rules of the module doc.

    Only real folders are descended, so each is listed once and no link can loop; a file link is
    used (as its real path) when that stays inside the class folder.
    """
    top = Path(os.path.realpath(folder))
    stack = [str(top)]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            report.add(UNLISTABLE)
            continue
        subdirs = []
        for e in entries:
            if e.is_symlink():
                path = _follow_link(e, top, report)
                if path is not None:
                    report.files += 1
                    yield path
            elif e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
            elif _is_image_name(e.name):
                report.files += 1
                if e.is_file(follow_symlinks=False):
                    yield e.path
                else:  # a FIFO or device named like an image: opening it could block
                    report.add(UNREADABLE)
        stack.extend(reversed(subdirs))


def _follow_link(e: os.DirEntry, top: Path, report: SkipReport) -> str | None:
    """The real path of an image link that stays inside ``top``; None (counted) for any other link."""
    target = Path(os.path.realpath(e.path))  # never raises: a loop comes back unresolved
    try:
        st = os.stat(target)
    except OSError:  # dangling, or a loop of links (ELOOP)
        if _is_image_name(e.name):
            report.add(LINK_BROKEN)
        return None
    is_dir = stat.S_ISDIR(st.st_mode)
    if not target.is_relative_to(top):
        if is_dir or _is_image_name(e.name):
            report.add(LINK_OUTSIDE)
        return None
    if is_dir:
        report.add(LINK_INSIDE_DIR)
        return None
    if not _is_image_name(e.name):
        return None
    if not stat.S_ISREG(st.st_mode):
        report.files += 1
        report.add(UNREADABLE)
        return None
    return str(target)


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], SkipReport]:
    """Class folders and (path, class) samples; files that PIL cannot identify, or too large, are dropped."""
    report = SkipReport(str(root))
    real_root = Path(os.path.realpath(root))
    classes, folders = [], []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        if d.name.startswith(".") or not d.is_dir():
            continue
        real = Path(os.path.realpath(d))
        if real_root.is_relative_to(real):  # cls -> . or .. would hold the other classes: a loop
            report.add(CLASS_LOOP)
            continue
        classes.append(d.name)
        folders.append(str(real))
    if not classes:
        raise SurgeryError(f"{root} has no class folders; expected {root}/CLASS_NAME/image.jpg (ImageFolder)")
    samples = []
    for idx, folder in enumerate(folders):
        for path in _walk_class(folder, report):
            reason = check_image(path)
            if reason:
                report.add(reason)
            else:
                samples.append((path, idx))
    if not samples:
        why = report.summary()
        if report.files:
            raise NoReadableImages(f"no readable image in {why}")
        raise SurgeryError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})"
                           + (f"; {why}" if why else ""))
    return classes, samples, report


def _folder_splits(root: Path, val_fraction: float, seed: int):
    """Classes, train and val samples, and one SkipReport for the whole data set."""
    report = SkipReport(str(root))
    if (root / "train").is_dir():
        classes, train, bad = _scan_folder(root / "train")
        report.merge(bad)
        val_root = next((root / n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
        if val_root is not None:
            val_classes, val, bad_val = _scan_folder(val_root)
            if val_classes != classes:
                raise SurgeryError(f"{root}/train and {val_root} have different class folders")
            return classes, train, val, report.merge(bad_val)
        root_samples = train
    else:
        classes, root_samples, bad = _scan_folder(root)
        report.merge(bad)
    tr, va = _seeded_split(len(root_samples), val_fraction, seed, [c for _, c in root_samples])
    return classes, [root_samples[i] for i in tr], [root_samples[i] for i in va], report


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
        classes, tr_samples, va_samples, skipped = _folder_splits(root, val_fraction, seed)
        skipped.log()  # one line for the whole data set
        flip = True if hflip is None else hflip
        train = SafeImageFolder(root, classes, tr_samples,
                                transforms(image_size, train=True, mean=mean, std=std, hflip=flip))
        val = SafeImageFolder(root, classes, va_samples, transforms(image_size, train=False, mean=mean, std=std))
        data = ImageData(str(root), train, val, classes, image_size, skipped)
    if limit is not None:
        data.train = Subset(data.train, _spread(len(data.train), limit))
        data.val = Subset(data.val, _spread(len(data.val), max(1, limit // 4)))
    return data


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), so a small subset still covers every class."""
    k = min(k, n)
    return sorted({int(i * n / k) for i in range(k)})


def raw_images(spec: str, *, image_size: int | None = None,
               report: SkipReport | None = None) -> Iterator[np.ndarray]:
    """Every image of a data set as raw uint8 HxWxC, streamed (before resizing when image_size is None).

    Bad files are skipped; ``report`` (if given) collects the counts, logged in one line at the end.
    """
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
    report = report if report is not None else SkipReport()
    report.root = str(root)
    splits = [root / "train", root / "val"] if (root / "train").is_dir() else [root]
    for split in splits:
        if not split.is_dir():
            continue
        classes, samples, scanned = _scan_folder(split)
        report.merge(scanned)
        for path, _ in samples:
            try:
                img = open_image(path)
            except IMAGE_ERRORS as exc:  # e.g. a truncated file whose header was fine
                report.add(skip_reason(exc))
                continue
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            yield np.asarray(img)
    report.log()


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
                     seed: int = 0, who: str = "calibration", norm: tuple[Any, Any] | None = None) -> Calibration:
    """The first ``n_images`` training images of ``spec`` (digits or an ImageFolder) at the traced size.

    Passes use them to measure the model on real data (prune's taylor importance, ebcle's scores,
    recovery); ``who`` names the pass in error messages; ``norm``: the model's (mean, std), ImageNet's
    by default.
    """
    if not isinstance(example, torch.Tensor):  # a model's several inputs
        if len(example) != 1:
            raise SurgeryError(f"{who}: calibration data needs a model of one image input, not {len(example)} inputs")
        example = example[0]
    if example.dim() != 4 or example.shape[-1] != example.shape[-2]:
        raise SurgeryError(f"{who}: calibration data needs a square image input, not {tuple(example.shape[1:])}")
    mean, std = norm if norm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    data = load_data(spec, image_size=int(example.shape[-1]), limit=n_images, seed=seed, mean=mean, std=std)
    if example.shape[1] != 3:
        raise SurgeryError(f"{who}: calibration images are RGB but the model takes {example.shape[1]} channels")
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the training transforms are random: same plan on every run
        items = [data.train[i] for i in bar(range(min(n_images, len(data.train))), f"{who}: calibration images",
                                                unit="img")]
    batches = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images = torch.stack([im for im, _ in chunk]).to(example.device, example.dtype)
        batches.append((images, torch.tensor([y for _, y in chunk], device=example.device)))
    return Calibration(batches, data.num_classes)
