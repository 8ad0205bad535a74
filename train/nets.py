"""Network building blocks shared by the methods (MMIN's encoders, classifier and autoencoders).

Shapes follow the authors' code (AIM3-RUC/MMIN, see SPEC.md §3): EncA/EncV a 1-layer LSTM with
max-pooling over time, EncT a TextCNN, a fully connected classifier, and the cascade residual
autoencoder (CRA). Unlike the authors' code, pooling skips batch padding by default (their max-pool
ran over padded steps, so an utterance's embedding depended on its batch-mates' lengths);
``pool_over_padding: true`` on an encoder gives their behaviour. ``init_weights`` is the authors'
initialisation (``model.init``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from train.conditions import MODALITIES


def by_length(x: torch.Tensor, lengths: torch.Tensor, fn, min_steps: int = 1) -> torch.Tensor:
    """``fn(x, lengths)`` computed per group of rows, each group cut to the steps its rows read,
    outputs back in row order: rows of length 1 on their first ``min_steps`` steps, the others up
    to the longest of them. A masked or absent modality is one zero frame, so in MMIN's missing
    conditions half the rows of each encoder are length 1 and the batch's padded steps are mostly
    theirs. Exact for ``fn`` whose output for a row depends only on its first max(length,
    ``min_steps``) steps (a unidirectional LSTM pooled over the valid steps, TextCNN's valid
    windows); the kernels' rounding may differ with the batch shape. CPU only: on a GPU the
    padded steps run in parallel and the split would cost a device sync."""
    if x.device.type != "cpu" or len(x) == 0:
        return fn(x, lengths)
    ln, T = lengths.numpy(), x.shape[1]
    short = ln <= 1
    groups = [g for g in (np.flatnonzero(~short), np.flatnonzero(short)) if len(g)]
    if len(groups) == 1:
        steps = min(T, max(int(ln.max()), min_steps))
        return fn(x[:, :steps] if steps < T else x, lengths)
    outs = []
    for g in groups:
        rows = torch.from_numpy(g)
        steps = min(T, max(int(ln[g].max()), min_steps))
        outs.append(fn(x[rows, :steps], lengths[rows]))
    return torch.cat(outs)[torch.from_numpy(np.argsort(np.concatenate(groups)))]


class LSTMEncoder(nn.Module):
    """Unidirectional 1-layer LSTM; utterance embedding = max (or last state, or mean) over time.

    The LSTM runs over the padded batch and the pooling skips the padding: a unidirectional LSTM's
    output at step t < length never sees the padding, so this equals running on packed sequences,
    whose backward pass is 20-50x slower on CPU (torch 2.13: 92 s vs 2 s for 128 x 600 frames).

    ``pool_over_padding=True`` is the authors' code (AIM3-RUC/MMIN lstm.py): max / mean over every
    step of the padded batch, ``last`` = the state after the padding, so the embedding depends on
    the batch's longest utterance; imer's default pools over the utterance's own steps only."""

    def __init__(self, in_dim: int, hidden: int = 128, pool: str = "max", pool_over_padding: bool = False):
        super().__init__()
        if pool not in ("max", "last", "mean"):
            raise ValueError(f"LSTM pool must be max, last or mean, got {pool!r}")
        self.rnn = nn.LSTM(in_dim, hidden, batch_first=True)
        self.pool = pool
        self.pool_over_padding = bool(pool_over_padding)
        self.out_dim = hidden

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        lengths = lengths.to(x.device).clamp(min=1, max=T)
        if self.pool_over_padding:  # the authors' behaviour: the padding counts as steps
            return self._pooled(x, torch.full_like(lengths, T))
        return by_length(x, lengths, self._pooled)

    def _pooled(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        out, _ = self.rnn(x)
        if self.pool == "last":
            return out[torch.arange(len(out), device=x.device), lengths - 1]
        valid = torch.arange(T, device=x.device)[None, :] < lengths[:, None]
        if self.pool == "max":
            return out.masked_fill(~valid[..., None], float("-inf")).amax(1)
        return (out * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)


class TextCNN(nn.Module):
    """Kim's TextCNN: parallel 1-D convolutions (kernels 3/4/5 over the whole feature dim),
    ReLU, max over positions, dropout, Linear + ReLU to the embedding. The max skips windows that
    start in the batch padding unless ``pool_over_padding`` (the authors' textcnn.py)."""

    def __init__(self, in_dim: int, embed: int = 128, channels: int = 128, kernels=(3, 4, 5), dropout: float = 0.5,
                 pool_over_padding: bool = False):
        super().__init__()
        self.pool_over_padding = bool(pool_over_padding)
        self.kernels = tuple(int(k) for k in kernels)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, channels, k) for k in self.kernels)
        self.dropout = nn.Dropout(dropout)
        self.embd = nn.Sequential(nn.Linear(len(self.kernels) * channels, embed), nn.ReLU())
        self.out_dim = embed

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(x.device)
        kmax = max(self.kernels)
        if self.pool_over_padding:
            pooled = self._pooled(x, torch.full_like(lengths, max(x.shape[1], kmax)))
        else:  # a window starting at a valid position reads at most max(length, kmax) steps
            pooled = by_length(x, lengths, self._pooled, min_steps=kmax)
        return self.embd(self.dropout(pooled))  # dropout over the whole batch, in row order

    def _pooled(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, len(kernels) x channels): each kernel's max over the valid windows."""
        xt = x.transpose(1, 2)  # (B, D, T)
        kmax = max(self.kernels)
        if xt.shape[2] < kmax:  # short utterances: zero-pad so the widest kernel fits once
            xt = nn.functional.pad(xt, (0, kmax - xt.shape[2]))
        pooled = []
        for conv, k in zip(self.convs, self.kernels):
            a = torch.relu(conv(xt))  # (B, C, P)
            # positions whose window lies inside the utterance (at least one per utterance);
            # after ReLU every value is >= 0, so zeroing the others leaves the max unchanged
            n_valid = (lengths - k + 1).clamp(min=1)
            keep = torch.arange(a.shape[2], device=x.device)[None, :] < n_valid[:, None]
            pooled.append((a * keep[:, None, :]).amax(2))
        return torch.cat(pooled, 1)


