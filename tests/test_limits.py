"""Sizes are checked against a memory estimate before anything big is allocated (surgery.limits)."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import surgery
from surgery import limits
from surgery.errors import SurgeryError
from surgery.models import _timm_model
from surgery.passes.bilinear import BilinearConfig
from surgery.passes.ebcle import EbcleConfig
from surgery.passes.head import HeadConfig
from surgery.passes.rescale import RescaleConfig

from conftest import snapshot


@pytest.fixture(autouse=True)
def default_limit():
    limits.set_max_memory(None)
    yield
    limits.set_max_memory(None)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "r18"
    surgery.apply("resnet18", "fuse", input_size="32", measure=False).save(out)
    return out


# Real `python -m surgery` processes, in parallel (importing surgery takes seconds): name -> (arguments,
# what the one stderr line must say). {out} is a new folder, {art} a copy of an artifact, replaced with --force.
HUGE = "the limit is"
CASES = {
    "input": (["apply", "resnet18", "--pass", "fuse", "--input-size", "3x60000x60000", "--out", "{out}"],
              ["needs about", "3x60000x60000", "GiB", HUGE, "(--max-memory, default: this machine's RAM)"]),
    "classes": (["apply", "resnet18", "--pass", "fuse", "--num-classes", "2000000000", "--out", "{out}"],
                ["resnet18 with --num-classes 2000000000 needs about", "TiB", "params", HUGE]),
    "rescale": (["apply", "resnet18", "--pass", "rescale:factor=2000", "--input-size", "32", "--max-memory", "8G",
                 "--out", "{art}", "--force"],
                ["with rescale needs about", "rescale:factor=2000", "the limit is 8.0 GiB (--max-memory)"]),
}


@pytest.fixture(scope="module")
def cli_runs(artifact, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    art = work / "art"
    shutil.copytree(artifact, art)
    (work / "mine.txt").write_bytes(b"a user's file\n")
    before = snapshot(work)

    def run(name):
        args = [a.format(out=work / f"new-{name}", art=art) for a in CASES[name][0]]
        return name, subprocess.run([sys.executable, "-m", "surgery", "-q", *args], capture_output=True, text=True,
                                    timeout=300)

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        results = dict(pool.map(run, CASES))
    return results, before, snapshot(work)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_refuses_with_one_line_and_writes_nothing(cli_runs, name):
    results, before, after = cli_runs
    proc = results[name]
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr  # no traceback, one line
    assert proc.stderr.startswith("error: ")
    for part in CASES[name][1]:
        assert part in proc.stderr
    assert after == before  # no new folder; the artifact and the user's file are byte-identical


def cli(capsys, *args):
    """The same CLI in this process (argparse-level refusals and the passing case: no import wait)."""
    from surgery.cli import main

    try:
        code = main(["-q", *args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args,message", [
    (["--num-classes", "0"], "argument --num-classes: must be >= 1, got 0"),
    (["--num-classes", "-3"], "argument --num-classes: must be >= 1, got -3"),
    (["--max-memory", "lots"], "argument --max-memory: bad memory size 'lots'"),
    (["--max-memory", "10M"], "error: resnet18 needs about 139.6 MiB (estimate: 3 copies of 11.7M params"),
])
def test_cli_arguments_refused(capsys, tmp_path, args, message):
    code, out, err = cli(capsys, "apply", "resnet18", "--pass", "fuse", "--input-size", "32", *args,
                         "--out", str(tmp_path / "new"))
    assert code == 2 and out == "" and message in err.strip().splitlines()[-1]
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_cli_limit_above_the_estimate_runs(capsys):
    code, out, err = cli(capsys, "inspect", "resnet18", "--input-size", "32", "--max-memory", "64G", "--json")
    assert code == 0, err
    assert json.loads(out)["params"] == 11689512


def test_recipe_with_num_classes_over_the_limit(artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(artifact, art)
    recipe = json.loads((art / "recipe.json").read_text())
    recipe["source"]["kwargs"]["num_classes"] = 500_000  # accepted by the schema, 3 GiB with copies
    (art / "recipe.json").write_text(json.dumps(recipe))
    limits.set_max_memory("1G")
    with pytest.raises(SurgeryError, match=r"recipe's resnet18 .*num_classes=500000 needs about .*"
                                           r"the limit is 1\.0 GiB"):
        surgery.load(art)


def test_recipe_with_input_size_over_the_limit(artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(artifact, art)
    recipe = json.loads((art / "recipe.json").read_text())
    recipe["input_size"] = recipe["source"]["input_size"] = [3, 4096, 4096]
    (art / "recipe.json").write_text(json.dumps(recipe))
    limits.set_max_memory("4G")
    with pytest.raises(SurgeryError, match=r"needs about .*activations of batch 2 at 3x4096x4096.*limit is 4\.0 GiB"):
        surgery.load(art)
    limits.set_max_memory(None)
    assert surgery.load(artifact)(torch.randn(1, 3, 32, 32)).shape == (1, 1000)  # the real one still loads


@pytest.mark.parametrize("n", [0, -3, True, 2.5])
def test_api_num_classes_must_be_positive(n):
    with pytest.raises(SurgeryError, match="--num-classes must be >= 1"):
        surgery.load_model("resnet18", num_classes=n)


def test_api_checks_before_allocating():
    with pytest.raises(SurgeryError, match="with --num-classes 2000000000 needs about"):
        surgery.load_model("torchvision:resnet18", num_classes=2_000_000_000)
    with pytest.raises(SurgeryError, match="does not build on the meta device: params counted for the classifier"):
        surgery.load_model("torchvision:regnet_x_400mf", num_classes=2_000_000_000)  # .item() in its constructor
    limits.set_max_memory("64M")
    with pytest.raises(SurgeryError, match=r"with rescale needs about .* the limit is 64\.0 MiB"):
        surgery.apply(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()), "rescale:factor=64",
                      input_size="32", measure=False)


@pytest.mark.parametrize("text,expected", [("8G", 8 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29),
                                           ("2GB", 2_000_000_000), ("4096", 4096), (" 64 k ", 64 << 10)])
def test_parse_size(text, expected):
    assert limits.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "1X", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(SurgeryError, match="bad memory size"):
        limits.parse_size(text)


def test_default_limit_is_the_machine():
    assert limits.max_memory() == limits.machine_memory() > 256 << 20
    limits.set_max_memory("3G")
    assert limits.max_memory() == 3 << 30


def meta(name, size=(3, 224, 224), **kwargs):
    with torch.device("meta"):
        return _timm_model(name, kwargs.get("num_classes"), size)[0]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_param_estimate_is_close_to_the_real_model(name):
    est = limits.estimate(meta(name), (3, 64, 64))
    real = sum(p.numel() * p.element_size() for p in surgery.load_model(name).model.parameters())
    assert real <= est.param_bytes < 2 * real
    assert est.total >= limits.COPIES * real


def test_activations_grow_with_the_area():
    model = meta("resnet18")
    small, big = (limits.estimate(model, (3, s, s)).activation_bytes for s in (64, 128))
    assert 3.5 < big / small < 4.5


def test_pass_growth():
    model = meta("resnet18")
    base = limits.estimate(model, (3, 64, 64))
    grown = limits.estimate(model, (3, 64, 64), passes=[RescaleConfig(factor=2)])
    assert grown.activation_bytes == pytest.approx(4 * base.activation_bytes, rel=1e-6)
    assert grown.peak_param_bytes > base.param_bytes  # k x k kernels follow the resolution
    head = limits.estimate(model, (3, 64, 64), passes=[HeadConfig(num_classes=1_000_000)])
    assert head.peak_param_bytes - base.param_bytes == 513 * 1_000_000 * 4
    wide = limits.estimate(model, (3, 64, 64), passes=[EbcleConfig(widen=2)])
    assert wide.peak_param_bytes == 4 * base.param_bytes
    vit = meta("vit_tiny_patch16_224")
    low, high = (limits.estimate(vit, (3, 224, 224), passes=[BilinearConfig(rank=r)]) for r in (1, 256))
    assert low.peak_param_bytes == low.param_bytes < high.peak_param_bytes


def test_apply_checks_memory_at_the_batch_it_runs():
    """Latency runs batch 8; without it apply runs the drift's 4 (or the trace's 2): the check follows."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    size = (3, 512, 512)
    needs = {b: limits.estimate(model, size, batch=b).total for b in (2, 4, 8)}
    assert needs[2] < needs[4] < needs[8]
    limits.set_max_memory((needs[4] + needs[8]) // 2)  # batch 4 fits, batch 8 does not
    with pytest.raises(SurgeryError, match="activations of batch 8"):
        surgery.apply(model, "fuse", input_size=size, latency=True)
    surgery.apply(model, "fuse", input_size=size, latency=False)  # drift at batch 4: fits
    limits.set_max_memory((needs[2] + needs[4]) // 2)
    with pytest.raises(SurgeryError, match="activations of batch 4"):
        surgery.apply(model, "fuse", input_size=size, latency=False)
    surgery.apply(model, "fuse", input_size=size, measure=False)  # the trace's batch 2 only
