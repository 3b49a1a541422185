"""Pass `rescale`: the kernel rule on numbers and a real photo, then the pass on four timm families."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.errors import SurgeryError
from surgery.export import check_parity, export_onnx
from surgery.graph import compare_outputs
from surgery.passes.rescale import RescaleConfig, new_kernel_size, resample_kernel

# Measured on this rule (bicubic, antialiased when shrinking, sum kept); the tests hold them.
ROUND_TRIP_7_3_7 = 0.20  # Gaussian sigma=2: shrink 7->3, grow 3->7: max error / max tap (measured 0.146)
ROUND_TRIP_5_3_5 = 0.15  # Gaussian sigma=1.5 on 5x5 (measured 0.129)
ROUND_TRIP_7_5_7 = 0.05  # Gaussian sigma=1.5, a milder factor (measured 0.042)
PHOTO_SMOOTH = 0.02  # relative L2 error on china.jpg, Gaussian sigma=1.5 (measured 0.009)
PHOTO_EDGE = 0.30  # derivative-of-Gaussian edge kernel (measured 0.232; the unresized 7x7 gives 0.640)
RELOAD_ATOL = 1e-6


def gaussian(k: int, sigma: float, derivative: bool = False) -> torch.Tensor:
    u = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    g = torch.exp(-u ** 2 / (2 * sigma ** 2))
    kernel = g[:, None] * ((-u * g) if derivative else g)[None]
    return kernel / kernel.abs().sum()


# --- the size rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("k0, ratio, kwargs, expected", [
    (7, 0.5, {}, 3), (5, 0.5, {}, 3), (3, 0.5, {}, 3), (1, 0.5, {}, 1), (1, 2.0, {}, 1),
    (3, 0.5, {"min_kernel": 0}, 1),  # asked for: a 3x3 may become 1x1
    (7, 0.25, {}, 3),  # 1.75 -> 1x1 would be <= min_kernel: clamped to 3, not kept at 7
    (2, 0.5, {}, 2),  # never grown by the clamp
    (7, 0.5, {"odd": False}, 4), (3, 2.0, {}, 5), (3, 2.0, {"odd": False}, 6),
    (4, 1.0, {}, 4),  # a cumulative factor of 1 is the source size, even for even kernels
    (7, 3 / 7 * 7 / 3, {}, 7),
])
def test_new_kernel_size(k0, ratio, kwargs, expected):
    assert new_kernel_size(k0, ratio, **kwargs) == expected


def test_config_is_checked():
    with pytest.raises(SurgeryError, match="factor must be a positive"):
        surgery.apply(nn.Conv2d(3, 4, 3), ["rescale:factor=0"], example_inputs=torch.randn(1, 3, 8, 8))
    with pytest.raises(SurgeryError, match="min_kernel must be >= 0"):
        surgery.apply(nn.Conv2d(3, 4, 3), ["rescale:min_kernel=-1"], example_inputs=torch.randn(1, 3, 8, 8))


# --- the kernel rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area"])
@pytest.mark.parametrize("size", [(3, 3), (5, 3), (11, 11)])
def test_resampled_kernel_keeps_its_sum(mode, size):
    w = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(0))
    out = resample_kernel(w, size, mode)
    assert out.shape == (8, 4, *size)
    torch.testing.assert_close(out.sum((2, 3)), w.sum((2, 3)), atol=1e-5, rtol=1e-5)


def test_area_factor_alone_keeps_a_flat_kernel():
    """Without the exact correction, the rule is interpolate * (K_old/K_new)^2: exact on a flat kernel."""
    w = torch.full((1, 1, 7, 7), 0.5)
    out = resample_kernel(w, (3, 3), "bilinear", keep_sum=False)
    torch.testing.assert_close(out, torch.full((1, 1, 3, 3), 0.5 * 49 / 9))


@pytest.mark.parametrize("k0, k1, sigma, tol", [(7, 3, 2.0, ROUND_TRIP_7_3_7), (5, 3, 1.5, ROUND_TRIP_5_3_5),
                                                 (7, 5, 1.5, ROUND_TRIP_7_5_7)])
def test_shrink_then_grow_returns_a_smooth_kernel(k0, k1, sigma, tol):
    k = gaussian(k0, sigma)[None, None]
    back = resample_kernel(resample_kernel(k, (k1, k1), "bicubic"), (k0, k0), "bicubic")
    assert (back - k).abs().max() / k.abs().max() < tol


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_images

    img = torch.from_numpy(load_sample_images().images[0].copy()).float().mean(-1) / 255  # china.jpg, 427x640
    return img[None, None]


@pytest.mark.parametrize("derivative, tol", [(False, PHOTO_SMOOTH), (True, PHOTO_EDGE)])
def test_shrunk_kernel_on_the_shrunk_photo_approximates_the_shrunk_response(photo, derivative, tol):
    """conv(down(x), shrink(k)) ~ down(conv(x, k)): the scaling property the method relies on."""
    k7 = gaussian(7, 1.5, derivative)[None, None]
    k3 = resample_kernel(k7, (3, 3), "bicubic")

    def down(t):
        return F.avg_pool2d(t, 2)

    target = down(F.conv2d(photo, k7, padding=3))[..., 4:-4, 4:-4]  # borders: padding differs
    rescaled = F.conv2d(down(photo), k3, padding=1)[..., 4:-4, 4:-4]
    unresized = F.conv2d(down(photo), k7, padding=3)[..., 4:-4, 4:-4]
    err = ((rescaled - target).norm() / target.norm()).item()
    assert err < tol
    assert err < ((unresized - target).norm() / target.norm()).item()  # better than not rescaling


# --- the pass on graphs ------------------------------------------------------------------------------


class PoolNet(nn.Module):
    """A 5x5 'same' conv, a 2x2/2 max pool, and an average pool over the whole 8x8 map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AvgPool2d(8)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.gap(self.pool(self.conv(x))).flatten(1))


