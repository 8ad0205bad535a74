"""IMDer against its equations (paper, SPEC.md §3), each reference written out here with torch ops,
not with the method's helpers: the VE SDE's marginal std, the denoising score-matching loss, the
Euler-Maruyama sampler, the condition, the score network's division by the marginal std, the
total loss and each of its parts, MulT's cross-modal attention (query = target modality,
key/value = the other), the last-valid-step features, and the refiner reading the sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from train.conditions import MODALITIES, apply_availability
from train.data import DataSpec
from train.diffusion import VESDE, dsm_loss, sample
from train.methods import build

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA = 25.0
D, K, T, B = 8, 3, 12, 6   # width, projection kernel, frames, batch
STEPS = 3                  # Euler-Maruyama steps of every phase in these tests
SPEC = DataSpec({"a": 5, "v": 4, "t": 7}, "regression", None)
# rows: {a,t} {v,t} {a,v} {a} {t} {a,v,t}; row 5 has no video at all (naturally absent)
AVAIL = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]], bool)
TEXT_LEN = [12, 9, 7, 12, 5, 10]  # valid tokens (a prefix, as BERT's attention mask)


def std_ref(t):
    """sqrt((sigma^(2t) - 1) / (2 ln sigma))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt((SIGMA ** (2 * t) - 1) / (2 * math.log(SIGMA)))


def _model(steps: int = STEPS):
    torch.manual_seed(0)
    cfg = {"method": "imder", "model": {
        "proj": {"d": D, "kernel": K}, "backbone": {"heads": 2, "levels": 1, "mem_layers": 1},
        "score": {"channels": [8, 16], "embed_dim": 16, "heads": 2, "attn_layers": 1},
        "refine": {"blocks": 1, "reduction": 4}, "sigma": SIGMA,
        "sampler": {p: {"kind": "em", "steps": steps, "t_end": 1e-3} for p in ("train", "val", "test")}}}
    m = build(cfg, SPEC)
    m.inherited.fill_(True)
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    fm = {m: torch.ones(B, T, dtype=torch.bool) for m in MODALITIES}
    fm["t"] = torch.arange(T)[None] < torch.tensor(TEXT_LEN)[:, None]
    fm["a"][2, 4] = False  # an invalid audio frame inside the sequence
    x = {m: torch.randn(B, T, SPEC.dims[m], generator=g) * fm[m][..., None] for m in MODALITIES}
    natural = torch.ones(B, 3, dtype=torch.bool)
    natural[5, 1] = False
    x["v"][5] = 0
    fm["v"][5] = False
    b = {"x": x, "frame_mask": fm, "natural": natural, "y": torch.randn(B, generator=g),
         "lengths": {m: torch.full((B,), T) for m in MODALITIES}}
    return apply_availability(b, AVAIL)


def _proj(model, x):
    """The bias-free Conv1d projection (kernel K, no padding) of (B, T, D_m) inputs: (B, T-K+1, d)."""
    return {m: F.conv1d(x[m].transpose(1, 2), model.proj.conv[m].weight).transpose(1, 2) for m in MODALITIES}


def _valid(batch):
    """Feature validity from the masked frame mask: a window of K frames is valid when it ends on a
    valid frame; a missing modality has none."""
    return {m: batch["frame_mask"][m][:, K - 1:] for m in MODALITIES}


def _expected_validity(batch):
    """After recovery: a recovered modality is valid where an available modality is."""
    valid, present = _valid(batch), batch["present"]
    out = {}
    for i, m in enumerate(MODALITIES):
        others = [valid[k] & present[:, MODALITIES.index(k), None] for k in MODALITIES if k != m]
        out[m] = torch.where(present[:, i, None], valid[m], others[0] | others[1])
    return out


class Recorder:
    """Forward (pre-)hooks that record what modules read and return."""

    def __init__(self):
        self.calls, self.handles = [], []

    def watch(self, name, module, pre=False):
        if pre:
            def hook(mod, args, kwargs):
                self.calls.append((name, "in", [a.detach().clone() if torch.is_tensor(a) else a for a in args],
                                   {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                                   torch.is_grad_enabled()))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, out):
                self.calls.append((name, "out", [a.detach().clone() if torch.is_tensor(a) else a for a in args],
                                   out.detach().clone(), torch.is_grad_enabled()))
            self.handles.append(module.register_forward_hook(hook))

    def get(self, name, kind="out"):
        return [c for c in self.calls if c[0] == name and c[1] == kind]

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- the diffusion, on its own -----------------------------------------------------------------------

