"""IMDer mechanism pins beyond tests/test_imder_reference.py: in training the MulT backbone reads
the *completed* set (each missing modality's refined recovery, the available ones' projections,
validity where the condition is), never the unmasked truth the recovery losses use; the
probability-flow samplers' noise levels are Karras et al.'s rho-schedule from std(1) to std(t_end),
and the Heun sampler is the hand-written loop over it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from train.conditions import MODALITIES, apply_availability
from train.data import DataSpec
from train.diffusion import VESDE, sample, sigma_schedule

from test_imder_reference import _model as reference_model  # the same tiny IMDer (D, K, SIGMA)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA, D, K, T, B = 25.0, 8, 3, 10, 5
SPEC = DataSpec({"a": 5, "v": 4, "t": 7}, "regression", None)
AVAIL = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)


def _model():
    return reference_model(steps=2)


def _batch():
    g = torch.Generator().manual_seed(1)
    fm = {m: torch.ones(B, T, dtype=torch.bool) for m in MODALITIES}
    fm["t"] = torch.arange(T)[None] < torch.tensor([10, 8, 6, 10, 7])[:, None]
    x = {m: torch.randn(B, T, SPEC.dims[m], generator=g) * fm[m][..., None] for m in MODALITIES}
    b = {"x": x, "frame_mask": fm, "natural": torch.ones(B, 3, dtype=torch.bool), "y": torch.randn(B, generator=g),
         "lengths": {m: fm[m].sum(1) for m in MODALITIES}}
    return apply_availability(b, AVAIL)


def test_training_backbone_reads_the_recovered_set_not_the_truth():
    model = _model().train()
    batch = _batch()
    seen, refined = {}, {}
    hooks = [model.backbone.register_forward_pre_hook(lambda mod, args: seen.update(feats=args[0], valid=args[1]))]
    hooks += [model.refine[m].register_forward_hook(lambda mod, args, out, m=m: refined.__setitem__(m, out.detach()))
              for m in MODALITIES]
    torch.manual_seed(0)
    model.loss(batch)
    for h in hooks:
        h.remove()
    proj = {m: F.conv1d(batch["x"][m].transpose(1, 2), model.proj.conv[m].weight).transpose(1, 2) for m in MODALITIES}
    truth = {m: F.conv1d(batch["x_full"][m].transpose(1, 2), model.proj.conv[m].weight).transpose(1, 2)
             for m in MODALITIES}
    fvalid = {m: batch["frame_mask"][m][:, K - 1:] for m in MODALITIES}
    present = batch["present"]
    for i, m in enumerate(MODALITIES):
        miss = ~present[:, i]
        got = seen["feats"][m].detach()
        assert torch.allclose(got[~miss], proj[m][~miss], atol=1e-5), m  # available: its projection
        assert torch.allclose(got[miss], refined[m].transpose(1, 2), atol=1e-5), m  # missing: the refined draw
        assert (got[miss] - truth[m][miss]).abs().max() > 1e-2, m  # ... not the truth the losses read
        j, k = [MODALITIES.index(o) for o in MODALITIES if o != m]
        cond_valid = (fvalid[MODALITIES[j]] & present[:, j, None]) | (fvalid[MODALITIES[k]] & present[:, k, None])
        assert torch.equal(seen["valid"][m], torch.where(miss[:, None], cond_valid, fvalid[m])), m


def _schedule(steps, t_end, rho):
    """Karras et al. (2022), Eq. 5: sigma_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho,
    i = 0..N, with s_max = std(1) and s_min = std(t_end) of the VE SDE."""
    std = lambda t: math.sqrt((SIGMA ** (2 * t) - 1) / (2 * math.log(SIGMA)))  # noqa: E731
    hi, lo = std(1.0) ** (1 / rho), std(t_end) ** (1 / rho)
    return [(hi + i / steps * (lo - hi)) ** rho for i in range(steps + 1)]


@pytest.mark.parametrize("steps,rho", [(4, 7.0), (6, 3.0)])
def test_sigma_schedule_is_karras_from_std1_to_std_t_end(steps, rho):
    sde = VESDE(SIGMA)
    got = sigma_schedule(sde, steps, 1e-3, rho)
    want = torch.tensor(_schedule(steps, 1e-3, rho), dtype=torch.float32)
    assert got.shape == (steps + 1,)
    assert torch.allclose(got, want, rtol=1e-5)
    assert float(got[-1]) == pytest.approx(float(sde.marginal_std(1e-3)), rel=1e-5)


def test_heun_sampler_is_the_hand_written_loop():
    sde = VESDE(SIGMA)
    steps, t_end = 3, 1e-2

    def score(x, t):  # any smooth score: here that of N(0, 1 + std(t)^2) scaled per element
        s = torch.sqrt((SIGMA ** (2 * t) - 1) / (2 * math.log(SIGMA))).view(-1, 1)
        return -x * (1.0 + 0.1 * torch.arange(x.shape[1])) / (1.0 + s ** 2)

    torch.manual_seed(5)
    got = sample(score, (4, 3), sde, {"kind": "heun", "steps": steps, "t_end": t_end, "rho": 7.0})
    torch.manual_seed(5)
    x = torch.randn(4, 3) * math.sqrt((SIGMA ** 2 - 1) / (2 * math.log(SIGMA)))
    sig = _schedule(steps, t_end, 7.0)

    def t_of(s):  # the VE SDE's time whose marginal std is s
        return math.log1p(2 * math.log(SIGMA) * s * s) / (2 * math.log(SIGMA))

    def slope(x, s):  # dx/dsigma = -sigma * score(x, t(sigma))
        return -s * score(x, torch.full((4,), t_of(s)))

    for s0, s1 in zip(sig[:-1], sig[1:]):
        d0 = slope(x, s0)
        x_e = x + (s1 - s0) * d0
        x = x + (s1 - s0) * 0.5 * (d0 + slope(x_e, s1))
    assert torch.allclose(got, x, rtol=1e-4, atol=1e-4)