def test_fixed_windows_follow_and_the_plan_says_so():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = surgery.apply(PoolNet().eval(), ["rescale:factor=0.5"], example_inputs=x, measure=False)
    gm = result.model
    assert result.input_size == (3, 8, 8)
    assert gm.conv.kernel_size == (3, 3) and gm.conv.padding == (1, 1)
    assert gm.pool.kernel_size == 2  # a patchify window stays
    assert gm.gap.kernel_size == (4, 4)  # the whole map, at the new size
    assert gm(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    plan = result.recipe["passes"][0]["plan"]
    assert plan["input_size"] == [3, 8, 8]
    assert plan["layers"]["conv"] == {"type": "Conv2d", "kernel": [5, 5], "padding": [2, 2], "stride": [1, 1],
                                      "new_kernel": [3, 3], "new_padding": [1, 1], "new_stride": [1, 1]}


def test_what_cannot_follow_is_refused_naming_the_module():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(SurgeryError, match=r"^rescale: fc cannot follow the input size 4x4 \(mat1") as info:
        surgery.apply(Flat(), ["rescale:factor=0.5"], example_inputs=torch.randn(2, 3, 8, 8), measure=False)
    assert "\n" not in str(info.value)


def test_an_input_off_the_models_stride_is_refused_with_a_factor_that_fits():
    class TwoPaths(nn.Module):  # a strided conv (rounds up) added to a pooled path (rounds down)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.proj = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return (self.conv(x) + self.proj(self.pool(x))).mean((2, 3))

    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(SurgeryError, match=r"divides its input by 2, and 5 is no multiple of it: try factor=0.5 "):
        surgery.apply(TwoPaths(), ["rescale:factor=0.625"], example_inputs=x, measure=False)
    assert surgery.apply(TwoPaths(), ["rescale:factor=0.5"], example_inputs=x, measure=False).input_size == (3, 4, 4)


def test_swin_windows_that_no_longer_fit_are_refused():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(2, 2),
                              num_heads=(1, 1), num_classes=10)
    with pytest.raises(SurgeryError, match=r"rescale: layers\.0\.blocks\.1\.attn cannot follow the input size 28x28"):
        surgery.apply(model, ["rescale:factor=0.5"], example_inputs=torch.randn(2, 3, 56, 56), measure=False)


def test_resnet50_at_factor_half_takes_112():
    result = surgery.apply("resnet50", ["rescale:factor=0.5"], measure=False)
    assert result.input_size == (3, 112, 112)
    assert result.model.conv1.kernel_size == (3, 3) and result.model.conv1.padding == (1, 1)
    with torch.no_grad():
        assert result.model(torch.randn(1, 3, 112, 112)).shape == (1, 1000)


# name, create kwargs, the layers rescaled at 0.5 and their kernel after
FAMILIES = [
    ("resnet50", {"conv1": (3, 3)}),
    ("efficientnet_b0", {"blocks.2.0.conv_dw": (3, 3), "blocks.6.0.conv_dw": (3, 3)}),
    ("convnext_atto", {"stages.0.blocks.0.conv_dw": (3, 3), "stem.0": (4, 4)}),  # patchify stem stays
    ("vit_tiny_patch16_224", {"patch_embed.proj": (16, 16)}),  # patchify: the token grid shrinks instead
]