class FcClassifier(nn.Module):
    """Hidden layers Linear -> ReLU -> Dropout, then a Linear output layer."""

    def __init__(self, in_dim: int, layers, out_dim: int, dropout: float = 0.3):
        super().__init__()
        mods, d = [], in_dim
        for h in layers:
            mods += [nn.Linear(d, h), nn.ReLU()]
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
            d = h
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


INIT_KINDS = ("default", "kaiming", "normal")


def init_weights(module: nn.Module, spec) -> nn.Module:
    """The authors' ``init_net`` (AIM3-RUC/MMIN models/networks/tools.py, also IF-MMIN's), config
    ``model.init``: on every Linear and Conv layer, ``kaiming`` = kaiming_normal_ (fan-in, gain
    sqrt(2)) or ``normal`` = N(0, std) (``{kind: normal, std: 0.012}``, their ``init_gain``), and a
    zero bias. LSTMs keep PyTorch's init, as in their code. ``default`` (or none) leaves PyTorch's
    init (uniform, about 2.4x smaller than kaiming for these layers)."""
    spec = {"kind": spec} if isinstance(spec, str) or spec is None else dict(spec)
    kind = spec.get("kind") or "default"
    if kind not in INIT_KINDS:
        raise ValueError(f"model.init {kind!r} unknown; use {', '.join(INIT_KINDS)}")
    if kind == "default":
        return module
    std = float(spec.get("std", 0.012))
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def make_encoder(kind: str, in_dim: int, **kw) -> nn.Module:
    if kind == "lstm":
        return LSTMEncoder(in_dim, **kw)
    if kind == "textcnn":
        return TextCNN(in_dim, **kw)
    raise ValueError(f"encoder kind {kind!r} unknown; use lstm or textcnn")


class ModalityEncoders(nn.Module):
    """One encoder per modality; ``forward`` returns {m: (B, E_m)} and ``fuse`` concatenates
    them in the (a, v, t) order of MMIN's Eq. 1."""

    def __init__(self, dims: dict[str, int], cfg: dict):
        super().__init__()
        self.enc = nn.ModuleDict()
        for m in MODALITIES:
            c = dict(cfg[m])
            self.enc[m] = make_encoder(c.pop("kind"), dims[m], **c)
        self.out_dims = {m: self.enc[m].out_dim for m in MODALITIES}

    @property
    def out_dim(self) -> int:
        return sum(self.out_dims.values())

    def forward(self, x: dict, lengths: dict) -> dict:
        return {m: self.enc[m](x[m], lengths[m]) for m in MODALITIES}

    @staticmethod
    def fuse(h: dict) -> torch.Tensor:
        return torch.cat([h[m] for m in MODALITIES], dim=-1)


