"""EMMR's building blocks (Zeng, Zhou, Liu; EMNLP 2022), used by ``train/methods/emmr.py``.

The modalities live in one time-concatenated sequence in the paper's order X = [E_v; E_a; E_t]
(Eq. 2); a ``Layout`` holds each modality's slice of the time axis. Masks over that axis:
``valid`` (frames the sample really has: frame mask & availability), ``slots`` (valid frames plus
every position of a missing modality, whose content is reconstructed) and per-sample modality
selections (B, 3) in (v, a, t) order.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.device import float32
from train.conditions import MODALITIES
from train.nets import key_padding_mask, modality_valid  # noqa: F401  (modality_valid: for emmr.py)

ORDER = ("v", "a", "t")                      # the paper's concatenation order (Eq. 2)
AVT = [MODALITIES.index(m) for m in ORDER]   # columns of an (a, v, t) availability array, in that order
PAIR_NAMES = ("va", "vt", "at")              # Eqs. 9-11, in the order of E_key
# The Judge's subsets (Eqs. 8-9, and the single modalities of the check with two missing), as
# selections in ORDER: subset code c = v + 2a + 4t, at position c - 1.
SUBSETS = tuple(tuple(bool(c >> i & 1) for i in range(3)) for c in range(1, 8))
SUBSET_NAMES = tuple("".join(m for m, keep in zip(ORDER, sub) if keep) for sub in SUBSETS)
FULL = SUBSET_NAMES.index("vat")                                  # L_vat
PAIR_SUBSETS = tuple(SUBSET_NAMES.index(n) for n in PAIR_NAMES)   # L_va, L_vt, L_at


def subset_index(select: torch.Tensor) -> torch.Tensor:
    """Position in ``SUBSETS`` of per-row selections (n, 3) in ORDER."""
    w = torch.tensor([1, 2, 4], device=select.device)
    return (select.long() * w).sum(-1) - 1


class Layout:
    """Where each modality sits on the concatenated time axis."""

    def __init__(self, lengths: dict[str, int]):
        self.lengths = [int(lengths[m]) for m in ORDER]
        starts = [0]
        for n in self.lengths[:-1]:
            starts.append(starts[-1] + n)
        self.slices = [slice(s, s + n) for s, n in zip(starts, self.lengths)]
        self.total = sum(self.lengths)

    def expand(self, per_modality: torch.Tensor) -> torch.Tensor:
        """(B, 3) per-modality values in ORDER -> (B, T) per-frame values."""
        reps = torch.tensor(self.lengths, device=per_modality.device)
        return torch.repeat_interleave(per_modality, reps, dim=1)


def cat_frames(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([parts[m] for m in ORDER], dim=1)


def balanced_pool(seq: torch.Tensor, frames: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Utterance vector of a (B, T, d) sequence: the mean over modalities of each modality's mean
    over its ``frames`` (B, T); a modality with no such frame is left out. Balanced so that 150
    audio frames do not outweigh 25 text tokens."""
    f = frames.to(seq.dtype)
    weights, has = [], []
    for sl in layout.slices:
        c = f[:, sl].sum(1, keepdim=True)
        weights.append(f[:, sl] / c.clamp(min=1))
        has.append(c > 0)
    n_mod = torch.cat(has, 1).sum(1, keepdim=True).clamp(min=1).to(seq.dtype)
    w = torch.cat(weights, 1) / n_mod
    return torch.einsum("bt,btd->bd", w, seq)


@float32
def sym_kl(a: torch.Tensor, b: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """½ (KL(softmax a || softmax b) + KL(softmax b || softmax a)) over the last dim, averaged over
    the ``frames`` (B, T) that count (Eqs. 15-16)."""
    la, lb = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
    per = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if frames is None:
        return per.mean()
    f = frames.to(per.dtype)
    return (per * f).sum() / f.sum().clamp(min=1)


class ModalityEncoder(nn.Module):
    """Eq. 1: per modality a dense projection to d, then multi-head self-attention over the
    modality's valid frames. The teacher is a second instance of this module."""

    def __init__(self, dims: dict[str, int], d: int = 300, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], d) for m in ORDER})
        self.mha = nn.ModuleDict({m: nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
                                  for m in ORDER})
        self.dim = d

    def forward(self, x: dict, valid: dict) -> dict:
        out = {}
        for m in ORDER:
            k = self.proj[m](x[m])
            out[m], _ = self.mha[m](k, k, k, key_padding_mask=key_padding_mask(valid[m]), need_weights=False)
        return out


def ffn(d: int, hidden: int, dropout: float) -> nn.Sequential:
    """FFN(x) = ReLU(x W1 + b1) W2 + b2 (Eq. 7)."""
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d))


