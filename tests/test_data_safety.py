"""ImageFolder safety with real files: symlink loops and escapes, decompression bombs, corrupt files.

Every check loads the same on-disk folder through the Python API and the CLI (real subprocesses),
and asserts the user's files are untouched afterwards.
"""

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from surgery.data import (
    LINK_BROKEN,
    LINK_INSIDE_DIR,
    LINK_OUTSIDE,
    TOO_LARGE,
    UNREADABLE,
    SkipReport,
    load_data,
    make_loader,
    raw_images,
)
from surgery.entropy import dataset_entropy
from surgery.errors import SurgeryError

from conftest import snapshot

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs POSIX symlinks")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int, *, full: bool = True) -> bytes:
    """A 1-bit all-black PNG: ``full`` writes every row (a real, decodable bomb of a few KB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if full:
        z, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)
        data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:  # header only: the claim alone must be refused
        data = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def good_image(path, seed: int, size: int = 12) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(99).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 2]  # header intact, scan data cut


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tmp/data (the data set: 2 classes) and tmp/outside (images the links point at, never to be loaded)."""
    base = tmp_path_factory.mktemp("safety")
    outside, data = base / "outside", base / "data"
    outside.mkdir()
    for i in range(3):
        good_image(outside / f"secret{i}.png", 100 + i)
    cat, dog = data / "cat", data / "dog"
    (cat / "sub").mkdir(parents=True)
    dog.mkdir()
    for i in range(5):
        good_image(cat / f"{i}.png", i)
        good_image(dog / f"{i}.png", 10 + i)
    good_image(cat / "sub" / "5.png", 5)
    # links that stay inside the class folder
    os.symlink("0.png", cat / "inside_link.png")  # a file: followed
    os.symlink("sub", cat / "sub_alias")  # a folder already listed: not descended
    os.symlink(".", cat / "loop")  # a real loop: cat/loop/loop/... forever under followlinks=True
    os.symlink("selfloop.png", cat / "selfloop.png")  # a link to itself (ELOOP)
    # links that leave the class folder
    os.symlink(outside / "secret0.png", cat / "out_file.png")
    os.symlink("../../outside", cat / "out_dir")
    os.symlink("../dog/0.png", cat / "other_class.png")  # inside the data set, outside the class folder
    os.symlink(".", data / "zz_root_loop")  # a "class folder" that is the data root itself
    # bad files
    (cat / "bomb.png").write_bytes(bomb_png(10_000, 10_000))  # 100 M pixels: over PIL's limit, under 2x
    (cat / "huge.png").write_bytes(bomb_png(100_000, 100_000, full=False))  # 10 G pixels claimed
    (cat / "truncated.jpg").write_bytes(truncated_jpeg())  # header fine: fails only when decoded
    (dog / "notes.png").write_text("this is a text file, not a png\n")
    os.mkfifo(dog / "pipe.png")  # opening it for reading would block forever
    (dog / "readme.txt").write_text("not an image name: ignored, not counted\n")
    return data, outside


# files: cat 0-4, sub/5, inside_link, bomb, huge, truncated (10); dog 0-4, notes, pipe (7)
EXPECTED_SCAN = {TOO_LARGE: 2, UNREADABLE: 2, LINK_OUTSIDE: 3, LINK_INSIDE_DIR: 2, LINK_BROKEN: 1,
                 "class folder pointing at the data root or above": 1}
GOOD = 12  # 11 distinct good images + the inside link


def test_bomb_fixture_is_in_pil_warning_band():
    # The decodable bomb only makes PIL warn (not raise), so it proves the warning is turned into a skip.
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    im = Image.open(io.BytesIO(bomb_png(64, 64)))
    im.load()
    assert im.size == (64, 64)


def test_load_data_skips_counts_and_stays_inside(world, caplog):
    data, outside = world
    before = snapshot(data.parent)
    with caplog.at_level(logging.WARNING, logger="surgery"):
        d = load_data(str(data), image_size=16, val_fraction=0.3)
        seen = 0
        for split in (d.train, d.val):  # every sample decoded once: the truncated JPEG is met at load time
            seen += sum(len(y) for _, y in make_loader(split, 4, train=False, workers=0))
    assert d.classes == ["cat", "dog"]
    assert isinstance(d.skipped, SkipReport) and d.skipped.to_dict() == EXPECTED_SCAN
    assert d.skipped.files == 17
    samples = d.train.samples + d.val.samples
    assert len(samples) == GOOD + 1  # + the truncated JPEG, caught at load
    inside = str(data.resolve()) + os.sep
    assert all(p.startswith(inside) for p, _ in samples)  # nothing from outside/
    assert all(f"{os.sep}cat{os.sep}" in p for p, c in samples if c == 0)  # nor from the other class
    assert seen == len(d.train) + len(d.val)  # epochs completed: a readable image stood in
    summaries = [r.getMessage() for r in caplog.records if "did not follow" in r.getMessage()]
    assert len(summaries) == 1 and "\n" not in summaries[0]  # one line per data set
    line = summaries[0]
    assert "skipped 4 unreadable image file(s) of 17" in line and f"2 {TOO_LARGE}" in line
    assert "did not follow 7 symlink(s)" in line and f"3 {LINK_OUTSIDE}" in line
    assert "truncated.jpg" in caplog.text  # the load-time skip names the file
    assert "Traceback" not in caplog.text
    assert snapshot(data.parent) == before


