"""BilinearProjection / BilinearConv2d: equal to the dense layer they stand for, exact on Kronecker weights."""

import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.export import check_parity, export_onnx
from surgery.nn import BilinearConv2d, BilinearProjection, factor_pair, kron_sum, nearest_kronecker, padded_size

ATOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_factor_pair_and_padding():
    assert factor_pair(2048) == (32, 64)
    assert factor_pair(1000) == (25, 40)
    assert factor_pair(768) == (24, 32)
    assert factor_pair(997) == (1, 997)  # a prime degenerates: reported, not hidden
    assert padded_size(997) == 999 and factor_pair(999) == (27, 37)
    assert padded_size(2048) == 2048  # 32 x 64 is within the 2x ratio: no padding
    assert padded_size(10) == 12


@pytest.mark.parametrize("rank,scale,pad", [(1, 1, False), (3, 1, False), (2, 2, False), (2, 1, True)])
@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)], ids=["2d", "3d", "4d"])
def test_projection_equals_dense_layer_with_kron_weight(rank, scale, pad, lead):
    torch.manual_seed(0)
    n_in, n_out = (23, 31) if pad else (24, 30)
    layer = BilinearProjection(n_in, n_out, rank=rank, scale=scale, pad=pad)
    weight = layer.to_dense_weight()
    # to_dense_weight is sum_r kron(U_r, V_r), transposed to nn.Linear's (out, in) layout
    full = kron_sum(layer.U, layer.V).t()
    assert torch.equal(weight, full[: layer.out_features, :n_in])
    assert weight.shape == (n_out * scale**2, n_in)
    x = torch.randn(*lead, n_in, generator=_gen())
    with torch.no_grad():
        assert (layer(x) - F.linear(x, weight, layer.bias)).abs().max() <= ATOL


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (2, 2, 0, 1), (3, 1, "same", 2),
], ids=["1x1", "1x1-stride2", "3x3", "3x3-stride2", "2x2-stride2", "3x3-dilated-same"])
@pytest.mark.parametrize("rank", [1, 2])
def test_conv_equals_dense_conv_with_kron_kernel(kernel, stride, padding, dilation, rank):
    torch.manual_seed(0)
    conv = BilinearConv2d(12, 10, kernel, stride, padding, dilation, rank=rank)
    assert conv.pointwise == (kernel == 1)
    kernel_w = conv.weight()
    assert kernel_w.shape == (10, 12, kernel, kernel)
    assert torch.equal(kernel_w.reshape(10, -1), kron_sum(conv.U, conv.V).t()[:10, : 12 * kernel * kernel])
    x = torch.randn(2, 12, 9, 9, generator=_gen())
    with torch.no_grad():
        ref = F.conv2d(x, kernel_w, conv.bias, conv.stride, conv.padding, conv.dilation)
        assert (conv(x) - ref).abs().max() <= ATOL


def test_pointwise_conv_with_padded_channels():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pad=True: no degenerate-size warning
        conv = BilinearConv2d(13, 11, 1, pad=True)
    assert conv.in_pad > 0 and not conv.degenerate
    x = torch.randn(2, 13, 5, 5, generator=_gen())
    with torch.no_grad():
        assert (conv(x) - F.conv2d(x, conv.weight(), conv.bias)).abs().max() <= ATOL


@pytest.mark.parametrize("in_shape,out_shape,rank", [((4, 6), (5, 3), 1), ((4, 6), (5, 3), 3), ((32, 64), (25, 40), 2)],
                         ids=["small-rank1", "small-rank3", "randomized-svd-rank2"])
def test_nearest_kronecker_recovers_kronecker_structured_weight(in_shape, out_shape, rank):
    (d1, d2), (u1, u2) = in_shape, out_shape
    g = _gen(1)
    weight = kron_sum(torch.randn(rank, d1, u1, generator=g), torch.randn(rank, d2, u2, generator=g)).t()
    U, V, rel = nearest_kronecker(weight, in_shape, out_shape, rank)
    assert U.shape == (rank, d1, u1) and V.shape == (rank, d2, u2)
    assert rel <= 1e-5
    assert (kron_sum(U, V).t() - weight).abs().max() <= ATOL * weight.abs().max()


