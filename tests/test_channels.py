"""Channel dependency groups (surgery.channels), proven by function preservation.

The proof: pick channels in every prunable group, zero every weight that *produces*
them (conv/linear rows and biases, norm scales and shifts, layer scales, position
embeddings, class tokens) so that they carry nothing, prune exactly those channels,
and the output must not move. A group that misses a member, or slices one at the
wrong offset, fails it.
"""

import copy
import operator

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from surgery.channels import Fixed, build
from surgery.graph import trace

from conftest import randomize_norm_stats

PRESERVE_ATOL = 1e-5  # pruning channels that carry nothing changes nothing but float rounding


def _ln_ignoring_dead_channels(module, inputs, output):
    """Reference LayerNorm: statistics over the channels that are not all zero.

    LayerNorm's mean and variance run over the channels, so a dead channel still shifts
    them; the pruned model computes them over the kept channels only. This hook makes
    the reference do the same, found from the data (independent of surgery.channels).
    """
    x = inputs[0]
    axis = 1 if isinstance(module, timm.layers.LayerNorm2d) else -1
    xm = x.movedim(axis, -1)
    live = xm.reshape(-1, xm.shape[-1]).abs().amax(0) > 0
    if bool(live.all()):
        return output
    y = torch.zeros_like(xm)
    y[..., live] = F.layer_norm(xm[..., live], (int(live.sum()),), module.weight[live], module.bias[live],
                                module.eps)
    return y.movedim(-1, axis)


def _gn_ignoring_dead_channels(module, inputs, output):
    """Reference GroupNorm: each group's statistics over its channels that are not all zero."""
    x = inputs[0]
    live = x.transpose(0, 1).reshape(x.shape[1], -1).abs().amax(1) > 0
    if bool(live.all()):
        return output
    y = torch.zeros_like(x)
    per = x.shape[1] // module.num_groups
    for g in range(module.num_groups):
        idx = torch.arange(g * per, (g + 1) * per)[live[g * per:(g + 1) * per]]
        if len(idx):
            y[:, idx] = F.group_norm(x[:, idx], 1, module.weight[idx], module.bias[idx], module.eps)
    return y


