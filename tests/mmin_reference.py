"""Reference computations for the MMIN-family mechanism tests (baseline, MMIN, IF-MMIN).

Each function is the papers' equation written out with plain torch ops. It reads a module's
weights (``weight``, ``bias`` of its Linear/Conv/LSTM layers) but never calls the module's own
forward code, so a change in the implementation's wiring shows up as a difference. Every encoder
reference works on ONE utterance at a time, on that utterance's own frames: an embedding cannot
depend on batch padding, and a masked or absent modality is one zero frame."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODALITIES = ("a", "v", "t")  # the fused vector's order (MMIN Eq. 1: a, v, t)


def hooked(fn, hooks):
    """``fn()`` without gradient, then the forward ``hooks`` removed (whatever happens)."""
    try:
        with torch.no_grad():
            return fn()
    finally:
        for h in hooks:
            h.remove()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.01 * x)  # PyTorch's default slope


def recorder(rec: dict, *keys):
    """A forward hook that appends a module's (input, output) to ``rec[keys[0]]``,
    ``rec[keys[1]]`` (a None key skips that one) and changes nothing."""
    def hook(_, i, o):
        for k, v in zip(keys, (i[0], o)):
            if k:
                rec[k].append(v)
    return hook


# ---- encoders, one utterance (L, D) at a time ------------------------------------------------------

def lstm_maxpool(enc, seq: torch.Tensor) -> torch.Tensor:
    """EncA / EncV: 1-layer LSTM (gates i, f, g, o), max over the utterance's L outputs."""
    rnn = enc.rnn
    H = rnn.weight_hh_l0.shape[1]
    h = c = seq.new_zeros(H)
    outs = []
    for x_t in seq:
        g = rnn.weight_ih_l0 @ x_t + rnn.bias_ih_l0 + rnn.weight_hh_l0 @ h + rnn.bias_hh_l0
        i, f, gg, o = g[:H].sigmoid(), g[H:2 * H].sigmoid(), g[2 * H:3 * H].tanh(), g[3 * H:].sigmoid()
        c = f * c + i * gg
        h = o * c.tanh()
        outs.append(h)
    return torch.stack(outs).amax(0)


def textcnn(enc, seq: torch.Tensor) -> torch.Tensor:
    """EncT (Kim's TextCNN, eval mode): for each kernel width k, every window of k frames inside
    the utterance (an utterance shorter than k is zero-padded to one window), ReLU, max over the
    windows; concatenated, then Linear + ReLU."""
    pooled = []
    for conv in enc.convs:
        W, b = conv.weight, conv.bias  # (C, D, k)
        k = W.shape[2]
        s = seq if len(seq) >= k else torch.cat([seq, seq.new_zeros(k - len(seq), seq.shape[1])])
        windows = [torch.einsum("cdj,jd->c", W, s[p:p + k]) + b for p in range(len(s) - k + 1)]
        pooled.append(torch.relu(torch.stack(windows)).amax(0))
    (fc,) = linears(enc.embd)
    return torch.relu(linear(fc, torch.cat(pooled)))


def encode_one(encoders, m: str, seq: torch.Tensor) -> torch.Tensor:
    enc = encoders.enc[m]
    return lstm_maxpool(enc, seq) if hasattr(enc, "rnn") else textcnn(enc, seq)


def utterance(data, i: int, m: str, keep: bool) -> torch.Tensor:
    """Utterance ``i``'s frames of modality ``m`` when kept and present, else one zero frame."""
    s = data.seqs[m]
    if keep and s.lengths[i] > 0:
        return torch.from_numpy(np.array(s.seq(i), dtype=np.float32))
    return torch.zeros(1, s.dim)


def embed(encoders, data, idx, keep) -> dict:
    """{m: (B, E)}: each sample's own frames of the modalities ``keep`` (B, 3) marks, one zero
    frame for the others."""
    keep = np.asarray(keep, bool)
    return {m: torch.stack([encode_one(encoders, m, utterance(data, int(i), m, keep[b, j]))
                            for b, i in enumerate(idx)])
            for j, m in enumerate(MODALITIES)}