class TransformerED(nn.Module):
    """Eq. 7: E_TF = FFN(MHA(X, X, X)), D_TF = FFN(MHA(F, F, F)). The encoder attends to the
    frames the sample has; the decoder to every slot, so a missing modality's positions read the
    available modalities through the encoder and are decoded into its reconstruction."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.enc_mha = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.enc_ffn = ffn(d, ffn_dim, dropout)
        self.dec_mha = nn.MultiheadAttention(d, heads, dropout=attn_dropout, batch_first=True)
        self.dec_ffn = ffn(d, ffn_dim, dropout)

    def encode(self, x, valid):
        h, _ = self.enc_mha(x, x, x, key_padding_mask=key_padding_mask(valid), need_weights=False)
        return self.enc_ffn(h)

    def decode(self, f, slots):
        h, _ = self.dec_mha(f, f, f, key_padding_mask=key_padding_mask(slots), need_weights=False)
        return self.dec_ffn(h)


class FrameAE(nn.Module):
    """Eq. 5: h_i = ReLU(FC(h_{i-1})), sizes 300-256-128-64-128-256-300, applied per frame;
    returns the decoder output h_7."""

    def __init__(self, d: int, layers=(256, 128, 64)):
        super().__init__()
        sizes = [d, *[int(v) for v in layers], *[int(v) for v in layers[-2::-1]], d]
        mods = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class Judge(nn.Module):
    """L_S = FC(MHA([I_m || ...])) for every non-empty subset S of the modalities (Eqs. 8-9): one
    attention + classifier for the triple, the pairs and the single modalities, so that their
    predictions are on one scale. For subset S, attention and pooling read only S's slots.

    All seven subsets come from one pass: the attention scores of a sequence are computed once,
    and per key modality m the softmax numerator N_m = sum_j exp(s_ij - c_m) v_j and denominator
    D_m = sum_j exp(s_ij - c_m) over m's slots (c_m: the row's maximum there); subset S's attention
    output is sum_{m in S} e^{c_m - c_S} N_m / sum_{m in S} e^{c_m - c_S} D_m, exactly the softmax
    over S's keys (the log-sum-exp merge of flash attention). A 7-subset Judge costs about one
    attention pass, not seven. Dropout (off by default) drops attention weights in the numerator
    only, as dropout on normalised weights does. The output projection comes after the pooling,
    which is the same map because the pooling weights sum to 1."""

    def __init__(self, d: int, heads: int, n_out: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"emmr: the model dim {d} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.fc = nn.Linear(d, n_out)

    def forward(self, seq: torch.Tensor, slots: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Logits (n, 7, C) of every subset in ``SUBSETS`` order, for sequences ``seq`` (n, T, d)
        whose slots are ``slots`` (n, T)."""
        n, T, d = seq.shape
        q, k, v = self.qkv(seq).view(n, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5  # (n, heads, T, T)
        s = s.masked_fill(~slots[:, None, None, :], float("-inf"))
        num, den, top = [], [], []
        for sl in layout.slices:
            part = s[..., sl]
            c = part.amax(-1, keepdim=True).detach()  # -inf where no slot; the result does not depend on c
            w = torch.exp(part - torch.where(c.isfinite(), c, torch.zeros_like(c)))
            den.append(w.sum(-1, keepdim=True))
            if self.training and self.dropout:
                w = nn.functional.dropout(w, self.dropout)
            num.append(w @ v[..., sl, :])
            top.append(c)
        pooled, tiny = [], torch.finfo(num[0].dtype).tiny
        for sub in SUBSETS:
            ms = [i for i in range(3) if sub[i]]
            c = torch.stack([top[i] for i in ms]).amax(0)
            c = torch.where(c.isfinite(), c, torch.zeros_like(c))
            scale = {i: torch.exp(top[i] - c) for i in ms}
            h = sum(scale[i] * num[i] for i in ms) / sum(scale[i] * den[i] for i in ms).clamp_min(tiny)
            frames = slots & layout.expand(torch.tensor(sub, device=slots.device).expand(n, 3))
            pooled.append(balanced_pool(h.transpose(1, 2).flatten(2), frames, layout))  # (n, d)
        return self.fc(self.out(torch.stack(pooled, 1)))  # (n, 7, C)


@float32
def pair_weights(pair_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 10: alpha = softmax over the three pairs of L'_k = max softmax(L_k); (..., 3, C) -> (..., 3).
    From probabilities, not raw logits: a pair is trusted for how sure it is."""
    return torch.softmax(torch.softmax(pair_logits.float(), -1).amax(-1), -1)


def key_representation(pair_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 11: E_key = [alpha_va L_va || alpha_vt L_vt || alpha_at L_at]; (..., 3, C) -> (..., 3C)."""
    w = pair_weights(pair_logits).to(pair_logits.dtype)
    return (w.unsqueeze(-1) * pair_logits).flatten(-2)


class Fusion(nn.Module):
    """Eq. 12 over the reconstructors' E_key, H (B, J, K): M = tanh(H), beta = softmax(w^T M) over
    the J reconstructors, r = H beta^T. ``kind`` max / average are Table 3's alternatives."""

    def __init__(self, dim: int, kind: str = "attention"):
        super().__init__()
        if kind not in ("attention", "max", "average"):
            raise ValueError(f"emmr: model.fusion must be attention, max or average, got {kind!r}")
        self.kind = kind
        self.w = nn.Parameter(torch.randn(dim) / dim ** 0.5) if kind == "attention" else None

    def weights(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.tanh(h) @ self.w.to(h.dtype), dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return h.amax(1)
        if self.kind == "average":
            return h.mean(1)
        return (self.weights(h).unsqueeze(-1) * h).sum(1)