def test_raw_images_and_entropy_skip_the_same_files(world):
    data, _ = world
    before = snapshot(data.parent)
    report = SkipReport()
    imgs = list(raw_images(str(data), report=report))
    assert len(imgs) == GOOD and all(im.shape == (12, 12, 3) for im in imgs)
    want = dict(EXPECTED_SCAN, **{UNREADABLE: 3})  # + the truncated JPEG
    assert report.to_dict() == want and report.files == 17
    stats = dataset_entropy(str(data))
    assert stats.images == GOOD and stats.skipped == want and stats.to_dict()["skipped"] == want
    assert snapshot(data.parent) == before


def test_class_folder_link_keeps_its_own_boundary(tmp_path):
    # A class folder that is itself a link is the user's layout: its real path is the boundary.
    real = tmp_path / "store" / "cats"
    real.mkdir(parents=True)
    for i in range(3):
        good_image(real / f"{i}.png", i)
    os.symlink(tmp_path / "store", real / "up")  # leaves the (real) class folder
    data = tmp_path / "data"
    (data / "dog").mkdir(parents=True)
    for i in range(3):
        good_image(data / "dog" / f"{i}.png", 10 + i)
    os.symlink(real, data / "cat")
    d = load_data(str(data), image_size=8)
    assert d.classes == ["cat", "dog"] and len(d.train) + len(d.val) == 6
    assert d.skipped.to_dict() == {LINK_OUTSIDE: 1}


def test_only_bad_images_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        (bad / c / "x.png").write_text("text")
        (bad / c / "huge.png").write_bytes(bomb_png(100_000, 100_000, full=False))
    with pytest.raises(SurgeryError) as e:
        load_data(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and "no readable image" in msg and f"2 {TOO_LARGE}" in msg and f"2 {UNREADABLE}" in msg
    with pytest.raises(SurgeryError, match="no readable image"):
        dataset_entropy(str(bad))
    for i in range(2):  # decodes fail only inside the loop: entropy still ends in one line
        (bad / "a" / f"{i}.jpg").write_bytes(truncated_jpeg())
    with pytest.raises(SurgeryError) as e:
        dataset_entropy(str(bad))
    assert "\n" not in str(e.value) and "skipped 6 unreadable image file(s) of 6" in str(e.value)


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "surgery", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_in_subprocesses(world, tmp_path):
    data, _ = world
    # every image bad: text and a bomb fail the scan, truncated JPEGs fail only when a DataLoader worker decodes them
    only_bad = tmp_path / "only_bad"
    for c in ("a", "b"):
        (only_bad / c).mkdir(parents=True)
        (only_bad / c / "x.png").write_text("text")
        (only_bad / c / "bomb.png").write_bytes(bomb_png(10_000, 10_000))
        for i in range(4):
            (only_bad / c / f"{i}.jpg").write_bytes(truncated_jpeg())
    before = {p: snapshot(p) for p in (data.parent, only_bad)}
    model = ["resnet18", "--input-size", "16", "--num-classes", "2", "--json"]
    procs = {  # run together: each pays the torch import
        "entropy": _cli("entropy", str(data), "--json"),
        "evaluate": _cli("evaluate", *model, "--data", str(data)),
        "evaluate_bad": _cli("evaluate", *model, "--data", str(only_bad)),
    }
    out = {k: (*p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    for name, (stdout, stderr, _) in out.items():
        assert "Traceback" not in stderr + stdout, (name, stderr)

    stdout, stderr, rc = out["entropy"]
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["images"] == GOOD and result["skipped"][TOO_LARGE] == 2
    assert "skipped 5 unreadable image file(s) of 17" in stderr and "did not follow 7 symlink(s)" in stderr

    stdout, stderr, rc = out["evaluate"]
    assert rc == 0, stderr
    assert json.loads(stdout)["val_images"] > 0
    assert "skipped 4 unreadable image file(s) of 17" in stderr

    stdout, stderr, rc = out["evaluate_bad"]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "no readable image" in errors[0], stderr
    assert f"skipped 4 unreadable image file(s) of 12 (2 {TOO_LARGE}, 2 {UNREADABLE})" in stderr

    for path, state in before.items():
        assert snapshot(path) == state  # byte-identical, nothing created


def test_load_time_guard_without_the_scan(world):
    # Files can change after the scan: loading applies the same bomb and corruption rules on its own.
    from surgery.data import SafeImageFolder

    data, _ = world
    cat = str(data.resolve() / "cat")
    ds = SafeImageFolder(data, ["cat"], [(f"{cat}/bomb.png", 0), (f"{cat}/huge.png", 0),
                                         (f"{cat}/truncated.jpg", 0), (f"{cat}/0.png", 0)])
    img, label = ds[0]
    assert img.size == (12, 12) and label == 0
    assert ds.skipped == {TOO_LARGE: 2, UNREADABLE: 1} and ds.bad == {0, 1, 2}
