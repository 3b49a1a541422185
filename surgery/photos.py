"""An ImageFolder of natural-image patches, built from photos that ship inside installed packages.

Each class is one photograph (scikit-learn's two sample images, and scikit-image's data
images when scikit-image is installed); its images are random square crops of it, of random
size, resized to ``size`` x ``size``. Nothing is downloaded. The task ("which photograph is
this patch from?") is easy to state and has the pixel statistics of natural images, where
``digits`` has 17 grey levels: a data set of high entropy for EBCLE's depth rule.

    python -m surgery.photos runs/photos --size 32 --per-class 300
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import SurgeryError

# scikit-image's bundled photographs (not its drawings, text pages or test patterns).
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg",
                  "rocket.jpg")
VAL_FRACTION = 0.2


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def sources() -> dict[str, Path]:
    """Class name -> photograph file, from the packages installed here."""
    found: dict[str, Path] = {}
    sklearn = _package_dir("sklearn")
    if sklearn is not None:
        for path in sorted((sklearn / "datasets" / "images").glob("*.jpg")):
            found[path.stem] = path
    skimage = _package_dir("skimage")
    if skimage is not None:
        for name in SKIMAGE_PHOTOS:
            if (skimage / "data" / name).is_file():
                found[Path(name).stem] = skimage / "data" / name
    return found


def _crops(photo: Image.Image, n: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """n square crops, each side between 2 x size (or the photo's) and half the photo's short side."""
    w, h = photo.size
    short = min(w, h)
    low, high = min(2 * size, short), max(min(2 * size, short), short // 2)
    out = []
    for _ in range(n):
        side = int(rng.integers(low, high + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR))
    return out


def build(out: str | Path, *, size: int = 32, per_class: int = 300, seed: int = 0,
          photos: dict[str, Path] | None = None) -> Path:
    """Write ``out``/train/<photo>/*.png and ``out``/val/<photo>/*.png; ``out`` must not exist.

    The folder is written under a temporary name beside ``out`` and renamed into place when
    complete, so an interrupted build leaves no half data set behind.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise SurgeryError(f"{out} already exists; give a new folder (it is never written over)")
    if not out.parent.is_dir():
        raise SurgeryError(f"folder {out.parent} does not exist; create it first")
    if size < 8 or per_class < 5:
        raise SurgeryError(f"photos: size must be >= 8 and per_class >= 5, got {size} and {per_class}")
    photos = sources() if photos is None else photos
    if len(photos) < 2:
        raise SurgeryError("photos: fewer than two photographs found (scikit-learn's sample images are missing); "
                           "install scikit-learn, and scikit-image for 14 more classes")
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    n_val = max(1, round(per_class * VAL_FRACTION))
    try:
        for name, path in sorted(photos.items()):
            with Image.open(path) as im:
                photo = im.convert("RGB")
            for i, crop in enumerate(_crops(photo, per_class, size, rng)):
                folder = tmp / ("val" if i < n_val else "train") / name
                folder.mkdir(parents=True, exist_ok=True)
                crop.save(folder / f"{i:05d}.png")
        os.rename(tmp, out)  # atomic; fails rather than replace a folder that appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, never the user's
        raise
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to create (must not exist)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        out = build(args.out, size=args.size, per_class=args.per_class, seed=args.seed)
    except SurgeryError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {out}: {len(sources())} classes x {args.per_class} images of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