def _layer_norm_ignoring_dead_channels(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm whose statistics skip the all-zero channels (as _ln_ignoring_dead_channels, for graphs
    where a LayerNorm2d was traced through into F.layer_norm)."""
    live = x.reshape(-1, x.shape[-1]).abs().amax(0) > 0
    if bool(live.all()):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    y = torch.zeros_like(x)
    y[..., live] = F.layer_norm(x[..., live], (int(live.sum()),), None if weight is None else weight[live],
                                None if bias is None else bias[live], eps)
    return y


def choose_removed(cg, seed=0, fraction=0.25):
    """Keep masks that drop about ``fraction`` of every prunable group (at least one channel)."""
    rng = np.random.default_rng(seed)
    keep = {}
    for g in cg.groups():
        if not g.prunable:
            continue
        mask = np.ones(g.size, dtype=bool)
        mask[rng.choice(g.size, max(1, int(g.size * fraction)), replace=False)] = False
        keep[g.id] = mask
    return keep


def zero_removed(gm, cg, keep, roles=("out", "norm", "param")):
    """Zero every producing weight of the removed channels: they carry nothing."""
    tensors = dict(gm.named_parameters())
    tensors.update(dict(gm.named_buffers()))
    with torch.no_grad():
        for m in cg.members:
            if m.role in roles:
                mask = cg.keep_mask(m.layout, keep)
                if not mask.all():
                    tensors[m.param].index_fill_(m.axis, torch.as_tensor(np.flatnonzero(~mask)), 0.0)


def prune_dead_channels(gm, x, seed=0, skip_member=None):
    """Zero chosen channels, prune them; return (reference output, pruned output, pruned gm)."""
    cg = build(gm)
    keep = choose_removed(cg, seed)
    assert keep, "no prunable group"
    zero_removed(gm, cg, keep)
    if skip_member is not None:  # negative control: put one producer's weights back
        name, saved = skip_member
        with torch.no_grad():
            dict(gm.named_parameters())[name].copy_(saved)
    reference = copy.deepcopy(gm)
    for m in reference.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_hook(_ln_ignoring_dead_channels)
        elif isinstance(m, nn.GroupNorm):
            m.register_forward_hook(_gn_ignoring_dead_channels)
    for n in reference.graph.nodes:  # a LayerNorm2d traced through (torchvision's) is F.layer_norm
        if n.target is F.layer_norm:
            n.target = _layer_norm_ignoring_dead_channels
    reference.recompile()
    with torch.no_grad():
        ref = reference(x)
        cg.apply(gm, keep)
        out = gm(x)
    return ref, out, gm


def _params(model):
    return sum(p.numel() for p in model.parameters())


TIMM_CASES = [  # (model, create_model kwargs): together they cover every coupling of the issue
    ("resnet50", {}),
    ("resnext26ts", {}),  # grouped convs
    ("densenet121", {}),  # concat
    ("mobilenetv3_small_050", {}),  # depthwise + squeeze-excite (hard sigmoid), functional linear head
    ("efficientnet_b0", {}),  # depthwise + squeeze-excite
    ("convnext_atto", {}),  # channels-first blocks, layer scale (get_attr gamma)
    ("convnext_atto", {"conv_mlp": False}),  # channels-last blocks: permute, LayerNorm, Linear
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),  # heads, cls token, pos embed
    # reshape(B, N, C) with C read off the block's input: heads apart from the residual stream
    ("test_vit_relpos", {"img_size": 32}),
]


@pytest.mark.parametrize("name,kwargs", TIMM_CASES, ids=[n + ("-cl" if k.get("conv_mlp") is False else "")
                                                         for n, k in TIMM_CASES])
def test_pruning_dead_channels_preserves_the_function(name, kwargs):
    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model(name, num_classes=10, **kwargs)).eval()
    size = kwargs.get("img_size", 64)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 10)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)  # really smaller, not masked


def test_the_preservation_check_catches_a_missed_member():
    """Negative control: leave one producer's weights alive and the output moves."""
    torch.manual_seed(0)
    model = randomize_norm_stats(Residual()).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    ref, out, _ = prune_dead_channels(gm, x)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL
    gm = trace(model, x)
    saved = ("bn2.bias", gm.get_parameter("bn2.bias").detach().clone())
    ref, out, _ = prune_dead_channels(gm, x, skip_member=saved)
    assert (out - ref).abs().max().item() > 1e-3


# --- small models, one coupling each ----------------------------------------------------


def _groups_by_member(cg):
    """{(param, axis): set of group ids it touches}, and the groups by id."""
    groups = {g.id: g for g in cg.groups()}
    touch = {}
    for g in groups.values():
        for m in g.members:
            touch.setdefault((m.param, m.axis), set()).add(g.id)
    return touch, groups


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


def test_residual_add_couples_producers_and_consumers():
    x = torch.randn(2, 3, 16, 16)
    cg = build(trace(Residual().eval(), x))
    touch, groups = _groups_by_member(cg)
    (stream,) = touch[("stem.weight", 0)]
    assert touch[("conv2.weight", 0)] == touch[("bn2.weight", 0)] == touch[("fc.weight", 1)] == {stream}
    assert touch[("conv1.weight", 1)] == {stream}
    (inner,) = touch[("conv1.weight", 0)]
    assert inner != stream and touch[("conv2.weight", 1)] == {inner}
    assert groups[stream].prunable and groups[inner].prunable
    # The model's input channels and the classifier's outputs are never pruned.
    (out,) = touch[("fc.weight", 0)]
    assert not groups[out].prunable and "model output" in groups[out].reasons
    (inp,) = touch[("stem.weight", 1)]
    assert not groups[inp].prunable and "model input" in groups[inp].reasons


class Branches(nn.Module):
    """Concat with offsets, depthwise and grouped convs, uneven split, equal chunks, slice, flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.grouped = nn.Conv2d(24, 24, 1, groups=3)  # 8 channels per group: a is one group, b two
        self.glu = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(20 * 4 * 4, 10)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = self.grouped(torch.relu(self.dw(torch.relu(self.bn(x)))))
        u, v = torch.split(x, [8, 16], dim=1)
        p, q = self.glu(v).chunk(2, dim=1)
        h = torch.cat([u, p * torch.sigmoid(q)], dim=1)  # 24
        h = F.adaptive_avg_pool2d(h[:, 4:], 4)  # 20 channels of 4x4
        return self.fc(torch.flatten(h, 1))


def _member_layout(cg, param, axis):
    (layout,) = [m.layout for m in cg.members if (m.param, m.axis) == (param, axis)]
    return layout


def test_concat_split_chunk_grouped_and_flatten_layouts():
    x = torch.randn(2, 3, 8, 8)
    gm = trace(Branches().eval(), x)
    cg = build(gm)
    touch, groups = _groups_by_member(cg)
    assert touch[("dw.weight", 0)] == touch[("bn.weight", 0)]  # depthwise: in and out are one
    keep = choose_removed(cg, seed=3)
    # grouped conv over the concat: whole groups go, and every group keeps the same widths.
    cat_mask = cg.keep_mask(_member_layout(cg, "bn.weight", 0), keep).reshape(3, 8)
    alive = cat_mask.any(1)
    assert alive[0] and not alive.all() and (cat_mask[alive] == cat_mask[0]).all() and not cat_mask[0].all()
    # chunk pieces are pruned alike: both halves of glu's output keep the same channels.
    glu_mask = cg.keep_mask(_member_layout(cg, "glu.weight", 0), keep)
    assert (glu_mask[:16] == glu_mask[16:]).all() and not glu_mask.all()
    # flatten: fc's input columns are (channel x 16 pixels) of the sliced concat.
    fc_mask = cg.keep_mask(_member_layout(cg, "fc.weight", 1), keep).reshape(20, 16)
    grouped_out = cg.keep_mask(_member_layout(cg, "grouped.weight", 0), keep)
    assert (fc_mask == np.concatenate([grouped_out[:8], glu_mask[:16]])[4:, None]).all()
    ref, out, pruned = prune_dead_channels(gm, x, seed=3)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL
    assert pruned.grouped.groups == 2 and pruned.grouped.in_channels == 2 * int(cat_mask[0].sum())
    assert pruned.dw.groups == pruned.dw.in_channels == pruned.dw.out_channels == pruned.grouped.in_channels


def test_pruned_slices_keep_the_batch_dim_as_written():
    # dpn48b, csatv2: `x[:, :64]` after pruning became `x[0:2, 0:32]` (the traced batch baked
    # in), so the pruned model ran only at batch 2 and ONNX export lost its dynamic batch.
    x = torch.randn(2, 3, 8, 8)
    gm = trace(Branches().eval(), x)
    _, _, pruned = prune_dead_channels(gm, x, seed=3)
    (node,) = [n for n in pruned.graph.nodes if n.target is operator.getitem and isinstance(n.args[1], tuple)]
    assert node.args[1][0] == slice(None)
    with torch.no_grad():
        assert pruned(torch.randn(5, 3, 8, 8)).shape == (5, 10)


class GroupNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 32)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.gn2 = nn.GroupNorm(1, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.gn1(self.conv1(x)))
        return self.fc(torch.relu(self.gn2(self.conv2(x))).mean((2, 3)))


def test_group_norm_prunes_whole_groups_and_widths_alike():
    torch.manual_seed(0)
    model = GroupNormed().eval()
    with torch.no_grad():
        for gn in (model.gn1, model.gn2):
            gn.weight.uniform_(0.5, 1.5)
            gn.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, x)
    cg = build(gm)
    sizes = sorted(g.size for g in cg.groups() if g.prunable)
    assert sizes == [4, 8, 16]  # gn1: 4 groups x 8 channels each; gn2 (one group): 16 channels
    ref, out, pruned = prune_dead_channels(gm, x, seed=2)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL
    assert pruned.gn1.num_groups == 3 and pruned.gn1.num_channels == 3 * 6 == pruned.conv1.out_channels


class Attention(nn.Module):
    """Hand-written attention with a non-fused path (matmul, literal scale) and literal sizes."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.embed = nn.Linear(12, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # x: (B, 5, 12)
        x = self.embed(x) + self.pos
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        y = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, 32)
        x = x + self.gamma * self.proj(y)
        return self.head(x[:, 0])


