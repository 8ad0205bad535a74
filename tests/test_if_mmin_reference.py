"""Mechanism tests for IF-MMIN (Zuo et al., ICASSP 2023; SPEC.md §3) against references written
out with torch ops in tests/mmin_reference.py: the pretraining CMD (Zellinger et al.'s definition,
K = 5, mean over the (t,a), (t,v), (a,v) pairs, weight 1), H' added into every IF-IM block (only
the first without cascade), the imagination (weight 1) and invariance (weight 100) RMSE terms and
their targets, the frozen teachers, what ``predict`` reads, and what each ablation changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmin_reference as R
from train import conditions as C
from train.config import load_config
from train.methods import build
from train.methods.if_mmin import cmd
from train.synthetic import synthetic_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

E = 6  # every modality's embedding width (the invariance encoder is shared, so one width)
TINY = {
    "model.encoders": {"a": {"kind": "lstm", "hidden": E, "pool": "max"},
                       "v": {"kind": "lstm", "hidden": E, "pool": "max"},
                       "t": {"kind": "textcnn", "embed": E, "channels": 4, "kernels": [3, 4, 5], "dropout": 0.5}},
    "model.invariance": {"layers": [5, E], "dropout": 0.0},
    "model.classifier": [8],
}  # model.init stays the authors' kaiming: the cascade's later blocks then still see the earlier ones
ROWS = np.arange(12)
AVAIL = np.array([C.availability(c) for c in C.MISSING_CONDITIONS * 2])
VARIANTS = ("if-mmin", "if-mmin-noinv", "if-mmin-nocascade")


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=24, dims={"a": 5, "v": 4, "t": 6}, lengths={"a": (1, 9), "v": (1, 6), "t": (1, 8)},
                          absent=0.25, seed=11)


def cfg(name):
    over = dict(TINY)
    if name != "if-mmin-pretrain":
        cascade = load_config(name)["model"]["imagination"]["cascade"]
        over["model.imagination"] = {"kind": "cra", "layers": [12, 8, 4], "blocks": 5, "cascade": cascade}
    return load_config(name, None, over)


def pretrained(data):
    torch.manual_seed(5)
    pre = build(cfg("if-mmin-pretrain"), data.spec)
    with torch.no_grad():
        for p in pre.parameters():  # "trained": any weights other than a fresh init
            p.normal_(0, 0.4)
    return pre


def ifmmin(data, name="if-mmin"):
    torch.manual_seed(0)
    m = build(cfg(name), data.spec)
    m.attach({"pretrained": pretrained(data)})
    torch.manual_seed(1)  # the same fine-tuned student in every variant
    with torch.no_grad():  # fine-tuned: the student has moved away from its teachers
        for p in [*m.encoders.parameters(), *m.invariance.parameters()]:
            p.add_(0.2 * torch.randn_like(p))
    return m


def masked_batch(data):
    return C.apply_availability(data.collate(ROWS), AVAIL)


def student(m, data):
    """h (fused) and H' of the masked sample."""
    h = R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL)
    return R.fuse(h), R.invariance(m.invariance, h)


# ---- pretraining: CE + CMD ------------------------------------------------------------------------

