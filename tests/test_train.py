import json

import pytest
import torch
from torch import nn

import surgery
from surgery.data import load_data
from surgery.errors import SurgeryError
from surgery.models import LoadedModel
from surgery.tasks import finetune, train
from surgery.train import TrainConfig, distill_loss, fit, lr_at


def tiny_cnn(num_classes=10):
    torch.manual_seed(0)
    # Flatten keeps the layout: a digit is its shape, not its average texture.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(256, num_classes))


def loaded(model, size=16):
    return LoadedModel(model, (3, size, size), {"kind": "module", "class": "tests.tiny_cnn"})


FAST = dict(batch_size=32, progress=False, lr=0.05, deterministic=True)


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_distill_loss_is_zero_for_equal_logits_and_positive_otherwise():
    s = torch.randn(4, 10)
    assert distill_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(s, torch.randn(4, 10), 4.0).item() > 0.01


def test_fit_learns_digits_and_writes_history():
    data = load_data("digits", image_size=16, limit=320)
    model = tiny_cnn()
    history = fit(model, data, TrainConfig(epochs=3, **FAST))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] > 0.3  # chance is 0.1
    assert {"val_top5", "val_loss", "images_per_s", "lr"} <= set(history[0])


def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path):
    data = load_data("digits", image_size=16, limit=128)
    cfg = TrainConfig(epochs=3, **FAST)
    full = tiny_cnn()
    fit(full, data, cfg)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    part = tiny_cnn()
    with pytest.raises(SurgeryError, match="interrupted.*--resume"):
        fit(part, data, cfg, out_dir=tmp_path, on_epoch=stop_after_first)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["state"]["epoch"] == 1
    resumed = tiny_cnn()  # fresh weights: everything must come from the checkpoint
    history = fit(resumed, data, cfg, out_dir=tmp_path, resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_and_finetune_with_teacher_write_artifacts(tmp_path):
    base = train(loaded(tiny_cnn()), "digits", TrainConfig(epochs=1, **FAST), out=tmp_path / "base", limit=96,
                 keep_checkpoints=True)
    assert (tmp_path / "base" / "history.json").is_file()
    assert (tmp_path / "base" / "checkpoint" / "model.safetensors").is_file()
    # By default a finished run keeps its final weights only: the checkpoint (optimizer state) goes.
    train(loaded(tiny_cnn()), "digits", TrainConfig(epochs=1, **FAST), out=tmp_path / "lean", limit=96)
    assert sorted(p.name for p in (tmp_path / "lean").iterdir()) == [
        "curves.png", "history.json", "model.safetensors", "recipe.json", "report.json"]
    fused = surgery.apply(loaded(surgery.load(tmp_path / "base", base_model=tiny_cnn())), "fuse", measure=False)
    tuned = finetune(fused.as_loaded(), "digits", TrainConfig(epochs=1, **FAST), teacher=base.model,
                     out=tmp_path / "tuned", limit=96)
    history = json.loads((tmp_path / "tuned" / "history.json").read_text())
    assert history[0]["distill_loss"] > 0
    report = json.loads((tmp_path / "tuned" / "report.json").read_text())
    assert report["task"] == "finetune" and "val_top1" in report["before"]
    reloaded = surgery.load(tmp_path / "tuned", base_model=tiny_cnn())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), tuned.model(x), atol=1e-6)


def test_head_mismatch_says_what_to_do():
    with pytest.raises(SurgeryError, match="has 5 outputs but digits has 10 classes.*--num-classes 10"):
        train(loaded(tiny_cnn(num_classes=5)), "digits", TrainConfig(epochs=1, **FAST), limit=32)


def test_head_pass_gives_a_new_classifier_that_reloads(tmp_path):
    result = surgery.apply(tiny_cnn(num_classes=5), ["fuse", "head:num_classes=10"],
                           example_inputs=torch.randn(2, 3, 16, 16), measure=False)
    assert result.model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    result.save(tmp_path / "a")
    again = surgery.load(tmp_path / "a", base_model=tiny_cnn(num_classes=5))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))


def test_clip_grad_bounds_each_step():
    """clip_grad caps the global gradient norm: a first Nesterov SGD step moves the weights by at most
    lr x (1 + momentum) x NORM."""
    import copy

    import torch
    from torch import nn

    from surgery.data import load_data
    from surgery.train import TrainConfig, fit

    data = load_data("digits", image_size=8, limit=64)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    moved = {}
    for clip in (None, 1e-3):
        model = copy.deepcopy(start)
        cfg = TrainConfig(epochs=1, max_steps=1, batch_size=32, lr=0.5, momentum=0.9, weight_decay=0.0,
                          warmup_epochs=0.0, clip_grad=clip, progress=False, workers=0)
        fit(model, data, cfg)
        moved[clip] = torch.cat([(a - b).flatten() for a, b in zip(model.parameters(), start.parameters())]).norm()
    assert moved[1e-3] <= 0.5 * 1.9 * 1e-3 * 1.001 < moved[None] / 10
