"""A model's weights as safetensors: written as contiguous copies with tied tensors once, read
back with the ties filled in from the model that receives them. Never pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Every state-dict tensor as a contiguous CPU copy; a tensor under several names (tied) once.

    Copies, because a traced constant or a sliced parameter may be a view of a larger storage
    (transposed, strided, expanded), which safetensors refuses to write as it is.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and alias in seen:
            continue
        seen.add(alias)
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def fill_ties(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor :func:`save_weights` stored once given to all of its names in ``model``."""
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            for other, t in own.items():
                if other in state and t.data_ptr() == tensor.data_ptr() and t.shape == tensor.shape:
                    state[key] = state[other]
                    break
    return state