def fuse(h: dict) -> torch.Tensor:
    return torch.cat([h[m] for m in MODALITIES], -1)


def natural(data, idx) -> np.ndarray:
    return np.stack([data.seqs[m].lengths[np.asarray(idx)] > 0 for m in MODALITIES], 1)


# ---- heads --------------------------------------------------------------------------------------

def classifier(clf, x: torch.Tensor) -> torch.Tensor:
    """FC hidden layers Linear -> ReLU (dropout off in eval), then the output Linear."""
    layers = linears(clf)
    for layer in layers[:-1]:
        x = torch.relu(linear(layer, x))
    return linear(layers[-1], x)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(logits - torch.logsumexp(logits, -1, keepdim=True))[torch.arange(len(y)), y].mean()


def ae_encoder(seq, x):
    """CRA block encoder 384 -> 256 -> 128 -> 64: LeakyReLU between layers, none on the latent."""
    layers = linears(seq)
    for layer in layers[:-1]:
        x = leaky_relu(linear(layer, x))
    return linear(layers[-1], x)


def ae_decoder(seq, x):
    """CRA block decoder 64 -> 128 -> 256 -> 384: ReLU between layers, linear output."""
    layers = linears(seq)
    for layer in layers[:-1]:
        x = torch.relu(linear(layer, x))
    return linear(layers[-1], x)


def transition(head, x):
    """The authors' output head: Linear - ReLU - Linear."""
    first, second = linears(head)
    return linear(second, torch.relu(linear(first, x)))


def cra(net, h: torch.Tensor):
    """MMIN's CRA (Eq. 2-3 + the authors' head): block k reads h + sum of the previous blocks'
    outputs; h' = transition(h + sum of all outputs); joint representation = the latents."""
    total, latents = h, []
    for enc, dec in zip(net.encoders, net.decoders):
        z = ae_encoder(enc, total)
        latents.append(z)
        total = total + ae_decoder(dec, z)
    return transition(net.transition, total), torch.cat(latents, -1)


def if_im(net, h: torch.Tensor, inv: torch.Tensor, cascade: bool = True):
    """IF-MMIN's IF-IM (Eq. 2): dz_1 = w_1(H' + h), dz_i = w_i(H' + dz_{i-1}) (without cascade:
    w_i(dz_{i-1})); h' = transition(dz_M); joint representation = the latents."""
    latents, out = [], None
    for i, (enc, dec) in enumerate(zip(net.encoders, net.decoders)):
        x = h + inv if i == 0 else (out + inv if cascade else out)
        z = ae_encoder(enc, x)
        latents.append(z)
        out = ae_decoder(dec, z)
    return transition(net.transition, out), torch.cat(latents, -1)


def invariance(inv_enc, h: dict) -> torch.Tensor:
    """H = concat over (a, v, t) of Enc'(h_m), Enc' = 2 x [Linear, LeakyReLU], shared."""
    def one(x):
        for layer in linears(inv_enc):
            x = leaky_relu(linear(layer, x))
        return x
    return torch.cat([one(h[m]) for m in MODALITIES], -1)


# ---- distances ----------------------------------------------------------------------------------

def mse(a, b):
    return ((a - b) ** 2).mean()


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt()


def cmd(X: torch.Tensor, Y: torch.Tensor, K: int = 5, span: float = 1.0) -> torch.Tensor:
    """Central moment discrepancy (Zellinger et al., ICLR 2017, Def. 1) for samples X, Y (N, d)
    on [a, b]^d with span = |b - a|:
        ||E(X) - E(Y)||_2 / span + sum_{k=2..K} ||c_k(X) - c_k(Y)||_2 / span^k,
    c_k = E((X - E X)^k) per coordinate (biased, 1/N). IF-MMIN's Eq. 1 is span = 1."""
    ex, ey = X.mean(0), Y.mean(0)
    d = ((ex - ey) ** 2).sum().sqrt() / span
    for k in range(2, K + 1):
        ck_x, ck_y = ((X - ex) ** k).mean(0), ((Y - ey) ** k).mean(0)
        d = d + ((ck_x - ck_y) ** 2).sum().sqrt() / span ** k
    return d