def test_attention_heads_are_groups_and_sizes_are_rewritten():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    gm = trace(Attention().eval(), x)
    cg = build(gm)
    groups = cg.groups()
    heads = [g for g in groups if "heads" in g.tags]
    assert [g.size for g in heads] == [4] and heads[0].prunable and heads[0].multiplicity == 8
    ref, out, pruned = prune_dead_channels(gm, x)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL
    reshape = [n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert reshape[0].args[4] == 3 and reshape[0].args[5] == 6  # 4 -> 3 heads, 8 -> 6 dims each
    assert reshape[1].args[-1] == 18 and pruned.proj.in_features == 18


class Opaque(nn.Module):
    """Ops the builder cannot prove safe: the channels they touch stay whole."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cumsum(self.a(x), dim=1)  # unknown op over channels
        y = self.b(x)
        y = y / y.shape[1]  # a channel count used as a number
        z = self.c(y)
        z = z - z.mean(1, keepdim=True)  # a reduction over channels
        return self.fc(self.d(z).mean((2, 3)))


def test_unknown_ops_and_size_uses_leave_channels_whole_with_reasons():
    x = torch.randn(2, 3, 4, 4)
    gm = trace(Opaque().eval(), x)
    cg = build(gm)
    touch, groups = _groups_by_member(cg)
    reason = {p: groups[next(iter(touch[(p, 0)]))].reasons[0] for p in ("a.weight", "b.weight", "c.weight")}
    assert reason["a.weight"].startswith("unsupported op `cumsum`")
    assert "its size is used by" in reason["b.weight"]
    assert reason["c.weight"].startswith("reduction `.mean()` over channels")
    assert not any(groups[next(iter(touch[(p, 0)]))].prunable for p in reason)
    assert groups[next(iter(touch[("d.weight", 0)]))].prunable  # the rest still prunes
    assert cg.unsupported == ["cumsum (cumsum)"]


def test_layout_algebra_refines_leaves_on_slices_and_reshapes():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), torch.randn(1, 3, 2, 2))
    cg = build(gm)
    leaf = cg.new_leaf(12)
    left = cg.slice(leaf, 0, 4, "test")
    rest = cg.slice(leaf, 4, 12, "test")
    a, b = cg.factor(rest, [2, 4], "test")
    assert (left.size, a.size, b.size) == (4, 2, 4)
    keep = {cg.roots(a)[0]: np.array([True, False]), cg.roots(left)[0]: np.array([1, 0, 1, 1], bool)}
    mask = cg.keep_mask(leaf, keep)
    assert mask.tolist() == [True, False, True, True] + [True] * 4 + [False] * 4
    assert cg.kept(leaf, {cg.roots(a)[0]: 1}) == 8
    other = cg.new_leaf(4)
    cg.unify(other, left, "test")
    assert cg.roots(other) == cg.roots(left)
    cg.unify(Fixed(8), rest, "test")  # rest meets non-channel positions: all of it is fixed
    assert not [g for g in cg.groups() if cg.roots(a)[0] == g.id]


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_prunes_its_input_and_output_channels(groups):
    """Decoders and upsampling heads: ConvTranspose2d's weight is (in, out / groups, k, k)."""
    torch.manual_seed(0)
    net = randomize_norm_stats(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 2, stride=2, groups=groups), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(net, x)
    cg = build(gm)
    convt = next(name for name in cg.modules if getattr(gm.get_submodule(name), "transposed", False))
    layouts = {(m.param, m.axis): m.role for m in cg.members if m.param.startswith(convt)}
    assert layouts == {(f"{convt}.weight", 0): "in", (f"{convt}.weight", 1): "out", (f"{convt}.bias", 0): "out"}
    assert all(g.prunable for g in cg.groups() if any(m.param.startswith(convt) for m in g.members))
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 4, 16, 16)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    t = pruned.get_submodule(convt)
    assert t.in_channels < 16 and t.out_channels < 8  # whole groups may go too (groups=2 -> 1)
    assert t.weight.shape == (t.in_channels, t.out_channels // t.groups, 2, 2)


def test_prune_flops_target_counts_conv_transpose():
    import surgery

    torch.manual_seed(0)
    c = 128  # two groups whose product is the compute: one channel is a 1.5% step at 64, 0.8% at 128
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(c, c, 2, stride=2),
                        nn.ReLU(), nn.Conv2d(c, 4, 1)).eval()
    result = surgery.apply(net, "prune:flops=0.5,round_to=1", example_inputs=torch.randn(2, 3, 8, 8), latency=False)
    target = result.report["passes"][0]["effect"]["target"]
    assert target["met"] and target["reached_flops"] == pytest.approx(0.5, rel=0.01)
    note = next(n for n in result.report["passes"][0]["notes"] if n.startswith("FLOPs target"))
    assert note.split("estimate ")[1].startswith(f"{target['reached_flops']:.3f}")  # the estimate knows it too


