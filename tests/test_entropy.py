import math

import numpy as np
import pytest

from surgery.entropy import dataset_entropy, image_entropy, plot_histogram
from surgery.errors import SurgeryError


def test_known_histograms():
    assert image_entropy(np.full((8, 8, 3), 7, np.uint8)) == 0.0
    two = np.zeros((4, 4), np.uint8)
    two[:2] = 255
    assert image_entropy(two) == pytest.approx(math.log(2), abs=1e-12)
    assert image_entropy(two, base=2) == pytest.approx(1.0, abs=1e-12)
    uniform = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert image_entropy(uniform) == pytest.approx(math.log(256), abs=1e-12)
    rgb = np.stack([np.zeros((2, 2)), np.full((2, 2), 1), np.full((2, 2), 2)], -1).astype(np.uint8)
    assert image_entropy(rgb) == pytest.approx(math.log(3), abs=1e-12)  # channels pooled


def test_needs_raw_pixels():
    with pytest.raises(SurgeryError, match="raw 8-bit"):
        image_entropy(np.zeros((2, 2), np.float32))


def test_digits_entropy_and_plot(tmp_path):
    stats = dataset_entropy("digits")
    assert stats.images == 1797 and stats.unit == "nats"
    # 8x8 digits take at most 17 grey levels: entropy well below ln 17 on average
    assert 0.5 < stats.mean < math.log(17)
    assert stats.min <= stats.mean <= stats.max
    bits = dataset_entropy("digits", bits=True)
    assert bits.mean == pytest.approx(stats.mean / math.log(2))
    png = plot_histogram(stats, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_figure(tmp_path):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "surgery", "-q", "entropy", "digits", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mean"] == pytest.approx(dataset_entropy("digits").mean)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "surgery", "entropy", str(empty)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no images" in proc.stderr
