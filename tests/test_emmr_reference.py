"""EMMR against its equations: every loss term and the branch, on a tiny hand-built batch, equal a
reference written out here with torch ops from the paper (Eqs. 8-16 and the choices the module
docstring records), never through emmr_nets' helpers; forward hooks pin what each network reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from train.conditions import apply_availability, availability
from train.config import load_config
from train.data import MultimodalData
from train.methods import build
from train.methods.emmr_nets import SUBSET_NAMES

ORDER = ("v", "a", "t")  # the paper's concatenation order, X = [E_v; E_a; E_t] (Eq. 2)
PAIRS = ("va", "vt", "at")  # Eqs. 9-11
CONDS = ["avt", "at", "vt", "av", "a", "t", "v", "at", "vt", "av"]
ZERO = {"model.dropout": 0.0, "model.encoder": {"dim": 4, "heads": 2, "dropout": 0.0}, "model.tf": {"ffn": 6},
        "model.ae": {"layers": [3, 2, 1]}, "model.cra": {"layers": [3, 2, 1], "blocks": 2}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    """Ten utterances of 3 classes; lengths differ per sample and modality, below the fixed lengths."""
    rng = np.random.default_rng(7)
    dims, lens = {"a": 3, "v": 2, "t": 4}, {"a": [4, 3, 2, 4, 1, 3, 2, 4, 3, 1],
                                            "v": [3, 2, 3, 1, 2, 3, 1, 2, 3, 3],
                                            "t": [2, 3, 1, 3, 2, 2, 3, 1, 2, 3]}
    seqs = {m: [rng.normal(size=(n, dims[m])).astype(np.float32) for n in lens[m]] for m in dims}
    d = MultimodalData.from_arrays([f"u{i}" for i in range(10)], np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1]), seqs,
                                   labels=["neg", "neu", "pos"])
    d.max_len, d.fixed_len = {"a": 5, "v": 3, "t": 4}, True
    return d


def batch_of(data, conds=CONDS):
    avail = np.stack([availability(c) for c in conds])
    return apply_availability(data.collate(np.arange(len(conds))), avail)


def build_model(data, seed, **over):
    torch.manual_seed(seed + 1000)
    teacher = build(load_config("emmr-teacher", None, ZERO), data.spec)
    torch.manual_seed(seed)
    m = build(load_config("emmr", None, {**ZERO, **over}), data.spec)
    m.attach({"teacher": teacher})
    return m


_MIXED: dict = {}


def mixed(data, **over):
    """A model whose check fires on some samples that miss a modality and not on others."""
    key = repr(sorted(over.items()))
    if key not in _MIXED:
        b = batch_of(data)
        for seed in range(60):
            m = build_model(data, seed, **over).eval()
            with torch.no_grad():
                p = m.forward_parts(b)
            f = p["fire"][p["check"]]
            if f.any() and not f.all():
                _MIXED[key] = m
                break
        else:
            raise AssertionError("no seed gave fired and unfired samples")
    return _MIXED[key], batch_of(data)


# ---- the reference, from the equations ------------------------------------------------------------

def slices(batch):
    out, start = {}, 0
    for m in ORDER:
        n = batch["x"][m].shape[1]
        out[m] = range(start, start + n)
        start += n
    return out


def encode(enc, x: dict, valid: dict):
    """Eq. 1 per modality (dense, then self-attention over the valid frames), concatenated (Eq. 2)."""
    parts = []
    for m in ORDER:
        k = enc.proj[m](x[m])
        parts.append(enc.mha[m](k, k, k, key_padding_mask=~valid[m], need_weights=False)[0])
    return torch.cat(parts, 1)


def full_valid(batch):
    """Frames of the complete sample: its frame masks and natural presence."""
    return {m: batch["frame_mask_full"][m] & batch["natural"][:, "avt".index(m), None] for m in ORDER}


def pool(seq, frames, sl):
    """Balanced pooling: the mean over modalities (with a frame) of their mean over ``frames``."""
    means = [seq[[t for t in sl[m] if frames[t]]].mean(0) for m in ORDER if any(frames[t] for t in sl[m])]
    return torch.stack(means).mean(0)


def judge_ref(judge, seq, slots, subset: str, sl):
    """Eqs. 8-9 for one sample: L_S = FC(MHA([I_m || ...])) over the slots of the modalities in S."""
    pos = [t for m in ORDER if m in subset for t in sl[m] if slots[t]]
    h = seq[pos]
    d, heads = h.shape[1], judge.heads
    dh = d // heads
    qkv = h @ judge.qkv.weight.T + judge.qkv.bias
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    out = []
    for i in range(heads):
        c = slice(i * dh, (i + 1) * dh)
        out.append(torch.softmax(q[:, c] @ k[:, c].T / math.sqrt(dh), -1) @ v[:, c])
    h = torch.cat(out, 1) @ judge.out.weight.T + judge.out.bias  # MHA's output projection, per frame
    frames, full = torch.zeros(seq.shape[0], dtype=torch.bool), torch.zeros_like(seq)
    frames[pos], full[pos] = True, h
    return pool(full, frames, sl) @ judge.fc.weight.T + judge.fc.bias


def sym_kl_ref(a, b, frames):
    """Eqs. 15-16: ½ (KL(P || Q) + KL(Q || P)) of per-frame softmaxes over the features, mean over frames."""
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    per = 0.5 * ((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1))
    return per[frames].mean()


def reference(m, batch, p):
    """Everything the paper's equations give from the networks' own outputs X, F, D_TF and the AE's /
    CRA's decoder outputs: I per decoder, the Judge's logits, the check, Eqs. 10-13 and the output."""
    sl = slices(batch)
    present = torch.stack([batch["present"][:, "avt".index(x)] for x in ORDER], 1)
    X, B = p["x"], len(batch["y"])
    missing = torch.cat([(~present[:, i, None]).expand(-1, len(sl[x])) for i, x in enumerate(ORDER)], 1)
    valid = torch.cat([batch["frame_mask"][x] & present[:, i, None] for i, x in enumerate(ORDER)], 1)
    slots = valid | missing
    I_tf = torch.where(missing[..., None], p["dec"]["tf"], X)
    ref = {"I_tf": I_tf, "slots": slots, "sl": sl,
           "judge": torch.stack([torch.stack([judge_ref(m.judge, I_tf[i], slots[i], s, sl) for s in SUBSET_NAMES])
                                 for i in range(B)])}
    out = []
    for i in range(B):
        avail = "".join(x for j, x in enumerate(ORDER) if present[i, j])
        rep = pool(p["f"][i], slots[i], sl)
        f_out = rep @ m.classifier.net[-1].weight.T + m.classifier.net[-1].bias  # R = F
        if len(avail) == 3:
            out.append(f_out)
            continue
        l_vat = judge_ref(m.judge, I_tf[i], slots[i], "vat", sl)
        l_avail = judge_ref(m.judge, X[i], slots[i], avail, sl)  # only the available slots: X's
        if l_vat.argmax() == l_avail.argmax():  # Eq. 13: not a key missing modality
            out.append(f_out)
            continue
        row = int((p["check"] == i).nonzero())
        H = []
        for j in ("tf", "ae", "cra"):
            D = p["dec"]["tf"][i] if j == "tf" else p["check_dec"][j][row]
            I_j = torch.where(missing[i, :, None], D, X[i])
            L = torch.stack([judge_ref(m.judge, I_j, slots[i], k, sl) for k in PAIRS])  # (3, C)
            top = torch.softmax(L, -1).max(-1).values  # Eq. 10: L'_k
            alpha = torch.exp(top) / torch.exp(top).sum()
            H.append(torch.cat([alpha[k] * L[k] for k in range(3)]))  # Eq. 11
        H = torch.stack(H)  # (3 decoders, 3C)
        M = torch.tanh(H)  # Eq. 12
        beta = torch.softmax(M @ m.fusion.w, 0)
        r = beta @ H
        out.append(r @ m.key_classifier.weight.T + m.key_classifier.bias)
    ref["out"] = torch.stack(out)
    return ref


# ---- the Judge and the branch ---------------------------------------------------------------------

def test_every_judge_prediction_is_eq8_9_on_the_recovered_input_over_its_subsets_slots(data):
    m, b = mixed(data)
    with torch.no_grad():
        p = m.forward_parts(b, judge_all=True)
        ref = reference(m, b, p)
    assert p["judge_logits"].shape == (len(CONDS), 7, 3)
    assert torch.allclose(p["judge_logits"], ref["judge"], atol=1e-5)
    # the subsets differ, and each sample's L_vat reads its decoder's slice where a modality is missing
    assert (ref["judge"][:, 0] - ref["judge"][:, 6]).abs().max() > 1e-3
    assert not torch.equal(ref["I_tf"][1], p["x"][1])


def test_check_compares_l_vat_on_I_TF_with_l_avail_on_the_available_slots_only(data):
    m, b = mixed(data)
    seen = []
    hook = m.judge.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        p = m.forward_parts(b)
    hook.remove()
    check = p["check"]
    assert torch.equal(check, torch.arange(1, len(CONDS)))  # every sample but the complete one
    assert torch.equal(seen[0], p["recovered"]["tf"][check])  # the Judge's first read: I_TF
    ref_sl, slots = slices(b), p["slots"]
    for i in check.tolist():
        avail = "".join(x for x in ORDER if x in CONDS[i])
        l_avail = judge_ref(m.judge, p["x"][i], slots[i], avail, ref_sl)
        l_vat = judge_ref(m.judge, p["recovered"]["tf"][i], slots[i], "vat", ref_sl)
        assert torch.allclose(p["l_avail"][i], l_avail, atol=1e-5), i
        assert torch.allclose(p["l_full"][i], l_vat, atol=1e-5), i
        assert bool(p["fire"][i]) == bool(l_vat.argmax() != l_avail.argmax()), i


def test_the_output_is_eqs_10_to_13(data):
    m, b = mixed(data)
    with torch.no_grad():
        p = m.forward_parts(b)
        ref = reference(m, b, p)
    assert p["fire"].any() and not p["fire"][p["check"]].all()
    assert torch.allclose(p["out"], ref["out"], atol=1e-5)


def test_eq12_attention_fusion_on_a_hand_built_H(data):
    m, _ = mixed(data)
    H = torch.tensor([[[2.0, -1.5, 0.5, 3.0, 0.0, -2.0, 1.0, 1.0, -0.5],
                       [-1.0, 2.5, 1.5, -3.0, 0.5, 2.0, 0.0, -1.0, 2.5],
                       [0.5, 0.5, -2.5, 1.0, 3.0, 0.0, -1.5, 2.0, 1.0]]])  # (1 sample, 3 decoders, 3C)
    with torch.no_grad():
        m.fusion.w.copy_(torch.tensor([0.8, -0.6, 0.3, 1.2, -0.9, 0.4, 0.7, -1.1, 0.2]))
        r = m.fusion(H)
    M = torch.tanh(H[0])
    beta = torch.exp(M @ m.fusion.w) / torch.exp(M @ m.fusion.w).sum()
    assert torch.allclose(r[0], beta @ H[0], atol=1e-6)


@pytest.mark.parametrize("source", ["recovered", "x"])
def test_ae_and_cra_read_the_recovered_input(data, source):
    m, b = mixed(data, **({} if source == "recovered" else {"model.ensemble_input": "x"}))
    seen = {}
    hooks = [getattr(m, j).register_forward_pre_hook(lambda mod, args, j=j: seen.__setitem__(j, args[0].clone()))
             for j in ("ae", "cra")]
    with torch.no_grad():
        p = m.forward_parts(b)
    for h in hooks:
        h.remove()
    want = p["recovered"]["tf"] if source == "recovered" else p["x"]
    for j in ("ae", "cra"):
        assert torch.equal(seen[j], want[p["check"]]), j
    assert not torch.equal(p["recovered"]["tf"][p["check"]], p["x"][p["check"]])


# ---- the loss ------------------------------------------------------------------------------------

def test_every_loss_term_equals_its_equation(data):
    m, b = mixed(data, **{"loss.forward": 0.3, "loss.backward": 0.7, "loss.judge": 0.5})
    m.train()  # every dropout is 0: the loss is deterministic
    total, parts = m.loss(b)
    with torch.no_grad():
        p = m.forward_parts(b, judge_all=True)
        ref = reference(m, b, p)
        e_pre = encode(m.teacher, b["x_full"], full_valid(b))  # the frozen teacher on the complete sample
        m.encoder.eval()
        target = encode(m.encoder, b["x_full"], full_valid(b))  # X~: the student on the complete sample
        m.encoder.train()
    y = b["y"]
    frames = torch.cat([full_valid(b)[x] for x in ORDER], 1)
    ce = -torch.log_softmax(ref["out"], -1)[torch.arange(len(y)), y].mean()
    forward = 0.3 * sym_kl_ref(p["f"], e_pre, frames)
    rows = p["check"]
    backward = 0.7 * (sym_kl_ref(p["dec"]["tf"], target, frames)
                      + sym_kl_ref(p["check_dec"]["ae"], target[rows], frames[rows])
                      + sym_kl_ref(p["check_dec"]["cra"], target[rows], frames[rows])) / 3
    logp = torch.log_softmax(ref["judge"], -1)  # (B, 7 subsets, C)
    judge = 0.5 * -logp[torch.arange(len(y)), :, y].mean()
    assert set(parts) == {"ce", "forward", "backward", "judge"}
    for name, want in (("ce", ce), ("forward", forward), ("backward", backward), ("judge", judge)):
        assert parts[name].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), name
    assert total.item() == pytest.approx((ce + forward + backward + judge).item(), rel=1e-5)


def test_teacher_reads_x_full_with_the_complete_samples_frame_masks(data):
    m, b = mixed(data)
    m.train()
    seen = {}
    hooks = [m.teacher.proj[x].register_forward_pre_hook(lambda mod, args, x=x: seen.__setitem__(("in", x), args[0]))
             for x in ORDER]
    hooks += [m.teacher.mha[x].register_forward_pre_hook(
        lambda mod, args, kw, x=x: seen.__setitem__(("mask", x), kw["key_padding_mask"]), with_kwargs=True)
        for x in ORDER]
    m.loss(b)
    for h in hooks:
        h.remove()
    fv = full_valid(b)
    for x in ORDER:
        assert torch.equal(seen[("in", x)], b["x_full"][x]), x
        assert torch.equal(seen[("mask", x)], ~fv[x]), x
        assert not torch.equal(seen[("mask", x)], ~b["frame_mask"][x]), x  # a masked sample's mask would differ


def test_backward_target_is_the_eval_mode_encoding_and_the_mode_comes_back(data):
    m = build_model(data, 0, **{"model.encoder": {"dim": 4, "heads": 2, "dropout": 0.5}}).train()
    b = batch_of(data)
    p = m.forward_parts(b)
    torch.manual_seed(3)
    noisy = encode(m.encoder, b["x_full"], full_valid(b))  # train mode: Eq. 1's dropout is on
    target = m.backward_target(b, p)
    assert m.encoder.training
    m.encoder.eval()
    with torch.no_grad():
        clean = encode(m.encoder, b["x_full"], full_valid(b))
    frames = torch.cat([full_valid(b)[x] for x in ORDER], 1)
    assert torch.equal(target, clean)
    assert not torch.allclose(noisy[frames], clean[frames])  # the dropout would have changed it
    assert not target.requires_grad
    literal = build_model(data, 0, **{"loss.backward_target": "masked"}).train()
    q = literal.forward_parts(b)
    assert torch.equal(literal.backward_target(b, q), q["x"])


@pytest.mark.parametrize("conds", [["avt"] * 4, ["avt", "at", "vt", "av"]])
def test_the_judge_learns_on_every_batch_also_where_nothing_fires(data, conds):
    b = batch_of(data, conds)
    for w in (1.0, 0.0):
        m = build_model(data, 0, **{"loss.judge": w}).train()
        if len(conds) > 1 and conds[1] != "avt":  # make sure the check fires nowhere
            with torch.no_grad():  # every subset's argmax is class 1, yet gradients still flow
                m.judge.fc.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
            assert not m.forward_parts(b)["fire"].any()
        loss, parts = m.loss(b)
        loss.backward()
        g = [x.grad for x in m.judge.parameters()]
        if w:
            assert parts["judge"].item() > 0
            assert all(x is not None and x.abs().sum() > 0 for x in g[:2])  # qkv: the attention learns too
            assert m.judge.fc.weight.grad.abs().sum() > 0
        else:
            assert all(x is None or not x.any() for x in g)  # without its term the Judge learns nothing here