@pytest.mark.parametrize("name", ["convnext_tiny", "efficientnet_b0"])
def test_torchvision_blocks_with_stochastic_depth_and_functional_layer_norm(name):
    """torchvision's CNBlock / MBConv: `stochastic_depth` (elementwise) and LayerNorm2d traced into
    F.layer_norm with get_attr weight and bias: every group prunable, the function preserved."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_norm_stats(torchvision.models.get_model(name, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    cg = build(gm)
    whole = [g.reasons[0] for g in cg.groups() if not g.prunable]
    assert sorted(r.split(" at ")[0] for r in whole) == ["model input", "model output"], whole
    functional_ln = [n for n in gm.graph.nodes if n.target is F.layer_norm]
    assert (len(functional_ln) > 0) == (name == "convnext_tiny")
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 10)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)


def _torchvision_small(name):
    import torchvision.models as tvm
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    torch.manual_seed(0)
    if name == "vit":  # nn.MultiheadAttention inside every encoder block
        return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10)
    v2 = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if name == "swin_v2" else {}
    return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=10, **v2)


@pytest.mark.parametrize("name", ["vit", "swin", "swin_v2"])
def test_torchvision_attention(name):
    """torchvision's ViT (nn.MultiheadAttention, rewritten at trace into q/k/v ops) and Swin
    (`shifted_window_attention`, `_patch_merging_pad`): heads' widths prunable, function preserved."""
    model = randomize_norm_stats(_torchvision_small(name)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    if name == "vit":
        assert gm.meta["surgery"].decomposed == [f"encoder.layers.encoder_layer_{i}.self_attention (MultiheadAttention)"
                                                 for i in range(2)]
        assert not any(isinstance(m, nn.MultiheadAttention) for m in (gm.get_submodule(n.target) for n in
                                                                      gm.graph.nodes if n.op == "call_module"))
    cg = build(gm)
    assert not cg.unsupported
    head_dims = [g for g in cg.groups() if "head_dim" in g.tags]
    assert head_dims and all(g.prunable for g in head_dims)
    # the residual stream (the width every block reads and writes; Swin's: heads x head_dim)
    stream = [g for g in cg.groups() if any(m.param.endswith(".mlp.0.weight") and "cpb" not in m.param and m.axis == 1
                                                  for m in g.members)]
    assert [g.prunable for g in stream] == ([True] if name == "vit" else [False, True] * 2), [g.reasons for g in stream]
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 10)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)


