"""Progressive-resolution training: small first, rescale the kernels, finish at full size."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.data import TensorImages, load_data
from surgery.errors import SurgeryError
from surgery.schedule import ProgressiveResize, phase_summary, resized_data
from surgery.train import TrainConfig, fit

FAST = dict(batch_size=32, progress=False, lr=0.05, deterministic=True)


def stem_cnn(num_classes=10):
    """A 7x7 stem (rescaled: 7 -> 3 at factor 0.5), a 3x3 (kept), a fixed 4x4 adaptive pool."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 7, padding=3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(256, num_classes))


def test_resized_data_keeps_the_dataset_type_and_resizes_after_the_transform():
    data = load_data("digits", image_size=16, limit=64)
    small = resized_data(data, 8)
    assert small.image_size == 8 and len(small.train) == len(data.train)
    assert isinstance(small.val.dataset, TensorImages)  # same type: the loader keeps 0 workers
    x, y = data.val[0]
    xs, ys = small.val[0]
    assert xs.shape == (3, 8, 8) and ys == y
    torch.testing.assert_close(xs, F.interpolate(x[None], size=(8, 8), mode="bilinear", antialias=True)[0],
                               atol=1e-5, rtol=1e-5)


def test_bad_schedules_are_refused():
    with pytest.raises(SurgeryError, match="factor other than 1"):
        ProgressiveResize(factor=1.0)
    with pytest.raises(SurgeryError, match="rescale-epochs must be >= 0"):
        ProgressiveResize(switch_epoch=-1)


def test_phase_summary_adds_up_each_phase():
    history = [{"phase": "low", "image_size": 8, "seconds": 1.0, "images_per_s": 100.0},
               {"phase": "low", "image_size": 8, "seconds": 3.0, "images_per_s": 200.0},
               {"phase": "full", "image_size": 16, "seconds": 2.0, "images_per_s": 50.0}]
    summary = phase_summary(history)
    assert summary["low"] == {"epochs": 2, "seconds": 4.0, "image_size": 8, "images_per_s": 175.0}
    assert summary["full"]["images_per_s"] == 50.0


def test_fit_trains_small_then_switches_to_the_model_in_place():
    data = load_data("digits", image_size=16, limit=320)
    model = stem_cnn()
    before = model[0].weight.detach().clone()
    schedule = ProgressiveResize(factor=0.5, switch_epoch=2, reset_optimizer=False)
    history = fit(model, data, TrainConfig(epochs=3, **FAST), schedule=schedule)
    assert [h["phase"] for h in history] == ["low", "low", "full"]
    assert [h["image_size"] for h in history] == [8, 8, 16]
    assert [bool(h.get("switch")) for h in history] == [False, False, True]
    assert history[2]["switch_seconds"] > 0
    assert 0 <= history[2]["val_top1_at_switch"] <= 1  # the grown model before any full-size step
    assert model[0].weight.shape == (8, 3, 7, 7)  # the caller's model, at its own sizes
    assert not torch.equal(model[0].weight, before)  # and trained
    assert history[-1]["val_top1"] > 0.3  # chance is 0.1
    # Momentum of every parameter but the rescaled stem kernel carried over the switch.
    assert schedule.carried == {"carried": 7, "fresh": 1}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_by_default_the_optimizer_starts_fresh_at_the_switch():
    data = load_data("digits", image_size=16, limit=64)
    schedule = ProgressiveResize(factor=0.5, switch_epoch=1)
    fit(stem_cnn(), data, TrainConfig(epochs=2, **FAST), schedule=schedule)
    assert schedule.carried["carried"] == 0


def test_a_run_that_ends_before_the_switch_leaves_grown_weights_in_the_model():
    data = load_data("digits", image_size=16, limit=64)
    model = stem_cnn()
    history = fit(model, data, TrainConfig(epochs=1, **FAST), schedule=ProgressiveResize(switch_epoch=3))
    assert [h["phase"] for h in history] == ["low"]
    assert model[0].weight.shape == (8, 3, 7, 7)


@pytest.mark.parametrize("switch_epoch", [1, 2], ids=["stop-at-switch", "stop-before-switch"])
def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path, switch_epoch):
    data = load_data("digits", image_size=16, limit=96)
    cfg = TrainConfig(epochs=3, **FAST)
    full = stem_cnn()
    fit(full, data, cfg, schedule=ProgressiveResize(switch_epoch=switch_epoch))

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(SurgeryError, match="interrupted"):
        fit(stem_cnn(), data, cfg, out_dir=tmp_path, on_epoch=stop_after_first,
            schedule=ProgressiveResize(switch_epoch=switch_epoch))
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["state"]["epoch"] == 1
    resumed = stem_cnn()
    history = fit(resumed, data, cfg, out_dir=tmp_path, resume=True,
                  schedule=ProgressiveResize(switch_epoch=switch_epoch))
    assert [h["phase"] for h in history] == ["low"] * switch_epoch + ["full"] * (3 - switch_epoch)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_teacher_sees_full_size_images_in_the_low_phase():
    data = load_data("digits", image_size=16, limit=64)
    teacher = stem_cnn()
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    history = fit(stem_cnn(), data, TrainConfig(epochs=2, **FAST), teacher=teacher,
                  schedule=ProgressiveResize(switch_epoch=1))
    assert set(seen) == {(16, 16)} and history[0]["distill_loss"] > 0


def test_without_kernel_rescaling_the_unchanged_model_sees_small_images_first():
    data = load_data("digits", image_size=16, limit=64)
    model = stem_cnn()
    schedule = ProgressiveResize(switch_epoch=1, rescale_kernels=False, reset_optimizer=False)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    history = fit(model, data, TrainConfig(epochs=2, **FAST), schedule=schedule)
    assert [h["image_size"] for h in history] == [8, 16]
    assert (8, 8) in seen and (16, 16) in seen  # the caller's own model, at both sizes
    assert model[0].weight.shape == (8, 3, 7, 7)
    assert schedule.carried["fresh"] == 0


def test_cli_train_with_rescale_reports_both_phases(tmp_path, capsys):
    from surgery.cli import main

    assert main(["-q", "train", "resnet10t", "--input-size", "16", "--epochs", "2", "--rescale", "0.5",
                 "--rescale-epochs", "1", "--limit", "64", "--batch-size", "32", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "low phase at 8x8: 1 epoch(s)" in out and "full phase at 16x16: 1 epoch(s)" in out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["schedule"]["switch_epoch"] == 1 and set(report["schedule"]["phases"]) == {"low", "full"}
    assert main(["-q", "train", "resnet10t", "--rescale-epochs", "1"]) == 2
    assert "need --rescale FACTOR" in capsys.readouterr().err