def test_from_linear_reproduces_a_kronecker_layer():
    g = _gen(2)
    linear = nn.Linear(24, 30)
    with torch.no_grad():
        linear.weight.copy_(kron_sum(torch.randn(2, 4, 5, generator=g), torch.randn(2, 6, 6, generator=g)).t())
    layer = BilinearProjection.from_linear(linear, rank=2)
    assert layer.approx_error <= 1e-5
    x = torch.randn(3, 24, generator=g)
    with torch.no_grad():
        assert (layer(x) - linear(x)).abs().max() <= ATOL
    # rank 1 cannot hold a rank-2 weight: a real, reported error
    assert BilinearProjection.from_linear(linear, rank=1).approx_error > 1e-2


def test_scaled_layer_keeps_the_unscaled_outputs_at_output_index():
    torch.manual_seed(0)
    linear = nn.Linear(24, 30)
    base = BilinearProjection.from_linear(linear, rank=2)
    wide = BilinearProjection.from_linear(linear, rank=2, scale=2)
    assert wide.out_features == 4 * 30 and wide.out_shape == (10, 12)
    assert wide.approx_error == pytest.approx(base.approx_error)
    x = torch.randn(3, 24, generator=_gen())
    with torch.no_grad():
        assert (wide(x)[:, wide.output_index()] - base(x)).abs().max() <= ATOL
    params = sum(p.numel() for p in wide.parameters()) - wide.out_features
    assert params == 2 * (sum(p.numel() for p in base.parameters()) - base.out_features)  # about s times


def test_prime_sizes_are_reported_and_pad_fixes_them():
    with pytest.warns(UserWarning, match="prime"):
        layer = BilinearProjection(13, 7)
    assert layer.degenerate == ["in", "out"] and layer.in_shape == (1, 13)
    assert "degenerate=in+out" in repr(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        padded = BilinearProjection(13, 7, pad=True)
    assert padded.degenerate == [] and padded.in_shape == (3, 5) and padded.in_pad == 2
    x = torch.randn(4, 13, generator=_gen())
    with torch.no_grad():
        assert padded(x).shape == (4, 7)
        assert (padded(x) - F.linear(x, padded.to_dense_weight(), padded.bias)).abs().max() <= ATOL


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BilinearProjection(24, 30, rank=0)
    with pytest.raises(ValueError, match="scale"):
        BilinearProjection(24, 30, scale=0)
    with pytest.raises(ValueError, match="in_shape"):
        BilinearProjection(24, 30, in_shape=(4, 5))
    with pytest.raises(ValueError, match="asymmetric"):
        BilinearConv2d(4, 4, 2, padding="same")


def test_layers_train_trace_and_script():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 24)
    layer = BilinearProjection(24, 30, rank=2)
    layer(x).square().sum().backward()
    assert layer.U.grad is not None and layer.V.grad.abs().sum() > 0
    for module, inp in ((layer, x), (BilinearConv2d(12, 10, 1, 2, rank=2), torch.randn(2, 12, 6, 6)),
                        (BilinearConv2d(12, 10, 3, padding=1), torch.randn(2, 12, 6, 6))):
        module.eval()
        with torch.no_grad():
            ref = module(inp)
            assert torch.equal(torch.fx.symbolic_trace(module)(inp), ref)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
                scripted = torch.jit.script(module)
            assert (scripted(inp) - ref).abs().max() <= ATOL


def test_projection_exports_to_matmuls_without_a_dense_matrix(tmp_path):
    torch.manual_seed(0)
    layer = BilinearProjection(768, 1024, rank=2).eval()
    path = export_onnx(layer, torch.randn(2, 5, 768), tmp_path / "layer.onnx")
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMul" in ops and not ops & {"Einsum", "Gemm"}
    largest = max(int(torch.tensor(list(t.dims)).prod()) for t in proto.graph.initializer)
    assert largest < 768 * 1024 // 100  # the factors, never the 768 x 1024 weight
    assert check_parity(layer, path, (5, 768))["ok"]
