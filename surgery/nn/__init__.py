"""Modules that passes insert into graphs (importable on their own, scriptable, exportable)."""

from .bilinear import (
    BilinearConv2d,
    BilinearProjection,
    factor_pair,
    kron_sum,
    nearest_kronecker,
    padded_size,
)

__all__ = ["BilinearProjection", "BilinearConv2d", "factor_pair", "padded_size", "nearest_kronecker", "kron_sum"]