def test_marginal_std_is_the_ve_sde_formula():
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.5, 0.9, 1.0])
    got = VESDE(SIGMA).marginal_std(t).double()
    assert torch.allclose(got, std_ref(t), rtol=1e-6)
    assert float(std_ref(1.0)) == pytest.approx(9.845, abs=1e-3)
    assert float(VESDE(SIGMA).diffusion(0.3)) == pytest.approx(SIGMA ** 0.3, rel=1e-6)  # g(t) = sigma^t


def _toy_score(x, t):
    """A smooth score that depends on x and t (the equations do not care which)."""
    s = std_ref(t).float().view(-1, *([1] * (x.dim() - 1)))
    return -(x - 0.3) / (0.25 + s ** 2) + 0.1 * torch.sin(x)


def test_denoising_score_matching_loss():
    sde = VESDE(SIGMA)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, 5, generator=g)
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return _toy_score(x, t)

    torch.manual_seed(7)
    got = dsm_loss(spy, x0, sde)
    torch.manual_seed(7)
    per = dsm_loss(_toy_score, x0, sde, reduction="none")
    # the reference: t ~ U(1e-5, 1), z ~ N(0, I), x_t = x0 + std_t z, mean_B ||std_t s(x_t, t) + z||^2
    torch.manual_seed(7)
    t = torch.rand(16) * (1 - 1e-5) + 1e-5
    z = torch.randn_like(x0)
    std = std_ref(t).float().view(-1, 1, 1)
    s = _toy_score(x0 + std * z, t)
    ref_per = ((std * s + z) ** 2).sum((1, 2))
    assert torch.allclose(per, ref_per, rtol=1e-5)
    assert float(got) == pytest.approx(float(ref_per.mean()), rel=1e-5)
    assert bool(((seen[0] >= 1e-5) & (seen[0] <= 1)).all())


def test_euler_maruyama_is_the_hand_written_loop():
    sde, shape, t_end = VESDE(SIGMA), (4, 2, 6), 1e-3
    evals = []

    def spy(x, t):
        evals.append(float(t[0]))
        return _toy_score(x, t)

    torch.manual_seed(3)
    got = sample(spy, shape, sde, {"kind": "em", "steps": 100, "t_end": t_end})
    # reference: x_1 ~ N(0, std(1)^2); 100 equal steps from t = 1 down to t_end, each
    # mean = x + g(t)^2 s(x, t) dt, x = mean + g(t) sqrt(dt) z except after the last; return the mean
    torch.manual_seed(3)
    x = torch.randn(*shape) * float(std_ref(1.0))
    ts = np.linspace(1.0, t_end, 101)
    for i in range(100):
        t, dt = ts[i], ts[i] - ts[i + 1]
        mean = x + (SIGMA ** t) ** 2 * _toy_score(x, torch.full((shape[0],), float(t))) * dt
        if i < 99:
            x = mean + SIGMA ** t * math.sqrt(dt) * torch.randn_like(x)
    assert torch.allclose(got, mean, rtol=1e-4, atol=1e-5)
    assert len(evals) == 100 and evals[-1] == pytest.approx(t_end + (1 - t_end) / 100, abs=1e-6)  # no step past t_end


def test_score_network_output_is_divided_by_the_marginal_std():
    net = _model().score["a"].eval()
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(3, D, 10, generator=g), torch.randn(3, D, 10, generator=g)
    t = torch.tensor([1e-3, 0.4, 1.0])
    with torch.no_grad():
        out = net(x, t, cond)
        net.marginal_std = lambda t: torch.ones_like(torch.as_tensor(t, dtype=torch.float32))
        raw = net(x, t, cond)
    assert torch.allclose(out, raw / std_ref(t).float().view(-1, 1, 1), rtol=1e-5, atol=1e-6)


# ---- the method -----------------------------------------------------------------------------------

