"""CM-ARR's building blocks (Sun et al., 2024): the uncertainty modelling component, the
2-Wasserstein similarity and the two contrastive losses, the missing-latent rule, the residual
channel-attention refinement and the attention fusion. Choices the paper leaves open are
explained in ``train/methods/cm_arr.py``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.device import float32
from train.nets import key_padding_mask


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, d) over the frames where ``valid`` (B, T) is True; zeros for a row with none."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


class UMC(nn.Module):
    """Uncertainty modelling component (Fig. 3): Linear(D_n -> d), multi-head self-attention
    (sequence-level interaction) and a GELU MLP (feature-level interaction), each with a residual
    and LayerNorm, then two heads: the mean sequence mu and the standard-deviation sequence sigma
    (softplus, > 0) of a diagonal Gaussian per frame. Returns (h0, mu, sigma); h0 is the input
    projection (the point representation before alignment, used for the t-SNE figure)."""

    def __init__(self, in_dim: int, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.ln2 = nn.LayerNorm(dim)
        self.mu = nn.Linear(dim, dim)
        self.sigma = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor):
        h0 = self.inp(x)
        a, _ = self.attn(h0, h0, h0, key_padding_mask=key_padding_mask(valid), need_weights=False)
        h = self.ln1(h0 + a)
        h = self.ln2(h + self.mlp(h))
        return h0, self.mu(h), F.softplus(self.sigma(h)) + 1e-4


@float32
def w2_distance(mu1: torch.Tensor, sig1: torch.Tensor, mu2: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
    """Eq. 1 for every pair of a batch: D[i, j] = ||mu1_i - mu2_j||^2 + ||sig1_i - sig2_j||^2,
    the squared 2-Wasserstein distance of two diagonal Gaussians with standard deviations sig."""
    return torch.cdist(mu1.float(), mu2.float()).pow(2) + torch.cdist(sig1.float(), sig2.float()).pow(2)


class Similarity(nn.Module):
    """S = a * D_2W + b (Eq. 5) with a < 0 (a = -softplus(raw)), b a shift; ``learn`` makes a and b
    parameters, else fixed. ``kind: cosine`` is the point-based ablation (S = cosine of the means).
    a starts at -1/d, so that a * D_2W is minus the per-dimension mean squared distance: of order 1
    at initialisation, the range of a cosine similarity."""

    def __init__(self, dim: int, kind: str = "w2", learn: bool = True, a_init: float | None = None, b_init: float = 0.0):
        super().__init__()
        if kind not in ("w2", "cosine"):
            raise ValueError(f"model.align.similarity {kind!r} unknown; use w2 or cosine")
        self.kind = kind
        a0 = abs(a_init) if a_init is not None else 1.0 / dim
        raw = torch.tensor(math.log(math.expm1(a0)))
        b = torch.tensor(float(b_init))
        if learn:
            self.a_raw, self.b = nn.Parameter(raw), nn.Parameter(b)
        else:
            self.register_buffer("a_raw", raw)
            self.register_buffer("b", b)

    @property
    def a(self) -> torch.Tensor:
        return -F.softplus(self.a_raw)

    @float32  # the similarities become InfoNCE logits (divided by tau ~ 0.07): a matmul in bf16 is off by ~1e-2
    def forward(self, mu1, sig1, mu2, sig2) -> torch.Tensor:
        if self.kind == "cosine":
            return F.normalize(mu1.float(), dim=-1) @ F.normalize(mu2.float(), dim=-1).T
        return self.a * w2_distance(mu1, sig1, mu2, sig2) + self.b


@float32
def info_nce(sim: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-4: sim[i, j] = S(n_i, m_j); positives on the diagonal (same utterance), the other
    utterances of the batch are negatives; both directions, each averaged over the batch."""
    logits = sim / tau
    target = torch.arange(len(sim), device=sim.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)