def test_cmd_is_zellinger_without_interval_scaling():
    """imer's cmd is Zellinger et al.'s CMD with span |b - a| = 1 (IF-MMIN's Eq. 1 and the
    authors' code drop the 1/|b-a|^k factors), biased central moments, L2 (not squared) norms."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    Y = torch.distributions.Gamma(2.0, 1.0).sample((9, 4)).double()  # skewed: odd moments differ
    for K in (1, 2, 5):
        torch.testing.assert_close(cmd(X, Y, K), R.cmd(X, Y, K).float(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(cmd(X, Y, 5), R.cmd(X, Y, 5, span=2.0).float(), rtol=1e-3)


def test_pretrain_paper_settings():
    c = load_config("if-mmin-pretrain")
    assert c["loss"] == {"ce": 1.0, "cmd": 1.0, "cmd_moments": 5}
    assert c["train"]["missing"] == {"kind": "full"}
    assert c["model"]["invariance"]["layers"] == [128, 128]


def test_pretrain_loss_is_ce_plus_mean_pairwise_cmd(data):
    pre = pretrained(data).eval()
    b = C.apply_availability(data.collate(ROWS), np.ones((len(ROWS), 3), bool))
    total, parts = pre.loss(b)
    with torch.no_grad():
        h = R.embed(pre.encoders, data, ROWS, R.natural(data, ROWS))
        Hs = R.invariance(pre.invariance, h).split(E, -1)
        H = dict(zip(C.MODALITIES, Hs))
        want_cmd = (R.cmd(H["t"], H["a"], 5) + R.cmd(H["t"], H["v"], 5) + R.cmd(H["a"], H["v"], 5)) / 3
        logits = R.classifier(pre.classifier, torch.cat([R.fuse(h), torch.cat(Hs, -1)], -1))  # [h; H]
        want_ce = R.cross_entropy(logits, b["y"])
    assert set(parts) == {"ce", "cmd"}
    torch.testing.assert_close(parts["cmd"], want_cmd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts["ce"], want_ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, want_ce + want_cmd, rtol=1e-4, atol=1e-6)


# ---- IF-IM: H' in every block ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["if-mmin", "if-mmin-nocascade"])
def test_invariant_feature_enters_every_block(data, name):
    """Block 1 reads h + H'; block i reads block i-1's output + H' (without cascade: the output
    alone); the head reads the last output; the classifier reads the concatenated latents."""
    m = ifmmin(data, name).eval()
    rec = {"in": [], "z": [], "out": [], "head": [], "clf": []}


    hooks = [enc.register_forward_hook(R.recorder(rec, "in", "z")) for enc in m.imagine.encoders]
    hooks += [dec.register_forward_hook(R.recorder(rec, None, "out")) for dec in m.imagine.decoders]
    hooks.append(m.imagine.transition.register_forward_hook(R.recorder(rec, "head")))
    hooks.append(m.classifier.register_forward_hook(R.recorder(rec, "clf")))
    try:
        with torch.no_grad():
            m.loss(masked_batch(data))
    finally:
        for hd in hooks:
            hd.remove()
    with torch.no_grad():
        h, inv = student(m, data)
    assert inv.abs().sum() > 0 and len(rec["in"]) == 5
    torch.testing.assert_close(rec["in"][0], h + inv, rtol=1e-4, atol=1e-5)
    for i in range(1, 5):
        want = rec["out"][i - 1] + inv if name == "if-mmin" else rec["out"][i - 1]
        torch.testing.assert_close(rec["in"][i], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec["head"][0], rec["out"][-1])
    for enc, dec, x, z, out in zip(m.imagine.encoders, m.imagine.decoders, rec["in"], rec["z"], rec["out"]):
        torch.testing.assert_close(z, R.ae_encoder(enc, x))
        torch.testing.assert_close(out, R.ae_decoder(dec, z))
    torch.testing.assert_close(rec["clf"][0], torch.cat(rec["z"], -1))


# ---- the loss ----------------------------------------------------------------------------------------

def test_paper_weights_and_ablation_configs():
    full = load_config("if-mmin")
    assert full["loss"] == {"ce": 1.0, "imagination": 1.0, "invariance": 100.0, "distance": "rmse"}
    assert full["model"]["imagination"]["cascade"] is True
    for name, (section, key, value) in {"if-mmin-noinv": ("loss", "invariance", 0.0),
                                        "if-mmin-nocascade": ("model", "imagination", "cascade")}.items():
        abl = load_config(name)
        assert {k for k in full if full[k] != abl[k]} == {"name", section}, name
        diff = {k for k in full[section] if full[section][k] != abl[section][k]}
        assert diff == {key}, name
    assert load_config("if-mmin-noinv")["loss"]["invariance"] == 0.0
    nocas = load_config("if-mmin-nocascade")["model"]["imagination"]
    assert nocas == {**full["model"]["imagination"], "cascade": False}


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_terms_equal_reference(data, name):
    """CE + 1 * RMSE(h', teacher(reversed input)) + 100 * RMSE(H', teacher invariant features of
    the full input); w/o L_inv drops the last term, w/o cascade changes h' only."""
    m = ifmmin(data, name).eval()
    b = masked_batch(data)
    total, parts = m.loss(b)
    nat = R.natural(data, ROWS)
    with torch.no_grad():
        h, inv = student(m, data)
        recon, latent = R.if_im(m.imagine, h, inv, cascade=name != "if-mmin-nocascade")
        ce = R.cross_entropy(R.classifier(m.classifier, latent), b["y"])
        rev_target = R.fuse(R.embed(m.teacher, data, ROWS, nat & ~AVAIL))  # missing real, available zeroed
        inv_target = R.invariance(m.teacher_inv, R.embed(m.teacher, data, ROWS, nat))  # full input
        want = {"ce": ce, "imagination": 1 * R.rmse(recon, rev_target),
                "invariance": 100 * R.rmse(inv, inv_target)}
    if name == "if-mmin-noinv":
        del want["invariance"]
    assert set(parts) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(parts[k], v, rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(total, sum(want.values()), rtol=1e-4, atol=1e-6)


def test_ablations_change_exactly_their_part(data):
    """With the same weights: w/o L_inv keeps CE and imagination as they are; w/o cascade keeps
    the invariance term (H' does not depend on the cascade) and changes the imagination."""
    b = masked_batch(data)
    with torch.no_grad():
        parts = {n: ifmmin(data, n).eval().loss(b)[1] for n in VARIANTS}
    full, noinv, nocas = (parts[n] for n in VARIANTS)
    for k in ("ce", "imagination"):
        torch.testing.assert_close(noinv[k], full[k])
    torch.testing.assert_close(nocas["invariance"], full["invariance"])
    assert not torch.isclose(nocas["imagination"], full["imagination"], rtol=1e-3)


def test_teachers_read_reversed_and_full_input(data):
    """Two teacher passes per loss: the reversed sample (missing real, available one zero frame)
    for h'', the full sample for H."""
    m = ifmmin(data).eval()
    b = masked_batch(data)
    seen = {k: [] for k in C.MODALITIES}
    hooks = [m.teacher.enc[k].register_forward_pre_hook(lambda _, a, k=k: seen[k].append([t.clone() for t in a]))
             for k in C.MODALITIES]
    R.hooked(lambda: m.loss(b), hooks)
    nat = R.natural(data, ROWS)
    for j, k in enumerate(C.MODALITIES):
        assert len(seen[k]) == 2, k
        want_len = {"reversed": torch.where(torch.from_numpy(nat[:, j] & ~AVAIL[:, j]), b["lengths_full"][k], 1),
                    "full": b["lengths_full"][k]}
        got = {name: next((x, ln) for x, ln in seen[k] if torch.equal(ln, want)) for name, want in want_len.items()}
        x_rev, _ = got["reversed"]
        gone = torch.from_numpy(nat[:, j] & ~AVAIL[:, j])
        assert not x_rev[~gone].any()
        torch.testing.assert_close(x_rev[gone], b["x_full"][k][gone])
        torch.testing.assert_close(got["full"][0], b["x_full"][k])


def test_teachers_frozen_in_eval_mode_student_trains(data):
    m = ifmmin(data).train()
    assert all(not mod.training for part in (m.teacher, m.teacher_inv) for mod in part.modules())
    b = masked_batch(data)
    t1, t2 = m.teacher_targets(b), m.teacher_targets(b)  # no dropout although m is in train mode
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k])
        assert not t1[k].requires_grad
    # the invariance term trains the student invariance encoder and encoders through H' only
    m.eval()  # the student's TextCNN dropout off, as in the reference
    _, parts = m.loss(b)
    params = [*m.encoders.parameters(), *m.invariance.parameters()]
    got = torch.autograd.grad(parts["invariance"], params)
    h, inv = student(m, data)
    want = torch.autograd.grad(100 * R.rmse(inv, t1["invariance"]), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    loss, _ = m.loss(b)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in [*m.teacher.parameters(), *m.teacher_inv.parameters()])
    opt.step()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("teacher.", "teacher_inv.")))
    for part in ("encoders.", "invariance.", "imagine.", "classifier."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


@pytest.mark.parametrize("name", ["if-mmin", "if-mmin-nocascade"])
def test_predict_reads_the_masked_sample_only(data, name):
    m = ifmmin(data, name).eval()
    b = C.without_truth(masked_batch(data))
    seen = {k: [] for k in C.MODALITIES}
    teacher_calls = []
    hooks = [m.encoders.enc[k].register_forward_pre_hook(lambda _, a, k=k: seen[k].append(a)) for k in C.MODALITIES]
    hooks += [mod.register_forward_pre_hook(lambda *_: teacher_calls.append(1)) for mod in (m.teacher, m.teacher_inv)]
    try:
        with torch.no_grad():
            out = m.predict(b)
    finally:
        for hd in hooks:
            hd.remove()
    for k in C.MODALITIES:
        (x, ln), = seen[k]
        assert torch.equal(x, b["x"][k]) and torch.equal(ln, b["lengths"][k])
    assert not teacher_calls
    with torch.no_grad():
        h, inv = student(m, data)
        want = R.classifier(m.classifier, R.if_im(m.imagine, h, inv, cascade=name == "if-mmin")[1])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
