"""surgery.photos: an ImageFolder of natural-image patches from photos installed with scikit-learn."""

import pytest

from surgery import photos
from surgery.data import load_data
from surgery.entropy import dataset_entropy
from surgery.errors import SurgeryError


def _sklearn_only():
    return {name: path for name, path in photos.sources().items() if name in ("china", "flower")}


def test_builds_an_image_folder_of_higher_entropy_than_digits(tmp_path):
    out = photos.build(tmp_path / "photos", size=16, per_class=20, photos=_sklearn_only())
    data = load_data(str(out), image_size=16)
    assert data.classes == ["china", "flower"]
    assert (len(data.train), len(data.val)) == (32, 8)
    assert tuple(data.train[0][0].shape) == (3, 16, 16)
    natural, digits = dataset_entropy(str(out)).mean, dataset_entropy("digits").mean
    assert natural > 4.0 > digits  # photographs use most of the 8-bit alphabet; digits 17 grey levels


def test_the_same_seed_builds_the_same_images(tmp_path):
    a = photos.build(tmp_path / "a", size=16, per_class=6, photos=_sklearn_only())
    b = photos.build(tmp_path / "b", size=16, per_class=6, photos=_sklearn_only())
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_never_writes_over_an_existing_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SurgeryError, match="already exists"):
        photos.build(out, size=16, per_class=6, photos=_sklearn_only())
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(SurgeryError, match="fewer than two photographs"):
        photos.build(tmp_path / "none", photos={})
    assert not (tmp_path / "none").exists()