def test_condition_fuses_two_available_or_passes_the_one():
    model = _model().eval()
    model.condition_noise = False  # the score network then reads the condition itself
    batch = _batch()
    rec = Recorder()
    for m in MODALITIES:
        rec.watch(f"fuse{m}", model.cond_fuse[m])
        rec.watch(f"score{m}", model.score[m], pre=True)
    with torch.no_grad():
        model.predict(batch)
    rec.remove()
    feats, present = _proj(model, batch["x"]), batch["present"]
    for i, m in enumerate(MODALITIES):
        a, b = [k for k in MODALITIES if k != m]
        (call,) = rec.get(f"fuse{m}")
        both = torch.cat([feats[a], feats[b]], -1).transpose(1, 2)  # Conv1d(2d -> d, kernel 1) reads [x_a; x_b]
        assert torch.allclose(call[2][0], both, atol=1e-6)
        w, bias = model.cond_fuse[m].weight[:, :, 0], model.cond_fuse[m].bias
        fused = torch.einsum("oc,bct->bto", w, both) + bias
        rows = torch.nonzero(~present[:, i]).view(-1)
        scored = rec.get(f"score{m}", "in")
        assert len(scored) == STEPS  # one evaluation per sampler step
        for r_pos, r in enumerate(rows.tolist()):
            pa, pb = bool(present[r, MODALITIES.index(a)]), bool(present[r, MODALITIES.index(b)])
            want = fused[r] if pa and pb else feats[a][r] if pa else feats[b][r] if pb else torch.zeros(T - K + 1, D)
            for call in scored:
                assert torch.allclose(call[2][2][r_pos].T, want, atol=1e-5), (m, r)


def test_condition_enters_the_score_network_with_its_own_noise_at_t():
    model = _model().train()
    batch = _batch()
    rec = Recorder()
    rec.watch("score", model.score["v"], pre=True)
    torch.manual_seed(0)
    model.loss(batch)
    rec.remove()
    (dsm,) = [c for c in rec.get("score", "in") if c[4]]  # the score-matching call (with gradients)
    x_t, t, ct = dsm[2]
    with torch.no_grad():
        feats = _proj(model, batch["x"])
    present = batch["present"]
    w, bias = model.cond_fuse["v"].weight[:, :, 0].detach(), model.cond_fuse["v"].bias.detach()
    fused = torch.einsum("oc,bct->bot", w, torch.cat([feats["a"], feats["t"]], -1).transpose(1, 2)) + bias[:, None]
    single = (feats["a"] + feats["t"]).transpose(1, 2)  # the one available (the other is exactly zero)
    rows = torch.nonzero(~present[:, 1] & batch["natural"][:, 1]).view(-1)
    c = torch.where((present[rows, 0] & present[rows, 2]).view(-1, 1, 1), fused[rows], single[rows])
    std = std_ref(t).float().view(-1, 1, 1)
    noise = (ct - c) / std
    with torch.no_grad():
        truth = _proj(model, batch["x_full"])["v"][rows].transpose(1, 2)
    z = (x_t - truth) / std
    assert 0.6 < float(noise.pow(2).mean()) < 1.5        # x_obs(t) = x_obs + std_t n, n ~ N(0, I)
    assert abs(float((noise * z).mean())) < 0.25         # n independent of the target's z


