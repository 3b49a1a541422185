"""A model's example inputs: one float batch (B, ...) or several, and the sample shapes that describe them.

``input_size`` throughout surgery is one sample's shape, ``(C, H, W)`` or ``(F,)``, for a model of
one input, and a tuple of such shapes, ``((C, H, W), (F,))``, for a model of several. Recipes store
it as a list of ints or a list of lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Shape = tuple[int, ...]
InputSize = Shape | tuple[Shape, ...]


def is_several(input_size: Any) -> bool:
    """Whether ``input_size`` lists several inputs' shapes (a sequence of sequences)."""
    return bool(input_size) and all(isinstance(s, Sequence) and not isinstance(s, str) for s in input_size)


def sample_shapes(input_size: Any) -> tuple[Shape, ...]:
    """Each input's sample shape: ``(3, 32, 32)`` -> ``((3, 32, 32),)``; several stay several."""
    if is_several(input_size):
        return tuple(tuple(int(d) for d in s) for s in input_size)
    return (tuple(int(d) for d in input_size),)


def normalize(input_size: Any) -> InputSize:
    """Tuples all the way down: a shape for one input, a tuple of shapes for several."""
    shapes = sample_shapes(input_size)
    return shapes if is_several(input_size) else shapes[0]


def as_json(input_size: Any) -> list:
    """The recipe's form: a list of ints, or a list of lists for several inputs."""
    shapes = [list(s) for s in sample_shapes(input_size)]
    return shapes if is_several(input_size) else shapes[0]


def as_tuple(inputs: Any) -> tuple:
    """A forward's positional inputs: one tensor becomes a 1-tuple."""
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def size_of(inputs: Any) -> InputSize:
    """The input size that example ``inputs`` (a tensor, or a tuple of tensors) have; a 1-tuple is one input."""
    tensors = as_tuple(inputs)
    if len(tensors) == 1:
        return tuple(tensors[0].shape[1:])
    return tuple(tuple(t.shape[1:]) for t in tensors)


def batch_of(inputs: Any) -> int:
    return int(as_tuple(inputs)[0].shape[0])


def random_inputs(input_size: Any, batch: int, generator: torch.Generator | int = 0) -> Any:
    """Seeded normal inputs of ``batch`` samples: a tensor for one input, a tuple for several.

    One input draws exactly what ``torch.randn(batch, *size, generator=Generator().manual_seed(seed))`` does.
    """
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    tensors = tuple(torch.randn(batch, *s, generator=g) for s in sample_shapes(input_size))
    return tensors if is_several(input_size) else tensors[0]


def first_rows(inputs: Any, n: int = 1) -> Any:
    """The first ``n`` samples of every input (a tensor stays a tensor)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n]
    return tuple(t[:n] for t in inputs)


def describe(input_size: Any) -> str:
    """3x224x224, or 3x32x32 + 8 for several inputs."""
    return " + ".join("x".join(map(str, s)) for s in sample_shapes(input_size))


def check_example_inputs(example_inputs: Any, error: type[Exception]) -> None:
    """One float batch tensor (B, ...), or a tuple of them with the same batch; else ``error`` in one line."""
    tensors = as_tuple(example_inputs) if isinstance(example_inputs, (torch.Tensor, tuple, list)) else ()
    ok = bool(tensors) and all(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.is_floating_point()
                               for t in tensors)
    if ok and len({t.shape[0] for t in tensors}) == 1:
        return
    raise error("example_inputs must be a float batch tensor (B, ...) or a tuple of them with one batch size: "
                "(B, C, H, W) for an image model, (B, F) for an MLP, (image, features) for a model of two inputs")