def test_window_attention_keeps_q_scale_when_head_dim_shrinks():
    """Negative control of the q rescale: without it, pruning Swin's dead channels moves the output."""
    from surgery import channels

    model = randomize_norm_stats(_torchvision_small("swin")).eval()
    with torch.no_grad():  # attention logits of a trained size: at init they are ~0 and any scale fits
        for name, p in model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                p.mul_(30)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    ref, out, _ = prune_dead_channels(copy.deepcopy(gm), x)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    original = channels.ChannelGraph._edit_window_attention
    try:
        channels.ChannelGraph._edit_window_attention = lambda *a: None
        ref, out, _ = prune_dead_channels(gm, x)
    finally:
        channels.ChannelGraph._edit_window_attention = original
    assert (out - ref).abs().max().item() > 100 * PRESERVE_ATOL * max(1.0, ref.abs().max().item())


def test_channel_shuffle_floordiv():
    """torchvision's ShuffleNetV2: `view(b, groups, c // groups, h, w)` with c read from the tensor. The
    quotient is the inner factor of the channels, the groups stay: more groups prunable than when the
    floordiv fixed them, function preserved."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_norm_stats(torchvision.models.shufflenet_v2_x0_5(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    assert any(n.target is operator.floordiv for n in gm.graph.nodes)
    cg = build(gm)
    assert not [g for g in cg.groups() if any("floordiv" in r for r in g.reasons)]
    shuffled = [g for g in cg.groups() if g.prunable and any(m.param == "stage2.0.branch2.5.weight" for m in g.members)]
    assert shuffled, "the channels the first shuffle mixes stay prunable"
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 10)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)


class ComputedSlices(nn.Module):
    """Slices whose bounds are computed from shapes (a distilled transformer's token split): on tokens
    they are just positions; on channels they keep the sliced channels whole."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):  # x: (B, tokens, 8)
        x = self.embed(x)
        x = x[:, : x.shape[1] - 1]  # computed bound on tokens
        y = self.mid(x)
        y = y[..., : y.shape[-1] // 2 * 2]  # computed bound on channels (the whole width here)
        return self.out(y).mean(1)


def test_getitem_with_computed_bounds():
    torch.manual_seed(0)
    model = ComputedSlices().eval()
    x = torch.randn(2, 5, 8)
    gm = trace(model, x)
    cg = build(gm)
    by_anchor = {g.anchor: g for g in cg.groups()}
    assert by_anchor["embed.weight:0"].prunable  # the token slice does not touch channels
    assert not by_anchor["mid.weight:0"].prunable
    assert any("computed" in r or "used by" in r for r in by_anchor["mid.weight:0"].reasons)
    ref, out, _ = prune_dead_channels(gm, x)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())


def test_einsum_attention_of_torchvision_maxvit():
    """MaxViT's attention is written with torch.einsum (and torch.swapaxes): each subscript letter one
    space, so heads and head_dim are groups like any attention's; function preserved."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = randomize_norm_stats(MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                        block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0,
                                        num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    assert any(n.target is torch.einsum for n in gm.graph.nodes)
    cg = build(gm)
    assert not cg.unsupported
    qkv = [g for g in cg.groups() if any(m.param.endswith("attn_layer.1.to_qkv.weight") for m in g.members)]
    assert qkv and any(g.prunable for g in qkv)
    ref, out, pruned = prune_dead_channels(gm, x)
    assert out.shape == ref.shape == (2, 10)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)


class LinearBN(nn.Module):
    """LeViT's Linear + BatchNorm1d over the flattened tokens, shaped back with reshape_as."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = LinearBN(12, 16)
        self.fc1, self.fc2 = LinearBN(16, 32), LinearBN(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(F.hardswish(self.fc1(x)))
        return self.head(x.mean(1))


def test_reshape_as_takes_the_other_tensors_channels():
    torch.manual_seed(0)
    model = randomize_norm_stats(LeViTMlp()).eval()
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    cg = build(gm)
    assert sum(g.prunable for g in cg.groups()) == 2  # the stream (16) and the hidden (32)
    ref, out, pruned = prune_dead_channels(gm, x)
    assert (out - ref).abs().max().item() <= PRESERVE_ATOL * max(1.0, ref.abs().max().item())
    assert _params(pruned) < 0.8 * _params(model)


def test_weight_standardized_convs_prune_outputs_exactly_and_their_gain_with_them():
    from timm.layers import ScaledStdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(ScaledStdConv2d(3, 16, 3, padding=1), nn.SiLU(), ScaledStdConv2d(16, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[0].gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = trace(model, x)
    assert [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"][0] \
        == "ScaledStdConv2d"  # a leaf conv, not batch_norm over a reshaped weight
    cg = build(gm)
    keep = choose_removed(cg)
    (gid, mask), = [(g.id, keep[g.id]) for g in cg.groups() if g.size == 16]
    with torch.no_grad():
        before = model[1](model[0](x))[:, torch.as_tensor(np.flatnonzero(mask))]
        cg.apply(gm, keep)
        after = gm.get_submodule("1")(gm.get_submodule("0")(x))
    assert gm.get_submodule("0").gain.shape == (int(mask.sum()), 1, 1, 1)
    assert gm.get_submodule("2").in_channels == int(mask.sum())
    # Standardization is per output row: the kept outputs of the first conv are exactly the same.
    assert (after - before).abs().max().item() <= 1e-5
    assert torch.isfinite(gm(x)).all() and gm(x).shape == (2, 4)


def test_rms_norm_act_2d_carries_channels():
    from timm.layers import RmsNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 16, 3), RmsNormAct2d(16), nn.Conv2d(16, 4, 1)).eval()
    cg = build(trace(model, torch.randn(2, 3, 8, 8)))
    (group,) = [g for g in cg.groups() if g.size == 16]
    assert group.prunable and any(m.param == "1.weight" for m in group.members)


def test_reshape_to_a_size_read_off_another_tensor_does_not_tie_heads_to_the_stream():
    model = timm.create_model("test_vit_relpos", img_size=32, num_classes=10).eval()
    gm = trace(model, torch.randn(2, 3, 32, 32))
    heads = [g for g in build(gm).groups() if "heads" in g.tags]
    assert len(heads) == len(model.blocks)  # one heads group per block, none shared with the stream
    assert all(g.prunable and not any(m.param.startswith("patch_embed") for m in g.members) for g in heads)