def _mlp(dims, act, last_act=None) -> nn.Sequential:
    mods = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            mods.append(act())
        elif last_act is not None:
            mods.append(last_act())
    return nn.Sequential(*mods)


class CascadeResidualAE(nn.Module):
    """MMIN's CRA (Tran et al. 2017): ``blocks`` autoencoders; block 1 reads h, block k reads
    h + sum of the previous blocks' outputs (Eq. 2). Encoders in -> layers (LeakyReLU between,
    none after the latent), decoders latent -> in (ReLU between, linear output). Output =
    transition(h + sum of all outputs), a Linear-ReLU-Linear head; latents are concatenated
    (blocks x layers[-1]) into the joint representation. ``transition=False`` returns
    h + sum of all outputs itself (EMMR's D_MMIN, Eq. 6)."""

    def __init__(self, in_dim: int, layers=(256, 128, 64), blocks: int = 5, transition: bool = True):
        super().__init__()
        layers = [int(v) for v in layers]
        self.encoders = nn.ModuleList(_mlp([in_dim, *layers], nn.LeakyReLU) for _ in range(blocks))
        self.decoders = nn.ModuleList(_mlp([*layers[::-1], in_dim], nn.ReLU) for _ in range(blocks))
        self.transition = (nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, in_dim))
                           if transition else nn.Identity())
        self.latent_dim = layers[-1] * blocks

    def forward(self, h: torch.Tensor):
        x_in, x_out = h, torch.zeros_like(h)
        latents = []
        for enc, dec in zip(self.encoders, self.decoders):
            x_in = x_in + x_out
            z = enc(x_in)
            x_out = dec(z)
            latents.append(z)
        return self.transition(x_in + x_out), torch.cat(latents, dim=-1)


class PlainAE(nn.Module):
    """The MMIN-AE ablation's single autoencoder (the authors' SimpleFcAE): every encoder layer
    followed by LeakyReLU (the latent too), decoder LeakyReLU between layers and ReLU at the
    output. Returns (reconstruction, latent)."""

    def __init__(self, in_dim: int, layers=(512, 450, 384, 256), out_act: str = "relu"):
        super().__init__()
        layers = [int(v) for v in layers]
        self.encoder = _mlp([in_dim, *layers], nn.LeakyReLU, nn.LeakyReLU)
        last = {"relu": nn.ReLU, "none": None}[out_act]
        self.decoder = _mlp([*layers[::-1], in_dim], nn.LeakyReLU, last)
        self.latent_dim = layers[-1]

    def forward(self, h: torch.Tensor):
        z = self.encoder(h)
        return self.decoder(z), z


def make_imagination(in_dim: int, cfg: dict) -> nn.Module:
    c = dict(cfg)
    kind = c.pop("kind", "cra")
    if kind == "cra":
        return CascadeResidualAE(in_dim, **c)
    if kind == "ae":
        return PlainAE(in_dim, **c)
    raise ValueError(f"imagination kind {kind!r} unknown; use cra or ae")


# ---- attention masks ---------------------------------------------------------------------------

def modality_valid(batch: dict, m: str) -> torch.Tensor:
    """(B, T) bool: real, valid frames of modality ``m`` that the sample keeps (frame mask AND
    natural presence AND availability under the missing condition)."""
    i = MODALITIES.index(m)
    fm = batch["frame_mask"][m].to(batch["present"].device)
    return fm & batch["present"][:, i:i + 1]


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` for nn.MultiheadAttention (True = ignore) from (B, T) validity. A row
    with no valid key (a missing modality) keeps its first key, a zero frame, so softmax never
    sees an all-masked row (which gives NaN); the caller decides what that row's output means."""
    ignore = ~valid.bool()
    empty = ignore.all(1)
    if empty.any():
        ignore = ignore.clone()
        ignore[empty, 0] = False
    return ignore
