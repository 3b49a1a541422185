import logging

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.data import load_data, make_loader, raw_images
from surgery.errors import SurgeryError


def make_folder(root, classes=("cat", "dog"), per_class=6, size=20, split=None):
    g = np.random.default_rng(0)
    for split_name in (split or [None]):
        base = root / split_name if split_name else root
        for c in classes:
            (base / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(base / c / f"{i}.png")
    return root


def test_digits_split_is_seeded_stratified_and_normalised():
    a, b = load_data("digits", image_size=16), load_data("digits", image_size=16)
    assert len(a.train) + len(a.val) == 1797 and a.num_classes == 10
    assert torch.equal(a.val.labels, b.val.labels)
    assert set(a.val.labels.tolist()) == set(range(10))
    x, y = a.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -3 < x.min() < x.max() < 3
    other = load_data("digits", image_size=16, seed=1)
    assert not torch.equal(a.val.labels, other.val.labels)


def test_loader_order_depends_on_seed_and_epoch_only():
    data = load_data("digits", image_size=8, limit=64)

    def first_labels(epoch, seed=0):
        torch.manual_seed(123)
        return next(iter(make_loader(data.train, 16, train=True, seed=seed, epoch=epoch)))[1]

    assert torch.equal(first_labels(0), first_labels(0))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_imagefolder_with_train_val_subfolders(tmp_path):
    make_folder(tmp_path, split=["train", "val"])
    data = load_data(str(tmp_path), image_size=16)
    assert data.classes == ["cat", "dog"] and len(data.train) == 12 and len(data.val) == 12
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_imagefolder_single_folder_is_split(tmp_path):
    make_folder(tmp_path, per_class=10)
    data = load_data(str(tmp_path), image_size=16, val_fraction=0.2)
    assert len(data.train) == 16 and len(data.val) == 4


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    make_folder(tmp_path, per_class=5)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    good = tmp_path / "dog" / "0.png"
    (tmp_path / "dog" / "truncated.png").write_bytes(good.read_bytes()[:60])  # header fine, pixels gone
    with caplog.at_level(logging.WARNING):
        data = load_data(str(tmp_path), image_size=16, val_fraction=0.01)
        loader = make_loader(data.train, 4, train=False, workers=0)
        n = sum(len(y) for _, y in loader)
    assert "skipped 1 unreadable image" in caplog.text  # the header-less file, at scan time
    assert "skipping unreadable image" in caplog.text and "truncated.png" in caplog.text
    assert n == len(data.train)  # the epoch completed, a readable image stood in


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no class folders"),
    (lambda p: (p / "a").mkdir(parents=True), "no images"),
])
def test_bad_data_folders(tmp_path, setup, message):
    path = tmp_path / "data"
    setup(path)
    with pytest.raises(SurgeryError, match=message):
        load_data(str(path))


def test_raw_images_are_uint8_before_normalisation(tmp_path):
    digits = list(raw_images("digits"))
    assert len(digits) == 1797 and digits[0].dtype == np.uint8 and digits[0].shape == (8, 8, 1)
    assert max(int(d.max()) for d in digits) == 255
    make_folder(tmp_path, per_class=2, size=12)
    imgs = list(raw_images(str(tmp_path)))
    assert len(imgs) == 4 and imgs[0].shape == (12, 12, 3) and imgs[0].dtype == np.uint8
