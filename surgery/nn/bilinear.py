"""Bilinear projections: a dense layer whose weight is a sum of Kronecker products.

Yu, Gao, Zhou, Zhang, "Parameter Efficient Deep Neural Networks with Bilinear
Projections" (TNNLS 2021, arXiv 2011.01391). The input vector x of length D is
reshaped row-major to a d1 x d2 matrix X, and

    Y = sum_r U_r^T X V_r,   y = vec(Y) + b   (row-major vec)

with U_r of shape d1 x u1 and V_r of shape d2 x u2. This is the dense layer
``y = x @ M + b`` with ``M = sum_r kron(U_r, V_r)`` (D x K), so in nn.Linear's
(out, in) convention the weight is ``M.T`` (:meth:`BilinearProjection.to_dense_weight`).
Parameters: r (d1 u1 + d2 u2) + K instead of D K + K.

Conventions (ours where the paper is silent):

* d1 is the largest divisor of D not above sqrt(D) (:func:`factor_pair`); a prime D
  gives d1 = 1, which is reported (:attr:`BilinearProjection.degenerate`, a warning),
  never hidden. ``pad=True`` pads D (and K) to the nearest size whose factors are
  within 2x of each other (:func:`padded_size`): zero input features in, surplus
  outputs sliced off.
* Parameters are stored in the paper's layout: ``U`` (r, d1, u1), ``V`` (r, d2, u2).
* Forward: two matmuls (``X @ V`` as one GEMM over all rows, then ``U^T @ .``
  batched), never the dense D x K matrix. On this project's CPU and in ONNX Runtime
  MatMul beat Einsum (see benchmarks/bilinear_layer.py and docs/bilinear.md).
* k x k convolutions (:class:`BilinearConv2d`) use patches in PyTorch's weight order
  (Cin, kh, kw), not TensorFlow's (kh, kw, Cin); their forward builds the dense
  kernel from U and V (K Cin kh kw values) and calls ``F.conv2d``: fewer parameters,
  the same FLOPs as the dense convolution. 1x1 convolutions contract over channels
  with two matmuls on the channels-first input (fewer FLOPs too).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BilinearProjection", "BilinearConv2d", "factor_pair", "padded_size", "nearest_kronecker",
    "kron_sum", "PAD_MAX_RATIO",
]

# pad=True pads a size until its factor pair (d1, d2) has d2 / d1 <= PAD_MAX_RATIO. At
# ratio 2, d1 + d2 is within 6% of its minimum 2 sqrt(D), and the padding stays small.
PAD_MAX_RATIO = 2.0
# nearest_kronecker: exact SVD up to this smaller side of the rearranged matrix, randomized
# subspace iteration above (a full SVD of an 800 x 2560 matrix takes seconds on a small CPU).
EXACT_SVD_MAX = 128
SVD_OVERSAMPLE = 16
SVD_POWER_ITERS = 4  # within 2e-4 of the optimal error on random weights, exact on structured ones

Init = Literal["kron-svd", "random"]


def factor_pair(n: int) -> tuple[int, int]:
    """(d1, d2) with d1 * d2 == n and d1 the largest divisor of n not above sqrt(n)."""
    if n < 1:
        raise ValueError(f"cannot factor {n}: sizes must be positive")
    d = math.isqrt(n)
    while n % d:
        d -= 1
    return d, n // d


def padded_size(n: int, max_ratio: float = PAD_MAX_RATIO) -> int:
    """The smallest m >= n whose factor pair (d1, d2) has d2 / d1 <= ``max_ratio``."""
    m = n
    while True:
        d1, d2 = factor_pair(m)
        if d2 <= max_ratio * d1:
            return m
        m += 1


def _grid(n: int, shape: tuple[int, int] | list[int] | None, pad: bool, what: str) -> tuple[int, int]:
    if shape is not None:
        a, b = (int(s) for s in shape)
        if a < 1 or b < 1 or a * b < n:
            raise ValueError(f"{what} {tuple(shape)} must be positive and hold {n} features")
        return a, b
    return factor_pair(padded_size(n) if pad else n)


def kron_sum(U: Tensor, V: Tensor) -> Tensor:
    """sum_r kron(U_r, V_r): (r, d1, u1) and (r, d2, u2) -> (d1 d2, u1 u2)."""
    return _linear_weight(U, V).t()


def _linear_weight(U: Tensor, V: Tensor) -> Tensor:
    """(sum_r kron(U_r, V_r))^T, the (u1 u2, d1 d2) weight in nn.Linear's layout.

    One rank-r GEMM gives the rearranged matrix R = sum_r vec(U_r) vec(V_r)^T, one
    permute turns it into the weight: cheaper than a broadcast multiply and sum.
    """
    r, d1, u1, d2, u2 = U.shape[0], U.shape[1], U.shape[2], V.shape[1], V.shape[2]
    R = torch.matmul(U.reshape(r, d1 * u1).t(), V.reshape(r, d2 * u2))  # rows (i, a), columns (j, b)
    return R.reshape(d1, u1, d2, u2).permute(1, 3, 0, 2).reshape(u1 * u2, d1 * d2)


def _top_svd(R: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Leading k singular triplets of R (float64): exact for small R, randomized above."""
    m, n = R.shape
    if min(m, n) <= EXACT_SVD_MAX or k + SVD_OVERSAMPLE >= min(m, n):
        P, S, Qh = torch.linalg.svd(R, full_matrices=False)
        return P[:, :k], S[:k], Qh[:k]
    # Halko, Martinsson, Tropp (2011), algorithm 4.4: subspace iteration, re-orthonormalised.
    g = torch.Generator().manual_seed(seed)
    q = k + SVD_OVERSAMPLE
    Q, _ = torch.linalg.qr(R @ torch.randn(n, q, generator=g, dtype=R.dtype))
    for _ in range(SVD_POWER_ITERS):
        Z, _ = torch.linalg.qr(R.T @ Q)
        Q, _ = torch.linalg.qr(R @ Z)
    Ub, S, Qh = torch.linalg.svd(Q.T @ R, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Qh[:k]


def nearest_kronecker(
    weight: Tensor,
    in_shape: tuple[int, int],
    out_shape: tuple[int, int],
    rank: int = 1,
    *,
    seed: int = 0,
) -> tuple[Tensor, Tensor, float]:
    """The sum of ``rank`` Kronecker products nearest to a dense weight (Frobenius norm).

    ``weight`` is (K, D) as in nn.Linear, with D = d1 d2 (``in_shape``) and K = u1 u2
    (``out_shape``); zero-pad it first for padded grids. Van Loan and Pitsianis (1993):
    the rearrangement R(M) of M = weight.T, with R(kron(U, V)) = vec(U) vec(V)^T, turns
    the problem into a rank-``rank`` SVD of R(M). Singular values are split as sqrt
    between the factors so that U and V have equal norms. Returns U (rank, d1, u1),
    V (rank, d2, u2) in the weight's dtype, and ||W - W_hat||_F / ||W||_F.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    (d1, d2), (u1, u2) = in_shape, out_shape
    if tuple(weight.shape) != (u1 * u2, d1 * d2):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match grids {in_shape} -> {out_shape}; "
                         f"expected ({u1 * u2}, {d1 * d2})")
    # float64 on the CPU: exact enough for the 1e-5 recovery, and the same result on any device.
    M = weight.detach().to("cpu", torch.float64).t()  # (D, K): rows (i, j), columns (a, b)
    R = M.reshape(d1, d2, u1, u2).permute(0, 2, 1, 3).reshape(d1 * u1, d2 * u2)
    k = min(rank, d1 * u1, d2 * u2)
    P, S, Qh = _top_svd(R, k, seed)
    root = S.clamp_min(0).sqrt()
    U = torch.zeros(rank, d1, u1, dtype=torch.float64)
    V = torch.zeros(rank, d2, u2, dtype=torch.float64)
    U[:k] = (P * root).t().reshape(k, d1, u1)
    V[:k] = (Qh * root[:, None]).reshape(k, d2, u2)
    # The truncated SVD projects R onto span(P): ||R - R_k||^2 = ||R||^2 - sum_k s^2, exactly.
    norm2 = R.square().sum().item()
    rel = math.sqrt(max(norm2 - S.square().sum().item(), 0.0) / norm2) if norm2 > 0 else 0.0
    return U.to(weight.device, weight.dtype), V.to(weight.device, weight.dtype), rel


def _block_error(weight: Tensor, approx: Tensor) -> float:
    """||W - W_hat||_F / ||W||_F in float64 (0 for a zero weight)."""
    ref = weight.detach().double()
    norm = torch.linalg.matrix_norm(ref).item()
    return torch.linalg.matrix_norm(ref - approx.detach().double()).item() / norm if norm > 0 else 0.0


def _degenerate(d1: int, n_in: int, u1: int, n_out: int) -> list[str]:
    out = []
    if d1 == 1 and n_in > 1:
        out.append("in")
    if u1 == 1 and n_out > 1:
        out.append("out")
    return out


class _KroneckerFactors(nn.Module):
    """Shared parameters and helpers of the bilinear layers: U (r, d1, o1), V (r, d2, o2)."""

    def _make_factors(self, rank: int, in_grid: tuple[int, int], out_grid: tuple[int, int],
                      factory: dict) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.d1, self.d2 = in_grid
        self.o1, self.o2 = out_grid
        self.U = nn.Parameter(torch.empty(self.rank, self.d1, self.o1, **factory))
        self.V = nn.Parameter(torch.empty(self.rank, self.d2, self.o2, **factory))

    def _reset_factors(self) -> None:
        # LeCun-normal on the effective dense weight (variance 1 / D), split evenly between
        # U and V: Var(W) = r Var(U) Var(V) = 1 / (d1 d2).
        std_u = (self.d1 * math.sqrt(self.rank)) ** -0.5
        std_v = (self.d2 * math.sqrt(self.rank)) ** -0.5
        nn.init.normal_(self.U, 0.0, std_u)
        nn.init.normal_(self.V, 0.0, std_v)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(u, v) for the forward: u (o1, d1 r) and v (d2, r o2); views when r == 1."""
        if self.rank == 1:
            return self.U[0].t(), self.V[0]
        u = self.U.permute(2, 1, 0).reshape(self.o1, self.d1 * self.rank)
        v = self.V.permute(1, 0, 2).reshape(self.d2, self.rank * self.o2)
        return u, v

    @property
    def in_shape(self) -> tuple[int, int]:
        return self.d1, self.d2

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.o1, self.o2

    def _grid_weight(self) -> Tensor:
        """(o1 o2, d1 d2): the dense weight of the whole (padded) grid, nn.Linear layout."""
        return _linear_weight(self.U, self.V)


class BilinearProjection(_KroneckerFactors):
    """Drop-in for nn.Linear: ``y = vec(sum_r U_r^T X V_r) + b`` on the last dimension.

    ``in_features`` D is reshaped to (d1, d2), ``out_features`` K to (u1, u2) (see
    :func:`factor_pair`; ``in_shape`` / ``out_shape`` override). ``scale`` s widens the
    output grid to (s u1, s u2): the layer then yields s^2 K outputs (all of the padded
    grid when padded) at about s times the parameters; :meth:`output_index` tells where
    the K unscaled outputs sit among them. Works on any leading shape: (B, D),
    (B, N, D), (B, H, W, D), (D,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 1,
        scale: int = 1,
        bias: bool = True,
        pad: bool = False,
        *,
        in_shape: tuple[int, int] | None = None,
        out_shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"features must be positive, got {in_features} -> {out_features}")
        if scale < 1:
            raise ValueError(f"scale must be at least 1, got {scale}")
        d1, d2 = _grid(in_features, in_shape, pad, "in_shape")
        u1, u2 = _grid(out_features, out_shape, pad, "out_shape")
        self.in_features = int(in_features)
        self.base_out_features = int(out_features)
        self.base_out_shape = (u1, u2)
        self.scale = int(scale)
        self._make_factors(rank, (d1, d2), (u1 * scale, u2 * scale), {"device": device, "dtype": dtype})
        self.in_pad = d1 * d2 - in_features
        # At scale 1 the padded grid is sliced back to K; a scaled grid is kept whole.
        self.out_features = int(out_features) if scale == 1 else self.o1 * self.o2
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.degenerate = _degenerate(d1, in_features, u1, out_features)
        if self.degenerate and in_shape is None and out_shape is None:
            sizes = " and ".join(f"{w}_features={n} (a prime: d1 = 1)" for w, n in
                                 (("in", in_features), ("out", out_features)) if w in self.degenerate)
            warnings.warn(f"BilinearProjection: {sizes} degenerates to an almost dense factor; "
                          "pass pad=True to pad it to a size that factors well", stacklevel=2)
        self.approx_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_factors()
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.in_pad > 0:
            x = F.pad(x, [0, self.in_pad])
        u, v = self._factors()
        z = torch.matmul(x.unflatten(-1, [self.d1, self.d2]), v)  # (..., d1, r o2): one GEMM
        if self.rank > 1:
            z = z.unflatten(-1, [self.rank, self.o2]).flatten(-3, -2)  # (..., d1 r, o2), a view
        y = torch.matmul(u, z).flatten(-2)  # (..., o1 o2)
        if self.out_features < self.o1 * self.o2:
            y = y[..., : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y

    def to_dense_weight(self) -> Tensor:
        """The equivalent nn.Linear weight (out_features, in_features) = (sum_r kron(U_r, V_r))^T."""
        return self._grid_weight()[: self.out_features, : self.in_features]

    def output_index(self) -> Tensor:
        """Where each of the K unscaled outputs sits in this layer's output (identity at scale 1)."""
        k = torch.arange(self.base_out_features)
        u2 = self.base_out_shape[1]
        return (k // u2) * self.o2 + k % u2

    @torch.no_grad()
    def init_from_dense(self, weight: Tensor, bias: Tensor | None = None, *, seed: int = 0) -> float:
        """Set U, V (and the bias) to the nearest rank-r Kronecker sum of a dense (K, D) weight.

        With scale s > 1 the unscaled factors fill the top-left (u1, u2) block of the
        output grid, so the K original outputs come out at :meth:`output_index` unchanged;
        the rest of U and V keeps its random values and the extra outputs a zero bias.
        Returns the relative approximation error ||W - W_hat||_F / ||W||_F.
        """
        K, D = self.base_out_features, self.in_features
        if tuple(weight.shape) != (K, D):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a {D} -> {K} layer")
        (u1, u2), (d1, d2) = self.base_out_shape, self.in_shape
        padded = weight.new_zeros(u1 * u2, d1 * d2)
        padded[:K, :D] = weight
        U, V, err = nearest_kronecker(padded, (d1, d2), (u1, u2), self.rank, seed=seed)
        self.U[:, :, :u1] = U.to(self.U)
        self.V[:, :, :u2] = V.to(self.V)
        if self.bias is not None:
            self.bias.zero_()
            if bias is not None:
                self.bias[self.output_index()] = bias.to(self.bias)
        if padded.shape != weight.shape:  # the error that counts is on the real block, not the padding
            err = _block_error(weight, _linear_weight(U, V)[:K, :D])
        self.approx_error = err
        return err

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 1, scale: int = 1, pad: bool = False, *,
                    init: Init = "kron-svd", in_shape: tuple[int, int] | None = None,
                    out_shape: tuple[int, int] | None = None) -> BilinearProjection:
        """A bilinear layer in place of ``linear``; ``init="kron-svd"`` approximates its weight."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, scale, linear.bias is not None, pad,
                    in_shape=in_shape, out_shape=out_shape, device=w.device, dtype=w.dtype)
        if init == "kron-svd":
            layer.init_from_dense(w, linear.bias)
        elif init != "random":
            raise ValueError(f"init must be 'kron-svd' or 'random', got {init!r}")
        return layer

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
             f"grid=({self.d1}x{self.d2})->({self.o1}x{self.o2})")
        if self.scale > 1:
            s += f", scale={self.scale}"
        if self.in_pad:
            s += f", in_pad={self.in_pad}"
        if self.degenerate:
            s += f", degenerate={'+'.join(self.degenerate)}"
        return s + f", bias={self.bias is not None}"


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = (int(x) for x in v)
    return a, b


def _conv_padding(padding: int | tuple[int, int] | str, kernel: tuple[int, int],
                  dilation: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1")
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} is asymmetric; "
                             "give explicit padding")
        return total[0] // 2, total[1] // 2
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair(padding)


class BilinearConv2d(_KroneckerFactors):
    """Drop-in for nn.Conv2d (groups 1, zero padding) with a Kronecker-sum weight.

    A patch of D = Cin kh kw values (PyTorch's weight order) is the bilinear layer's
    input, the Cout output channels its output. 1x1 kernels without padding contract
    the channels-first input directly (two matmuls, no permute of the activations;
    a stride is a subsampling first); larger kernels build the dense kernel from U and V
    and call ``F.conv2d`` (same FLOPs as the dense conv, fewer parameters).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        rank: int = 1,
        bias: bool = True,
        pad: bool = False,
        *,
        in_shape: tuple[int, int] | None = None,
        out_shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _conv_padding(padding, self.kernel_size, self.dilation, self.stride)
        kh, kw = self.kernel_size
        self.in_features = in_channels * kh * kw
        self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        d1, d2 = _grid(self.in_features, in_shape, pad, "in_shape")
        u1, u2 = _grid(out_channels, out_shape, pad, "out_shape")
        self._make_factors(rank, (d1, d2), (u1, u2), {"device": device, "dtype": dtype})
        self.in_pad = d1 * d2 - self.in_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.degenerate = _degenerate(d1, self.in_features, u1, out_channels)
        if self.degenerate and in_shape is None and out_shape is None:
            warnings.warn(f"BilinearConv2d: a {'+'.join(self.degenerate)} size is prime (d1 = 1); "
                          "pass pad=True to pad it to a size that factors well", stacklevel=2)
        self.approx_error: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_factors()
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def weight(self) -> Tensor:
        """The equivalent dense kernel (Cout, Cin, kh, kw)."""
        kh, kw = self.kernel_size
        w = self._grid_weight()[: self.out_channels, : self.in_features]
        return w.reshape(self.out_channels, self.in_channels, kh, kw)

    def to_dense_weight(self) -> Tensor:
        """The equivalent weight as a (Cout, Cin kh kw) matrix."""
        return self._grid_weight()[: self.out_channels, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        if not self.pointwise:
            return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)
        if self.stride[0] > 1 or self.stride[1] > 1:
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        if self.in_pad > 0:
            x = F.pad(x, [0, 0, 0, 0, 0, self.in_pad])
        h, w = x.shape[-2], x.shape[-1]
        u, v = self._factors()
        # (B, d1, d2, HW) -> contract d2: (B, d1, r o2, HW)
        z = torch.matmul(v.t(), x.unflatten(1, [self.d1, self.d2]).flatten(3))
        if self.rank > 1:
            z = z.unflatten(2, [self.rank, self.o2]).flatten(1, 2)  # (B, d1 r, o2, HW)
        y = torch.matmul(u, z.flatten(2))  # (B, o1, o2 HW)
        y = y.reshape(y.shape[0], self.o1 * self.o2, h, w)
        if self.out_channels < self.o1 * self.o2:
            y = y[:, : self.out_channels]
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    @torch.no_grad()
    def init_from_dense(self, weight: Tensor, bias: Tensor | None = None, *, seed: int = 0) -> float:
        """Set U, V (and the bias) from a dense kernel (Cout, Cin, kh, kw) or (Cout, D) matrix."""
        w = weight.reshape(self.out_channels, -1)
        if w.shape[1] != self.in_features:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit {self.in_features} inputs")
        (d1, d2), (u1, u2) = self.in_shape, self.out_shape
        padded = w.new_zeros(u1 * u2, d1 * d2)
        padded[: self.out_channels, : self.in_features] = w
        U, V, err = nearest_kronecker(padded, (d1, d2), (u1, u2), self.rank, seed=seed)
        self.U.copy_(U)
        self.V.copy_(V)
        if self.bias is not None:
            self.bias.zero_()
            if bias is not None:
                self.bias.copy_(bias)
        if padded.shape != w.shape:
            err = _block_error(w, self.to_dense_weight())
        self.approx_error = err
        return err

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int = 1, pad: bool = False, *, init: Init = "kron-svd",
                  in_shape: tuple[int, int] | None = None,
                  out_shape: tuple[int, int] | None = None) -> BilinearConv2d:
        """A bilinear conv in place of ``conv`` (groups 1, zero padding)."""
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("BilinearConv2d replaces convolutions with groups=1 and zero padding only")
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, rank, conv.bias is not None, pad, in_shape=in_shape, out_shape=out_shape,
                    device=w.device, dtype=w.dtype)
        if init == "kron-svd":
            layer.init_from_dense(w, conv.bias)
        elif init != "random":
            raise ValueError(f"init must be 'kron-svd' or 'random', got {init!r}")
        return layer

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, rank={self.rank}, "
             f"grid=({self.d1}x{self.d2})->({self.o1}x{self.o2})")
        if self.in_pad:
            s += f", in_pad={self.in_pad}"
        if self.degenerate:
            s += f", degenerate={'+'.join(self.degenerate)}"
        return s + f", bias={self.bias is not None}"
