"""CM-ARR against references written from the paper's equations with plain torch ops (Sun et al.
2024, SPEC.md §3): the UMC, the 1-D projection, the flows, the missing-latent rule (Eq. 7), the
inverse flow of the missing modality (Eq. 8), the RCAB refinement, the fusion (Eqs. 10-13), every
loss term (Eqs. 1-5, 9, Khosla et al.'s L_out, Eq. 14) with distinct weights; forward hooks pin what
each module reads; predictions ignore a masked modality's content and never read the truth.
The references are in tests/cm_arr_reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from train.conditions import TRUTH, apply_availability, availability, without_truth
from train.config import load_config
from train.flows import ActNorm, GlowFlow
from train.methods import build
from train.methods import cm_arr as cm_arr_module
from train.methods.cm_arr_nets import Similarity, info_nce, supcon
from train.synthetic import synthetic_data

from cm_arr_reference import flow_forward, forward, input_valid, mean_over, nce, rec, supcon_loss, truth_valid, udcl, w2

ORDER = ("a", "v", "t")
DIMS = {"a": 5, "v": 4, "t": 6}
TINY = {"model.dim": 8, "model.heads": 2, "model.flow": {"steps": 2, "hidden": [8, 8]},
        "model.refine": {"blocks": 2, "reduction": 4}, "model.classifier": [8]}
# distinct weights, so that a weight multiplying the wrong term shows
WEIGHTS = {"loss.udcl": 0.3, "loss.spcl": 0.7, "loss.rec": 2.5, "loss.nll": 0.2, "loss.spcl_tau": 0.2}
CONDS = ("a", "v", "t", "av", "at", "vt", "avt")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["padded", "resampled"])
def data(request):
    """Padded: one length T = 6 by padding (frame masks matter); resampled: data.resample_to."""
    d = synthetic_data(n=24, dims=DIMS, lengths={"a": (3, 9), "v": (3, 9), "t": (2, 9)}, seed=5, absent=0.25)
    if request.param == "padded":
        d.max_len, d.fixed_len = {m: 6 for m in ORDER}, True
    else:
        d.resample_to = 5
    return d


def batch_of(data, n=16) -> dict:
    avail = np.array([availability(CONDS[i % len(CONDS)]) for i in range(n)])
    b = apply_availability(data.collate(np.arange(n)), avail)
    b["phase"] = "train"
    nat, pres = b["natural"], b["present"]
    for i in range(3):  # the batch exercises every case below
        assert (~pres[:, i] & nat[:, i]).any() and (~nat[:, i]).any()
    return b


def model(data, **extra):
    torch.manual_seed(0)
    m = build(load_config("cm-arr", None, {**TINY, **WEIGHTS, **extra}), data.spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # flows away from the identity start, a different map per modality
        for n in ORDER:
            for p in m.flows[n].parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        m.sim.a_raw.fill_(math.log(math.expm1(0.05)))  # a = -0.05
        m.sim.b.fill_(0.8)
        m.log_tau.fill_(math.log(0.5))
    return m.eval()


# ---- tests ---------------------------------------------------------------------------------------

def test_flow_matches_glow_reference_and_inverts():
    f = GlowFlow(6, 3, hidden=(8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    f.eval()
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4))
    z, ladj = f(x)
    zr, lr = flow_forward(f, x)
    assert torch.allclose(z, zr, atol=1e-5) and torch.allclose(ladj, lr, atol=1e-4)
    assert torch.allclose(f.inverse(z), x, atol=1e-4)
    jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0][0], x[1, 2])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[1, 2], atol=1e-4)


def test_actnorm_standardises_valid_frames_only():
    an = ActNorm(2)
    x = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [500.0, -500.0]]])
    an.initialize(x, torch.tensor([[True, True, False]]))
    y = x[0, :2] * an.log_scale.exp() + an.shift
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-6)
    assert torch.allclose(y.std(0), torch.ones(2), atol=1e-6)


def test_similarity_and_info_nce_match_the_equations():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    s1, s2 = torch.rand(3, 4, generator=g) + 0.1, torch.rand(5, 4, generator=g) + 0.1
    sim = Similarity(4, a_init=0.3, b_init=0.8)
    assert torch.allclose(sim(mu1, s1, mu2, s2), -0.3 * w2(mu1, s1, mu2, s2) + 0.8, atol=1e-5)
    assert torch.allclose(Similarity(4).a, torch.tensor(-0.25))  # a starts at -1/d
    fixed = Similarity(4, learn=False, a_init=0.3, b_init=0.8)
    assert not list(fixed.parameters()) and torch.allclose(fixed(mu1, s1, mu2, s2), sim(mu1, s1, mu2, s2))
    cos = Similarity(4, "cosine")(mu1, s1, mu2, s2)
    assert torch.allclose(cos, (mu1 / mu1.norm(dim=1, keepdim=True)) @ (mu2 / mu2.norm(dim=1, keepdim=True)).T, atol=1e-6)
    S = torch.randn(5, 5, generator=g) * 3  # not symmetric: both directions must be the right ones
    assert torch.allclose(info_nce(S, torch.tensor(0.4)), nce(S, 0.4), atol=1e-5)


def test_supcon_matches_khosla_with_an_anchor_without_positive():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # labels 2 and 3 have no positive
    assert torch.allclose(supcon(z, labels, 0.3), supcon_loss(z, labels, 0.3), atol=1e-5)


def test_predict_matches_the_reference(data):
    m, b = model(data), batch_of(data)
    with torch.no_grad():
        out = m.predict(without_truth(b))
        r = forward(m, b["x"], input_valid(b), b["present"])
        assert torch.allclose(out, r["logits"], atol=1e-5)
        # the training path reads the truth but its classification equals the prediction
        assert torch.allclose(m.training_parts(b)["logits"], r["logits"], atol=1e-5)


@pytest.mark.parametrize("ablation", [{}, {"model.align.similarity": "cosine", "model.fusion.kind": "concat"}],
                         ids=["paper", "point+noattn"])
def test_loss_terms_match_the_equations(data, ablation):
    m, b = model(data, **ablation), batch_of(data)
    assert (m.sim.kind == "cosine") == bool(ablation) and hasattr(m.fusion, "cross") != bool(ablation)
    loss, parts = m.loss(b)
    valid, natural, present = truth_valid(b), b["natural"], b["present"]
    with torch.no_grad():
        r = forward(m, b["x_full"], valid, present)
        ref = {"ce": F.cross_entropy(r["logits"], b["y"]),
               "udcl": 0.3 * udcl(m, r, valid, natural),
               "rec": 2.5 * rec(r, r["X"], valid, present, natural)}
        views = torch.stack([mean_over(r["xc"][n][u:u + 1], r["valid_c"][n][u:u + 1])[0]
                             for u in range(len(present)) for n in ORDER])
        labels = b["y"].repeat_interleave(3)  # utterance-major here: each view keeps its utterance's label
        ref["spcl"] = 0.7 * supcon_loss(views, labels, 0.2)
        nll = []
        for i, n in enumerate(ORDER):
            rows = present[:, i]
            zz, ll, f = r["z"][n][rows], r["ladj"][n][rows], valid[n][rows]
            per_frame = 0.5 * (zz ** 2).sum(-1) + 0.5 * 8 * math.log(2 * math.pi) - ll
            nll.append(per_frame[f].mean() / 8)
        ref["nll"] = 0.2 * torch.stack(nll).mean()
    assert set(parts) == set(ref)
    for k in ref:
        assert torch.allclose(parts[k], ref[k], rtol=1e-4, atol=1e-6), (k, float(parts[k]), float(ref[k]))
    assert torch.allclose(loss, sum(ref.values()), rtol=1e-4)
    loss.backward()  # the learnable temperature learns
    assert m.log_tau.grad is not None and m.log_tau.grad.abs() > 0


def capture(m):
    """Forward hooks: projection outputs, refiner inputs/outputs, fusion attention arguments."""
    seen, handles = {}, []

    def keep(key, fn):
        return lambda mod, args, *rest: seen.__setitem__(key, fn(args, *rest))

    for n in ORDER:
        handles.append(m.proj[n].register_forward_hook(keep(("X", n), lambda a, o: o.transpose(1, 2))))
        handles.append(m.refine[n].register_forward_hook(keep(("refine", n), lambda a, o: (a[0], o))))
    for name, blk in [*m.fusion.cross.items(), ("self", m.fusion.self_attn)]:
        handles.append(blk.attn.register_forward_pre_hook(
            keep(("attn", name), lambda a, kw: (*a, kw["key_padding_mask"])), with_kwargs=True))
        handles.append(blk.register_forward_hook(keep(("out", name), lambda a, o: o)))
    return seen, handles


def completed_from_hooks(m, seen, present):
    """xc built from what the hooks saw: available rows = the projection, missing rows = the refiner's
    output; also the refiner's expected input, the missing modality's own inverse flow of Eq. 7."""
    z = {n: m.flows[n](seen[("X", n)])[0] for n in ORDER}
    xc, expect_in = {}, {}
    for i, n in enumerate(ORDER):
        miss = ~present[:, i]
        xc[n] = seen[("X", n)].clone()
        xc[n][miss] = seen[("refine", n)][1]
        zt = torch.stack([sum((z[o][b] for j, o in enumerate(ORDER) if present[b, j]), torch.zeros_like(z[n][b]))
                          / max(1, int(present[b].sum())) for b in miss.nonzero().squeeze(1)])
        expect_in[n] = m.flows[n].inverse(zt)
    return xc, expect_in


def test_hooks_fusion_refiner_and_completion(data):
    m, b = model(data), batch_of(data)
    seen, handles = capture(m)
    with torch.no_grad():
        m.predict(without_truth(b))
    for h in handles:
        h.remove()
    present = b["present"]
    xc, expect_in = completed_from_hooks(m, seen, present)
    for i, n in enumerate(ORDER):  # the refiner reads X~ = F_n^-1(Z~) of its own modality
        assert torch.allclose(seen[("refine", n)][0], expect_in[n], atol=1e-5), n
    valid = input_valid(b)
    for o in ("a", "v"):  # Eqs. 10-11: Q = X_t (X^_t where text is missing), K = V = X_o
        q, k, v, kpm = seen[("attn", o)]
        assert torch.equal(q, xc["t"]) and torch.equal(k, xc[o]) and torch.equal(v, xc[o]), o
        miss = ~present[:, ORDER.index(o)]
        assert torch.equal(kpm[~miss], ~valid[o][~miss]) and not kpm[miss].any(), o
    q, k, v, kpm = seen[("attn", "self")]  # Eqs. 12-13: self-attention on [H_ta ; H_tv]
    h = torch.cat([seen[("out", "a")], seen[("out", "v")]], -1)
    assert torch.equal(q, h) and torch.equal(k, h) and torch.equal(v, h)
    t_miss = ~present[:, 2]
    assert torch.equal(kpm[~t_miss], ~valid["t"][~t_miss]) and not kpm[t_miss].any()


def test_loss_hooks_rec_target_and_spcl_labels(data, monkeypatch):
    m, b = model(data), batch_of(data)
    seen, handles = capture(m)
    calls = []
    monkeypatch.setattr(cm_arr_module, "supcon", lambda z, y, tau: calls.append((z, y)) or supcon(z, y, tau))
    _, parts = m.loss(b)
    for h in handles:
        h.remove()
    present, natural, valid = b["present"], b["natural"], truth_valid(b)
    xc, expect_in = completed_from_hooks(m, seen, present)
    for n in ORDER:  # in training too the refiner reads the recovered X~, not the truth
        assert torch.allclose(seen[("refine", n)][0], expect_in[n], atol=1e-5), n
    # L_rec: refined output against the projection of the unmasked input (what proj saw in loss())
    X_full = {n: seen[("X", n)] for n in ORDER}
    with torch.no_grad():
        Xr = forward(m, b["x_full"], valid, present)["X"]
    assert all(torch.allclose(X_full[n], Xr[n], atol=1e-5) for n in ORDER)
    expect = rec({"xhat": xc}, X_full, valid, present, natural)
    assert torch.allclose(parts["rec"], 2.5 * expect, rtol=1e-5)
    # L_spcl: every view row is the mean of one completed sequence and carries that utterance's label
    (z, y), = calls
    valid_c = {n: torch.where(present[:, i:i + 1], valid[n], True) for i, n in enumerate(ORDER)}
    pool = [(mean_over(xc[n][u:u + 1], valid_c[n][u:u + 1])[0], int(b["y"][u])) for u in range(len(present)) for n in ORDER]
    assert len(z) == len(pool)
    for row, lab in zip(z, y):
        match = [yl for v, yl in pool if torch.allclose(row, v, atol=1e-6)]
        assert int(lab) in match  # several matches only for rows with nothing present (Z~ = 0)
    assert sorted(y.tolist()) == sorted(lab for _, lab in pool)


def test_predict_ignores_masked_content_and_truth(data):
    m, b = model(data), batch_of(data)
    with torch.no_grad():
        out = m.predict(without_truth(b))
        g = torch.Generator().manual_seed(9)
        b2 = dict(b, x=dict(b["x"]), frame_mask=dict(b["frame_mask"]), lengths=dict(b["lengths"]))
        for i, n in enumerate(ORDER):
            gone = ~b["present"][:, i]
            b2["x"][n] = torch.where(gone[:, None, None], 7 * torch.randn(b["x"][n].shape, generator=g), b["x"][n])
            b2["frame_mask"][n] = torch.where(gone[:, None], torch.rand(b["frame_mask"][n].shape, generator=g) > 0.3,
                                              b["frame_mask"][n])
            b2["lengths"][n] = torch.where(gone, torch.randint(1, 9, gone.shape, generator=g), b["lengths"][n])
        assert torch.equal(m.predict(without_truth(b2)), out)
        noisy = dict(b, **{k: {n: v + 3 if k == "x_full" else v.flip(0) for n, v in b[k].items()} for k in TRUTH})
        assert torch.equal(m.predict(noisy), out)  # the truth is never read by predict


def test_each_modality_inverts_with_its_own_flow(data):
    m = model(data)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for n in ORDER:
            assert torch.allclose(m.flows[n].inverse(m.flows[n](x)[0]), x, atol=1e-4), n
        z = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(6))
        inv = {n: m.flows[n].inverse(z) for n in ORDER}
    assert not torch.allclose(inv["a"], inv["t"], atol=1e-3) and not torch.allclose(inv["v"], inv["t"], atol=1e-3)


def test_flows_initialise_on_the_first_training_batch_only(data):
    """A fresh flow (identity couplings and LU) maps the available rows' valid frames to zero mean and
    unit variance through its data-dependent ActNorms, set in training only: eval leaves them."""
    torch.manual_seed(0)
    m, b = build(load_config("cm-arr", None, TINY), data.spec).eval(), batch_of(data)
    with torch.no_grad():
        m.predict(without_truth(b))
    assert not any(bool(t.initialized) for f in m.flows.values() for t in f.transforms if isinstance(t, ActNorm))
    seen, handles = capture(m.train())
    m.loss(b)
    for h in handles:
        h.remove()
    valid = truth_valid(b)
    with torch.no_grad():
        for i, n in enumerate(ORDER):
            rows = b["present"][:, i]
            z = m.flows[n](seen[("X", n)][rows])[0][valid[n][rows]]
            assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-4), n
            assert torch.allclose(z.std(0), torch.ones(8), atol=1e-3), n
