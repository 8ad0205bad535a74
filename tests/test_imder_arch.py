"""IMDer's networks as SPEC.md §3 describes the authors' code: MulT's sinusoidal positions, the
score U-Net (Gaussian Fourier time embedding 256 with scale 30, channels 32/64/128/256, strides
1/2/2/2, 2-layer 8-head cross-attention, GroupNorm) and the refinement decoder (Conv1d d -> 2d,
20 RCABs, Conv1d 2d -> d). Built with the defaults the shipped config relies on (it sets no
``score`` or ``refine``), each checked against values written out here."""

from __future__ import annotations

import math

import torch
from torch import nn

from train.methods.imder_nets import CrossTransformer, GaussianFourier, MulTBackbone, Refiner, ScoreUNet, _sinusoidal
from train.diffusion import VESDE


def test_sinusoidal_positions_are_fairseqs():
    """MulT's positions (fairseq): position p = 1..T, frequency 10000^(-i / (half - 1)), sin then
    cos, a zero column for an odd width."""
    T, d = 5, 7
    half = d // 2
    pe = _sinusoidal(T, d, "cpu")
    assert pe.shape == (T, d)
    for p in range(1, T + 1):
        for i in range(half):
            angle = p * 10000.0 ** (-i / (half - 1))
            assert abs(float(pe[p - 1, i]) - math.sin(angle)) < 1e-5
            assert abs(float(pe[p - 1, half + i]) - math.cos(angle)) < 1e-5
        assert float(pe[p - 1, d - 1]) == 0.0


def test_gaussian_fourier_time_embedding():
    torch.manual_seed(3)
    emb = GaussianFourier(8)
    torch.manual_seed(3)
    w = torch.randn(4) * 30.0  # scale 30 (score-SDE's default, the authors' value)
    assert torch.equal(emb.W, w)
    t = torch.tensor([0.25, 0.9])
    p = t[:, None] * w[None] * 2 * math.pi
    assert torch.allclose(emb(t), torch.cat([torch.sin(p), torch.cos(p)], -1), atol=1e-5)
    assert not any(True for _ in emb.parameters())  # fixed: a buffer, not trained


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_score_unet_is_the_authors_default():
    d = 32
    net = ScoreUNet(d, VESDE(25.0).marginal_std)
    assert net.embed[0].W.numel() == 128 and net.embed[1].in_features == 256  # embedding 256
    assert torch.allclose(net.embed[0].W.std(), torch.tensor(30.0), rtol=0.3)  # scale 30
    assert [c.out_channels for c in net.down] == [32, 64, 128, 256]
    assert [c.stride[0] for c in net.down] == [1, 2, 2, 2]
    assert all(c.bias is None for c in net.down)
    # every level attends over the condition with 2 layers of 8 heads
    for att in list(net.down_att) + list(net.up_att):
        assert len(att.layers) == 2 and att.causal
        assert all(layer.attn.num_heads == math.gcd(att.norm.normalized_shape[0], 8) for layer in att.layers)
    # GroupNorm: 4 groups on the first level, 32 on the others (the authors' GroupNorm(4, 32), (32, ...))
    assert [g.num_groups for g in net.down_gn] == [4, 32, 32, 32]
    assert [g.num_groups for g in net.up_gn] == [32, 32, 32]
    # decoder: from the deepest level, input = previous output + skip (2x channels), back to d
    assert [c.in_channels for c in net.up] == [256, 256, 128, 64]
    assert [c.out_channels for c in net.up] == [128, 64, 32, d]
    assert [c.stride[0] for c in net.up] == [2, 2, 2, 1]
    assert [c.bias is not None for c in net.up] == [False, False, False, True]  # only the last one has a bias
    assert [c.bias is not None for c in net.up_cond] == [False, False, False, True]
    assert [c.in_channels for c in net.up_cond] == [256, 128, 64, 32]


def test_score_output_is_divided_by_the_marginal_std():
    torch.manual_seed(0)
    sde = VESDE(25.0)
    net = ScoreUNet(8, sde.marginal_std, channels=(8, 16), embed_dim=16, heads=2, attn_layers=1)
    one = ScoreUNet(8, lambda t: torch.ones_like(t), channels=(8, 16), embed_dim=16, heads=2, attn_layers=1)
    one.load_state_dict(net.state_dict())
    x, c, t = torch.randn(2, 8, 6), torch.randn(2, 8, 6), torch.tensor([0.3, 0.8])
    ref = one(x, t, c) / sde.marginal_std(t)[:, None, None]
    assert torch.allclose(net(x, t, c), ref, atol=1e-5)


def test_refiner_is_rcan_at_twice_the_width():
    d = 12
    ref = Refiner(d)
    assert (ref.inp.in_channels, ref.inp.out_channels) == (d, 2 * d)
    assert (ref.outp.in_channels, ref.outp.out_channels) == (2 * d, d)
    blocks = [m for m in ref.group if not isinstance(m, nn.Conv1d)]
    assert len(blocks) == 20
    ca = blocks[0].body[3]
    assert ca.body[1].out_channels == max(1, 2 * d // 16)  # the channel-attention squeeze, reduction 16
    wide = Refiner(64, blocks=1)
    assert [m for m in wide.group if not isinstance(m, nn.Conv1d)][0].body[3].body[1].out_channels == 8


def test_channel_attention_scales_each_channel_by_its_pooled_gate():
    torch.manual_seed(0)
    ref = Refiner(4, blocks=1, reduction=2)
    ca = ref.group[0].body[3]
    x = torch.randn(2, 8, 5)
    gate = torch.sigmoid(ca.body[3](torch.relu(ca.body[1](x.mean(-1, keepdim=True)))))
    assert torch.allclose(ca(x), x * gate, atol=1e-6)


def test_backbone_defaults_are_mults():
    bb = MulTBackbone(8, 1)
    cross = next(iter(bb.cross.values()))
    assert isinstance(cross, CrossTransformer) and len(cross.layers) == 4  # 4 levels (MOSI)
    assert len(next(iter(bb.mem.values())).layers) == 4   # memory: max(levels, 3)
    assert cross.layers[0].attn.num_heads == 8
    assert cross.layers[0].attn.dropout == 0.0 and bb.output_dropout == 0.0 and cross.embed_dropout == 0.0
    assert cross.layers[0].relu_dropout == 0.0 and cross.layers[0].res_dropout == 0.0
    assert len(CrossTransformer(8).layers) == 4