def test_loss_is_task_plus_a_tenth_of_score_and_reconstruction():
    model = _model().train()
    batch = _batch()
    rec = Recorder()
    for m in MODALITIES:
        rec.watch(f"score{m}", model.score[m])
        rec.watch(f"refine{m}", model.refine[m])
    rec.watch("out", model.backbone.out)
    torch.manual_seed(0)
    loss, parts = model.loss(batch)
    rec.remove()
    truth = _proj(model, batch["x_full"])  # the projection of the real (unmasked) features
    present, natural = batch["present"], batch["natural"]
    score_sum = rec_sum = 0.0
    dt = (1 - 1e-3) / STEPS
    for i, m in enumerate(MODALITIES):
        missing = ~present[:, i]
        has = natural[missing, i]
        gt = truth[m][missing][has]
        (dsm,) = [c for c in rec.get(f"score{m}") if c[4]]
        x_t, t, _ = dsm[2]
        s, std = dsm[3], std_ref(t).float().view(-1, 1, 1)
        z = (x_t - gt.transpose(1, 2)) / std
        score_sum += float(((std * s + z) ** 2).sum((1, 2)).sum()) / B  # summed per sample, averaged over B
        (ref_call,) = rec.get(f"refine{m}")
        rec_sum += float(((ref_call[3].transpose(1, 2)[has] - gt) ** 2).mean())
        # the refiner reads the sampled x: the mean of the last Euler-Maruyama step (at t_end + dt)
        sampled = [c for c in rec.get(f"score{m}") if not c[4]]
        x_last, t_last, _ = sampled[-1][2]
        assert float(t_last[0]) == pytest.approx(1e-3 + dt, abs=1e-6)
        mean = x_last + (SIGMA ** t_last.view(-1, 1, 1)) ** 2 * sampled[-1][3] * dt
        assert torch.allclose(ref_call[2][0], mean, rtol=1e-4, atol=1e-4)
    (out,) = rec.get("out")
    task = float((out[3].view(-1) - batch["y"]).abs().mean())  # L1
    assert float(parts["task"].detach()) == pytest.approx(task, rel=1e-5)
    assert float(parts["score"].detach()) == pytest.approx(0.1 * score_sum, rel=1e-4)
    assert float(parts["rec"].detach()) == pytest.approx(0.1 * rec_sum, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(task + 0.1 * (score_sum + rec_sum), rel=1e-4)


def _positions(n, d):
    """MulT's sinusoidal positions 1..n: sin on the first half of the channels, cos on the second."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    p = torch.arange(1, n + 1, dtype=torch.float32)[:, None] * freq[None]
    return torch.cat([p.sin(), p.cos()], 1)


def test_mult_attention_reads_target_as_query_other_as_key_value_and_last_valid_steps():
    model = _model().eval()
    batch = _batch()
    bb, rec = model.backbone, Recorder()
    for name, mod in bb.cross.items():
        rec.watch(f"cross{name}", mod, pre=True)
        rec.watch(f"cross{name}", mod)
        rec.watch(f"attn{name}", mod.layers[0].attn, pre=True)
    for q in MODALITIES:
        rec.watch(f"mem{q}", bb.mem[q], pre=True)
        rec.watch(f"mem{q}", bb.mem[q])
        rec.watch(f"refine{q}", model.refine[q])
    rec.watch("out", bb.out, pre=True)
    with torch.no_grad():
        model.predict(batch)
    rec.remove()
    feats, present = _proj(model, batch["x"]), batch["present"]
    for i, m in enumerate(MODALITIES):  # the completed set: projections where present, refined samples where not
        (r,) = rec.get(f"refine{m}")
        feats[m] = feats[m].index_put((torch.nonzero(~present[:, i]).view(-1),), r[3].transpose(1, 2))
    valid = _expected_validity(batch)
    n = T - K + 1
    for q in MODALITIES:
        for k in MODALITIES:
            if k == q:
                continue
            (call,) = rec.get(f"cross{q}{k}", "in")
            x, kv, kv_valid = call[2]
            assert torch.allclose(x, feats[q], atol=1e-6) and torch.allclose(kv, feats[k], atol=1e-6)
            assert torch.equal(kv_valid, valid[k])
            (att,) = rec.get(f"attn{q}{k}", "in")
            ln = bb.cross[f"{q}{k}"].layers[0].ln0
            query, key, value = att[2]
            # the first layer: query = LN(sqrt(d) x_q + P), key = value = LN(sqrt(d) x_k + P)
            assert torch.allclose(query, ln(math.sqrt(D) * feats[q] + _positions(n, D)), atol=1e-5)
            assert torch.allclose(key, ln(math.sqrt(D) * feats[k] + _positions(n, D)), atol=1e-5)
            assert torch.equal(key, value)
            want_pad = ~valid[k]
            want_pad[want_pad.all(1), 0] = False  # a row with no valid key keeps its first (zero) one
            assert torch.equal(att[3]["key_padding_mask"], want_pad)
            assert torch.equal(att[3]["attn_mask"], torch.ones(n, n, dtype=torch.bool).triu(1))  # causal
        # memory: self-attention over [cross(q<-k1); cross(q<-k2)], then the last valid step of q
        k1, k2 = [k for k in MODALITIES if k != q]
        (mem_in,) = rec.get(f"mem{q}", "in")
        cat = torch.cat([rec.get(f"cross{q}{k1}")[0][3], rec.get(f"cross{q}{k2}")[0][3]], -1)
        assert torch.allclose(mem_in[2][0], cat, atol=1e-6) and mem_in[2][1] is None
        assert torch.equal(mem_in[2][2], valid[q])
    last = []
    for q in MODALITIES:
        h = rec.get(f"mem{q}")[0][3]
        idx = [max([j for j in range(n) if valid[q][b, j]], default=n - 1) for b in range(B)]
        last.append(torch.stack([h[b, j] for b, j in enumerate(idx)]))
    joint = torch.cat(last, -1)
    joint = joint + bb.proj2(F.relu(bb.proj1(joint)))  # residual head
    (out_in,) = rec.get("out", "in")
    assert torch.allclose(out_in[2][0], joint, atol=1e-5)
