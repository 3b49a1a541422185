"""Run by tests/test_ddp.py under torchrun (and once in-process): a few steps on digits."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from surgery.data import load_data
from surgery.train import TrainConfig, fit, setup_distributed


def model() -> nn.Module:
    # No BatchNorm (per-rank statistics) and no dropout (per-rank RNG): DDP must then match one process.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 10))


def run(out: Path) -> dict:
    d = setup_distributed()
    data = load_data("digits", image_size=16, limit=128)
    data.train.dataset.transform = data.val.dataset.transform  # no random augmentation
    net = model()
    fit(net, data, TrainConfig(epochs=2, batch_size=32, lr=0.05, progress=False), out_dir=out / f"run{d.rank}")
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    state = run(out)
    rank = setup_distributed().rank
    save_file(state, str(out / f"rank{rank}.safetensors"))
