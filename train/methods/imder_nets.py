"""IMDer's networks (Wang, Li, Cui, NeurIPS 2023; SPEC.md §3), written for any width and length.

- ``Projections``: per modality a bias-free Conv1d (kernel 3, no padding: 50 frames -> 48) to the
  common width d. Bias-free, so a masked (all-zero) modality projects to exactly zero.
- ``CrossTransformer``: the MulT transformer encoder (Tsai et al. 2019) the authors use: inputs
  scaled by sqrt(d) plus sinusoidal positions, pre-LayerNorm layers (attention over the key
  sequence, ReLU feed-forward 4d), a final LayerNorm; optional causal mask (the authors'
  ``attn_mask: true``) and a key padding mask.
- ``MulTBackbone``: for each modality, cross-modal transformers from the two others (``levels``
  layers), concatenated (2d) and a memory transformer (max(levels, 3) layers), its last valid time
  step; the 6d fused vector -> residual head (Linear-ReLU-Dropout-Linear + skip) -> output.
- ``ScoreUNet``: the conditional score network: a 1-D U-Net (channels 32/64/128/256, strides
  1/2/2/2) with Gaussian Fourier time features (256, scale 30), swish, GroupNorm, and at every
  level cross-attention (2 layers, 8 heads) over the condition, which is carried down and up by
  its own convolutions; the output is divided by the marginal std. The released code fixed the
  input at 32 channels and 48 frames; here the input is d channels (the condition gets a level-1
  convolution of its own, the authors' skipped it because d equalled the first width) and the
  transposed convolutions are given their skip connection's length, so odd lengths work.
- ``Refiner``: Conv1d(d -> 2d), a group of residual channel-attention blocks (RCAN), Conv1d(2d -> d).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from train.conditions import MODALITIES
from train.nets import key_padding_mask


def last_valid(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """h (B, T, C) at each row's last valid step (the last step when none is valid)."""
    T = h.shape[1]
    idx = torch.where(valid.any(1), T - 1 - valid.flip(1).float().argmax(1), torch.full_like(valid[:, 0], T - 1, dtype=torch.long))
    return h[torch.arange(len(h), device=h.device), idx]


def _heads(c: int, want: int) -> int:
    return math.gcd(c, want)


class Projections(nn.Module):
    def __init__(self, dims: dict[str, int], d: int, kernel: int = 3):
        super().__init__()
        self.kernel = int(kernel)
        self.conv = nn.ModuleDict({m: nn.Conv1d(dims[m], d, self.kernel, padding=0, bias=False) for m in MODALITIES})

    def forward(self, x: dict, valid: dict) -> tuple[dict, dict]:
        """x[m] (B, T, D_m), valid[m] (B, T) -> features (B, T - k + 1, d) and their validity."""
        feats, ok = {}, {}
        for m in MODALITIES:
            xm, vm = x[m], valid[m]
            if xm.shape[1] < self.kernel:  # shorter than the kernel: pad with invalid zero frames
                xm = F.pad(xm, (0, 0, 0, self.kernel - xm.shape[1]))
                vm = F.pad(vm, (0, self.kernel - vm.shape[1]))
            feats[m] = self.conv[m](xm.transpose(1, 2)).transpose(1, 2)
            ok[m] = vm[:, self.kernel - 1:]  # an output step is valid when its window ends on a valid frame
        return feats, ok


_POSITIONS: dict = {}


def sinusoidal(T: int, d: int, device) -> torch.Tensor:
    """(T, d) sinusoidal positions 1..T (cached: the samplers ask for the same ones every step)."""
    key = (T, d, str(device))
    if key not in _POSITIONS:
        _POSITIONS[key] = _sinusoidal(T, d, device)
    return _POSITIONS[key]


def _sinusoidal(T: int, d: int, device) -> torch.Tensor:
    half = d // 2
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -(math.log(10000.0) / max(half - 1, 1)))
    pos = torch.arange(1, T + 1, device=device, dtype=torch.float32)[:, None] * freq[None]
    pe = torch.cat([pos.sin(), pos.cos()], 1)
    return F.pad(pe, (0, d - pe.shape[1]))