@float32
def supcon(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): every view i is an anchor, its
    positives are all other views with the same label (other modalities of the same utterance
    and every modality of other utterances of that class), the denominator runs over every view
    but i. Anchors without a positive are left out; 0 when none has one."""
    z = F.normalize(z.float(), dim=-1)
    n = len(z)
    logits = z @ z.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return z.sum() * 0.0
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[keep] / n_pos[keep]
    return -mean_pos.mean()


def missing_latents(z: dict, present: torch.Tensor, order) -> torch.Tensor:
    """Eq. 7 per sample: the estimate of a missing modality's latent = the mean of the available
    modalities' latents (the single one when one is available, zeros, the base mean, when none).
    ``z[m]`` is (B, T, d); ``present`` (B, M) bool in ``order``. Selection, not multiplication by
    the mask, so a non-finite latent of an unavailable modality cannot leak in."""
    stack = torch.stack([z[m] for m in order], 1)  # (B, M, T, d)
    keep = present.view(*present.shape, 1, 1)
    total = torch.where(keep, stack, torch.zeros((), dtype=stack.dtype, device=stack.device)).sum(1)
    return total / present.sum(1).clamp(min=1).to(stack.dtype).view(-1, 1, 1)


class ChannelAttention(nn.Module):
    """RCAN's channel attention on (B, C, L): average over L, 1x1 conv C -> C/r, ReLU, 1x1 conv
    back, sigmoid; ``weights`` gives the (B, C, 1) attention in [0, 1]."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        mid = max(1, channels // reduction)
        self.net = nn.Sequential(nn.Conv1d(channels, mid, 1), nn.ReLU(), nn.Conv1d(mid, channels, 1), nn.Sigmoid())

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean(2, keepdim=True))

    def forward(self, x):
        return x * self.weights(x)


class RCAB(nn.Module):
    """Residual channel-attention block with 1-D convolutions: x + CA(conv3(ReLU(conv3(x))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(channels, channels, 3, padding=1))
        self.ca = ChannelAttention(channels, reduction)

    def forward(self, x):
        return x + self.ca(self.body(x))


class Refiner(nn.Module):
    """``blocks`` stacked RCABs on a (B, T, d) sequence (convolved as (B, d, T))."""

    def __init__(self, dim: int, blocks: int = 4, reduction: int = 16):
        super().__init__()
        self.blocks = nn.Sequential(*(RCAB(dim, reduction) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.transpose(1, 2)).transpose(1, 2)


class AttentionBlock(nn.Module):
    """Transformer block (post-norm): LN(q + MHA(q, kv, kv)), then LN(x + FFN(x)). kv = q makes it
    self-attention."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, q, kv, kv_valid):
        a, _ = self.attn(q, kv, kv, key_padding_mask=key_padding_mask(kv_valid), need_weights=False)
        h = self.ln1(q + a)
        return self.ln2(h + self.ff(h))


class AttentionFusion(nn.Module):
    """Eqs. 10-13: H_qm = CrossAttention(Q = X_q, K = V = X_m) for the two other modalities m,
    H' = [H_qm1 ; H_qm2] (feature concatenation), H = SelfAttention(H'), mean over the query's
    valid frames -> (B, 2d)."""

    def __init__(self, dim: int, query: str, order, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if query not in order:
            raise ValueError(f"model.fusion.query must be one of {list(order)}, got {query!r}")
        self.query = query
        self.others = [m for m in order if m != query]
        self.cross = nn.ModuleDict({m: AttentionBlock(dim, heads, dropout) for m in self.others})
        self.self_attn = AttentionBlock(2 * dim, heads, dropout)
        self.out_dim = 2 * dim

    def forward(self, x: dict, valid: dict) -> torch.Tensor:
        q = x[self.query]
        h = torch.cat([self.cross[m](q, x[m], valid[m]) for m in self.others], dim=-1)
        h = self.self_attn(h, h, valid[self.query])
        return masked_mean(h, valid[self.query])


class ConcatFusion(nn.Module):
    """The "w/o attention" ablation: each modality's mean over its valid frames, concatenated."""

    def __init__(self, dim: int, order):
        super().__init__()
        self.order = list(order)
        self.out_dim = dim * len(self.order)

    def forward(self, x: dict, valid: dict) -> torch.Tensor:
        return torch.cat([masked_mean(x[m], valid[m]) for m in self.order], dim=-1)