@pytest.mark.parametrize("name, rescaled", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_families_shrink_export_grow_and_reload(name, rescaled, tmp_path):
    torch.manual_seed(0)
    source = surgery.load_model(name, num_classes=10, input_size=64)  # vit: img_size=64, a 4x4 token grid
    model = source.model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    small = surgery.apply(source, ["rescale:factor=0.5"], measure=False)
    assert small.input_size == (3, 32, 32)
    for layer, kernel in rescaled.items():
        assert small.model.get_submodule(layer).kernel_size == kernel, layer
    xs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = small.model(xs)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name == "vit_tiny_patch16_224":
        assert small.model.pos_embed.shape == (1, 1 + 2 * 2, 192)

    path = export_onnx(small.model, xs[:1], tmp_path / "small.onnx")
    assert check_parity(small.model, path, small.input_size)["ok"]

    big = surgery.apply(small.as_loaded(), ["rescale:factor=2"], measure=False)
    assert big.input_size == (3, 64, 64)
    original = dict(model.named_parameters())
    for key, p in big.model.named_parameters():
        assert p.shape == original[key].shape, key  # every size back to the source's
    with torch.no_grad():
        assert big.model(x).shape == (2, 10)

    big.save(tmp_path / "artifact")
    loaded = surgery.load(tmp_path / "artifact")
    with torch.no_grad():
        assert compare_outputs(big.model(x), loaded(x)) <= RELOAD_ATOL
    assert [p["pass"] for p in big.recipe["passes"]] == ["rescale", "rescale"]


def test_shrink_then_grow_keeps_a_smooth_stem_close():
    """The whole pass on resnet50's stem: 7 -> 3 -> 7 on a smooth kernel stays within the stated tolerance."""
    model = timm.create_model("resnet50", num_classes=10).eval()
    with torch.no_grad():
        model.conv1.weight.copy_(gaussian(7, 2.0).expand_as(model.conv1.weight))
    x = torch.randn(2, 3, 64, 64)
    small = surgery.apply(model, [RescaleConfig(factor=0.5)], example_inputs=x, measure=False)
    big = surgery.apply(small.as_loaded(), [RescaleConfig(factor=2.0)], measure=False)
    k0, k2 = model.conv1.weight, big.model.conv1.weight
    assert math.isclose(k2.sum().item(), k0.sum().item(), rel_tol=1e-4)
    assert ((k2 - k0).abs().max() / k0.abs().max()).item() < ROUND_TRIP_7_3_7


class _ResizesItsInput(nn.Module):
    """Resizes any input back to 32x32 first (as crossvit does per branch): a smaller input saves nothing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.interpolate(x, size=(32, 32), mode="bilinear")
        return self.head(self.conv(x).mean((2, 3)))


class _PoolsToAFixedGrid(nn.Module):
    """VGG's AdaptiveAvgPool2d((7, 7)) before the classifier: the convs before it still shrink."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.head = nn.Linear(8 * 49, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.conv(x)), 1))


def test_a_model_that_resizes_its_input_back_is_refused_naming_the_op():
    with pytest.raises(SurgeryError, match=r"node interpolate resizes its input to a fixed 32x32 inside the model"):
        surgery.apply(_ResizesItsInput().eval(), "rescale:factor=0.5", example_inputs=torch.randn(2, 3, 32, 32))
    result = surgery.apply(_PoolsToAFixedGrid().eval(), "rescale:factor=0.5", example_inputs=torch.randn(2, 3, 28, 28),
                           latency=False)
    target = result.report["passes"][0]["effect"]["target"]
    assert target["met"] and target["reached_flops"] < 0.6  # the conv's compute fell with the pixels


def test_timm_blocks_that_compute_from_shapes_stay_modules_under_rescale(tmp_path):
    """Traced through (prune's default), MobileViT's blocks fix their sizes at the example's; with rescale
    they stay modules, recorded by name, and follow the new size, also after save and load."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", num_classes=5).eval()
    result = surgery.apply(model, ["rescale:factor=0.5"], example_inputs=torch.randn(2, 3, 128, 128), measure=False)
    assert result.recipe["input_size"] == [3, 64, 64]
    kinds = [type(result.model.get_submodule(n.target)).__name__ for n in result.model.graph.nodes
             if n.op == "call_module"]
    assert kinds.count("MobileVitBlock") == 3
    assert len(result.recipe["source"]["leaf_modules"]) == 3
    x = torch.randn(3, 3, 64, 64)
    result.save(tmp_path / "a")
    again = surgery.load(tmp_path / "a", base_model=timm.create_model("mobilevit_xxs", num_classes=5))
    with torch.no_grad():
        assert torch.equal(result.model(x), again(x))
    plain = surgery.trace(model, torch.randn(2, 3, 128, 128))  # without rescale: traced through
    assert not any(n.op == "call_module" and type(plain.get_submodule(n.target)).__name__ == "MobileVitBlock"
                   for n in plain.graph.nodes)
