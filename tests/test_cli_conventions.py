"""timm-style CLI conventions: aliases, sizes as three numbers, --resume RUN, --config FILE (issue 13.5)."""

import json

import pytest

from surgery.cli import _normalize, _with_config, build_parser, main
from surgery.errors import SurgeryError


def parsed(*argv):
    parser = build_parser()
    argv = list(argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args = parser.parse_args(_with_config(parser, argv, args))
    _normalize(args)
    return args


def test_aliases_and_input_size_as_three_numbers():
    args = parsed("train", "resnet18", "-b", "32", "-j", "2", "--opt", "adamw", "--lr", "0.01", "--device", "cpu",
                  "--input-size", "3", "64", "64")
    assert (args.batch_size, args.workers, args.optimizer, args.lr, args.device) == (32, 2, "adamw", 0.01, "cpu")
    assert args.input_size == "3x64x64"
    assert parsed("apply", "resnet18", "--input-size", "3x32x32", "--pass", "fuse").input_size == "3x32x32"


def test_resume_takes_the_run_folder(tmp_path):
    args = parsed("train", "resnet18", "--resume", str(tmp_path / "run"))
    assert args.resume is True and args.out == str(tmp_path / "run")
    args = parsed("train", "resnet18", "--out", "x", "--resume")
    assert args.resume is True and args.out == "x"
    with pytest.raises(SurgeryError, match="name different runs"):
        parsed("train", "resnet18", "--out", "x", "--resume", "y")


def test_config_file_with_the_command_line_overriding(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model: resnet18\nepochs: 3\nbatch-size: 16\nopt: adamw\ncompile: false\n"
                   "input_size: [3, 32, 32]\nlr: 0.002\n")
    args = parsed("train", "--config", str(cfg), "--lr", "0.05")
    assert (args.model, args.epochs, args.batch_size, args.optimizer, args.compile) == ("resnet18", 3, 16, "adamw",
                                                                                     False)
    assert args.lr == 0.05 and args.input_size == "3x32x32"  # the flag wins over the file
    assert parsed("train", "resnet34", "--config", str(cfg)).model == "resnet34"
    apply_cfg = tmp_path / "apply.json"
    apply_cfg.write_text(json.dumps({"model": "resnet18", "pass": ["fuse", "prune:flops=0.5"], "no_latency": True}))
    args = parsed("apply", "--config", str(apply_cfg))
    assert args.passes == ["fuse", "prune:flops=0.5"] and args.no_latency is True
    assert parsed("apply", "--config", str(apply_cfg), "--pass", "bilinear").passes == ["bilinear"]  # replaced


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown option 'epochz' for `surgery train` (did you mean epochs?)"),
    ("- 1\n- 2\n", "must map option names to values"),
    ("epochs: [1, 2]\n", "option 'epochs' takes one value"),
    ("compile: yes please\n", "option 'compile' is a switch"),
    ("a: [\n", "cannot read config file"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["-q", "train", "resnet18", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_model_and_passes_are_named(capsys):
    assert main(["-q", "train"]) == 2
    assert "give a MODEL" in capsys.readouterr().err
    assert main(["-q", "apply", "resnet18"]) == 2
    assert "give at least one --pass" in capsys.readouterr().err
    assert main(["-q", "train", "resnet18", "--config", "/no/such.yaml"]) == 2
    assert "config file '/no/such.yaml' not found" in capsys.readouterr().err


def test_device_that_is_not_here_is_one_line(capsys):
    assert main(["-q", "train", "resnet10t", "--input-size", "16", "--epochs", "1", "--limit", "32",
                 "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:7" in err and len(err.strip().splitlines()) == 1