class _Layer(nn.Module):
    def __init__(self, d, heads, attn_dropout, relu_dropout, res_dropout):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, _heads(d, heads), dropout=attn_dropout, batch_first=True)
        self.ln0, self.ln1 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout

    def forward(self, x, kv, mask, pad):
        q = self.ln0(x)
        k = q if kv is None else self.ln0(kv)
        a, _ = self.attn(q, k, k, attn_mask=mask, key_padding_mask=pad, need_weights=False)
        x = x + F.dropout(a, self.res_dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ln1(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.res_dropout, self.training)


class CrossTransformer(nn.Module):
    def __init__(self, d: int, heads: int = 8, layers: int = 4, attn_dropout: float = 0.0, relu_dropout: float = 0.0,
                 res_dropout: float = 0.0, embed_dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(d, heads, attn_dropout, relu_dropout, res_dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.scale, self.embed_dropout, self.causal = math.sqrt(d), embed_dropout, causal

    def _embed(self, x):
        x = self.scale * x + sinusoidal(x.shape[1], x.shape[2], x.device)
        return F.dropout(x, self.embed_dropout, self.training)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None, kv_valid: torch.Tensor | None = None):
        """x (B, Tq, d) attends to kv (B, Tk, d) (itself when None); kv_valid (B, Tk) bool."""
        x = self._embed(x)
        kv = None if kv is None else self._embed(kv)
        tq, tk = x.shape[1], (x if kv is None else kv).shape[1]
        mask = None
        if self.causal:  # MulT's future mask, shifted by the length difference
            mask = torch.ones(tq, tk, dtype=torch.bool, device=x.device).triu(1 + abs(tk - tq))
        pad = None if kv_valid is None else key_padding_mask(kv_valid)
        for layer in self.layers:
            x = layer(x, kv, mask, pad)
        return self.norm(x)


class MulTBackbone(nn.Module):
    def __init__(self, d: int, out_dim: int, heads: int = 8, levels: int = 4, mem_layers: int | None = None,
                 attn_dropout: dict | float = 0.0, mem_attn_dropout: float = 0.0, relu_dropout: float = 0.0,
                 res_dropout: float = 0.0, embed_dropout: float = 0.0, output_dropout: float = 0.0,
                 causal: bool = True):
        super().__init__()
        ad = attn_dropout if isinstance(attn_dropout, dict) else {m: attn_dropout for m in MODALITIES}
        kw = dict(relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout, causal=causal)
        self.cross = nn.ModuleDict({f"{q}{k}": CrossTransformer(d, heads, levels, float(ad.get(k, 0.0)), **kw)
                                    for q in MODALITIES for k in MODALITIES if k != q})
        mem = int(mem_layers) if mem_layers else max(levels, 3)
        self.mem = nn.ModuleDict({q: CrossTransformer(2 * d, heads, mem, mem_attn_dropout, **kw) for q in MODALITIES})
        c = 6 * d
        self.proj1, self.proj2, self.out = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, out_dim)
        self.output_dropout = output_dropout

    def joint(self, feats: dict, valid: dict) -> torch.Tensor:
        """The fused (B, 6d) representation the output layer reads."""
        last = []
        for q in MODALITIES:
            h = torch.cat([self.cross[f"{q}{k}"](feats[q], feats[k], valid[k]) for k in MODALITIES if k != q], -1)
            h = self.mem[q](h, None, valid[q])
            last.append(last_valid(h, valid[q]))
        h = torch.cat(last, -1)
        return h + self.proj2(F.dropout(F.relu(self.proj1(h)), self.output_dropout, self.training))

    def forward(self, feats: dict, valid: dict) -> torch.Tensor:
        return self.out(self.joint(feats, valid))


class GaussianFourier(nn.Module):
    """Fixed random Fourier features of t (not trained: a buffer)."""

    def __init__(self, dim: int, scale: float = 30.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t):
        p = t[:, None] * self.W[None] * 2 * math.pi
        return torch.cat([p.sin(), p.cos()], -1)


def _groups(c: int, want: int) -> int:
    return math.gcd(c, want)


class ScoreUNet(nn.Module):
    def __init__(self, d: int, marginal_std, channels=(32, 64, 128, 256), embed_dim: int = 256, scale: float = 30.0,
                 heads: int = 8, attn_layers: int = 2, causal: bool = True):
        super().__init__()
        ch = [int(c) for c in channels]
        self.marginal_std = marginal_std
        self.embed = nn.Sequential(GaussianFourier(embed_dim, scale), nn.Linear(embed_dim, embed_dim))
        att = lambda c: CrossTransformer(c, heads, attn_layers, causal=causal)  # noqa: E731
        ins = [d] + ch[:-1]
        # encoder: level 1 keeps the length, the others halve it
        self.down = nn.ModuleList(nn.Conv1d(i, o, 3, 1 if k == 0 else 2, 1, bias=False) for k, (i, o) in enumerate(zip(ins, ch)))
        self.down_cond = nn.ModuleList(nn.Conv1d(i, o, 3, 1 if k == 0 else 2, 1, bias=False) for k, (i, o) in enumerate(zip(ins, ch)))
        self.down_att = nn.ModuleList(att(c) for c in ch)
        self.down_t = nn.ModuleList(nn.Linear(embed_dim, c) for c in ch)
        self.down_gn = nn.ModuleList(nn.GroupNorm(_groups(c, 4 if k == 0 else 32), c) for k, c in enumerate(ch))
        # decoder: from the deepest level up, input = previous output (+ the skip connection)
        outs = ch[:-1][::-1] + [d]            # e.g. 128, 64, 32, d
        ups_in = [ch[-1]] + [2 * c for c in ch[:-1][::-1]]   # 256, 2*128, 2*64, 2*32
        cond_in = ch[::-1]                    # the condition's width before each up step
        strides = [2] * (len(ch) - 1) + [1]
        self.up = nn.ModuleList(nn.ConvTranspose1d(i, o, 3, s, 1, bias=s == 1) for i, o, s in zip(ups_in, outs, strides))
        self.up_cond = nn.ModuleList(nn.ConvTranspose1d(i, o, 3, s, 1, bias=s == 1) for i, o, s in zip(cond_in, outs, strides))
        self.up_att = nn.ModuleList(att(c) for c in outs)
        self.up_t = nn.ModuleList(nn.Linear(embed_dim, c) for c in outs[:-1])
        self.up_gn = nn.ModuleList(nn.GroupNorm(_groups(c, 32), c) for c in outs[:-1])

    @staticmethod
    def _attend(att, h, cond):
        return h + att(h.transpose(1, 2), cond.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, d, T) perturbed, t (B,), cond (B, d, T) -> score (B, d, T)."""
        act = F.silu  # swish
        emb = act(self.embed(t))
        h, c, skips = x, cond, []
        for k in range(len(self.down)):
            h, c = self.down[k](h), self.down_cond[k](c)
            h = self._attend(self.down_att[k], h, c) + self.down_t[k](emb)[..., None]
            h = act(self.down_gn[k](h))
            skips.append(h)
        for k in range(len(self.up)):
            target = skips[-k - 2].shape[-1] if k < len(self.up) - 1 else x.shape[-1]
            inp = h if k == 0 else torch.cat([h, skips[-k - 1]], 1)
            h = self.up[k](inp, output_size=[target])
            c = self.up_cond[k](c, output_size=[target])
            h = self._attend(self.up_att[k], h, c)
            if k < len(self.up) - 1:
                h = act(self.up_gn[k](h + self.up_t[k](emb)[..., None]))
        # the score = network output / std(t), in float32 (std(t) spans 3e-3 .. 10): the samplers
        # multiply it by sigma^(2t) dt, up to 625 dt
        return h.float() / self.marginal_std(t.cpu()).to(h.device)[:, None, None]


class _CALayer(nn.Module):
    def __init__(self, c: int, reduction: int):
        super().__init__()
        r = max(1, c // reduction)
        self.body = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Conv1d(c, r, 1), nn.ReLU(), nn.Conv1d(r, c, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.body(x)


class _RCAB(nn.Module):
    def __init__(self, c: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv1d(c, c, 3, 1, 1), _CALayer(c, reduction))

    def forward(self, x):
        return x + self.body(x)


class Refiner(nn.Module):
    def __init__(self, d: int, blocks: int = 20, reduction: int = 16):
        super().__init__()
        c = 2 * d
        self.inp, self.outp = nn.Conv1d(d, c, 1), nn.Conv1d(c, d, 1)
        self.group = nn.Sequential(*[_RCAB(c, reduction) for _ in range(blocks)], nn.Conv1d(c, c, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, d, T) -> (B, d, T)."""
        h = self.inp(x)
        return self.outp(h + self.group(h))
