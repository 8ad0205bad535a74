"""Normalizing flows on d-dimensional frame vectors: Glow-style steps built from zuko's transforms.

One step = ActNorm -> fixed permutation -> LU-decomposed linear map ("invertible 1x1 conv") ->
affine coupling (Kingma & Dhariwal 2018, Glow). The flow acts on the last dimension only, so a
(B, T, d) sequence is transformed frame by frame; it never mixes time steps (unlike an image Glow
whose couplings convolve over space).

zuko supplies the permutation (``PermutationTransform``), the LU linear map
(``LULinearTransform``) and the affine coupling (``GeneralCouplingTransform`` with its
``MonotonicAffineTransform``); zuko has no ActNorm, so ``ActNorm`` below adds it (torch's own
``AffineTransform`` does the arithmetic). Initialisation, so that a fresh flow is well-conditioned:

- ActNorm: data-dependent (Glow): on the first training batch, shift and log-scale are set so
  that the step's output has zero mean and unit variance per dimension over the valid frames;
- LU linear: the identity (the permutation before it gives W = P at start, an orthogonal map);
- coupling: the hyper network's last layer is zeroed, so every coupling starts as the identity
  (Glow's zero initialisation of the last convolution).

Forward, inverse and log|det J| run in float32 whatever the autocast (exact inverses, and the LU
map's triangular solves take no half precision); ``gaussian_nll`` too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import AffineTransform
from zuko.flows import GeneralCouplingTransform
from zuko.lazy import LazyTransform, UnconditionalTransform
from zuko.transforms import LULinearTransform, PermutationTransform


class ActNorm(LazyTransform):
    """Per-dimension affine map y = x * exp(log_scale) + shift with Glow's data-dependent init
    (``initialize``); log|det J| = sum(log_scale) per frame."""

    def __init__(self, features: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Set shift / log_scale from the frames of ``x`` (..., d) where ``mask`` (...) is True."""
        v = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
        if len(v) < 2:
            return  # nothing to estimate from: stay at the identity, try again next batch
        mean, std = v.mean(0), v.std(0).clamp(min=1e-6)
        self.log_scale.copy_(-std.log())
        self.shift.copy_(-mean / std)
        self.initialized.fill_(True)

    def forward(self, c=None):
        return AffineTransform(self.shift, self.log_scale.exp(), event_dim=1)


class GlowFlow(nn.Module):
    """``steps`` Glow steps on ``features``-dim vectors. ``forward(x, mask) -> (z, log|det J|)``
    with log|det J| of shape x.shape[:-1]; ``inverse(z) -> x``. Coupling masks alternate between
    the odd and the even dimensions; each coupling's hyper network is an MLP with ``hidden``
    layers (ReLU)."""

    def __init__(self, features: int, steps: int = 4, hidden=(128, 128), generator: torch.Generator | None = None):
        super().__init__()
        if features < 2:
            raise ValueError(f"a coupling flow needs at least 2 features, got {features}")
        parts = []
        for k in range(steps):
            order = torch.randperm(features, generator=generator)
            mask = torch.arange(features) % 2 == (k % 2)
            coupling = GeneralCouplingTransform(features, mask=mask, hidden_features=tuple(int(h) for h in hidden))
            last = coupling.hyper[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            parts += [ActNorm(features),
                      UnconditionalTransform(PermutationTransform, order, buffer=True),
                      UnconditionalTransform(LULinearTransform, torch.eye(features)),
                      coupling]
        self.transforms = nn.ModuleList(parts)
        self.features = features

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        # float32 whatever the autocast: exact inverses, and torch's triangular solves take no fp16
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            ladj = x.new_zeros(x.shape[:-1])
            for t in self.transforms:
                if isinstance(t, ActNorm) and self.training and not bool(t.initialized):
                    t.initialize(x, mask)
                x, l = t().call_and_ladj(x)
                ladj = ladj + l
        return x, ladj

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            for t in reversed(self.transforms):
                z = t().inv(z)
        return z


def gaussian_nll(z: torch.Tensor, ladj: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood per dimension of x under the flow with a standard normal base,
    -(log N(z; 0, I) + log|det J|) / d, averaged over the frames where ``mask`` is True."""
    d = z.shape[-1]
    nll = 0.5 * (z.float() ** 2).sum(-1) + 0.5 * d * torch.log(torch.tensor(2 * torch.pi)) - ladj.float()
    if mask is None:
        return nll.mean() / d
    m = mask.to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1) / d
