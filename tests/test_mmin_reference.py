"""Mechanism tests for the full-modality / augmented baselines and MMIN (Zhao, Li, Jin, ACL 2021;
SPEC.md §3), against references written out with torch ops in tests/mmin_reference.py: every
loss term's value, the cycle target's detach, the teacher's reversed input, the CRA's residual
wiring, the frozen teacher, and what the encoders read in ``predict``. Tiny nets, no training
beyond three epochs of the tiny baseline-aug run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmin_reference as R
from train import conditions as C
from train.config import load_config
from train.methods import build
from train.synthetic import synthetic_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# small, unequal widths (a 6, v 5, t 7 -> 18): a swapped slice cannot line up by accident;
# utterances from 1 frame, so some texts are shorter than the widest kernel
TINY = {
    "model.encoders": {"a": {"kind": "lstm", "hidden": 6, "pool": "max"},
                       "v": {"kind": "lstm", "hidden": 5, "pool": "max"},
                       "t": {"kind": "textcnn", "embed": 7, "channels": 4, "kernels": [3, 4, 5], "dropout": 0.5}},
    "model.classifier": [8],
    "model.init": "default",
}
MMIN_TINY = {**TINY, "model.imagination": {"kind": "cra", "layers": [12, 8, 4], "blocks": 5}}
ROWS = np.arange(12)
AVAIL = np.array([C.availability(c) for c in C.MISSING_CONDITIONS * 2])  # every missing condition twice


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=24, dims={"a": 5, "v": 4, "t": 6}, lengths={"a": (1, 9), "v": (1, 6), "t": (1, 8)},
                          absent=0.25, seed=7)


def masked_batch(data, avail=AVAIL, rows=ROWS):
    return C.apply_availability(data.collate(rows), avail)


def trained_baseline(data):
    torch.manual_seed(3)
    base = build(load_config("baseline", None, TINY), data.spec)
    with torch.no_grad():
        for p in base.parameters():  # "trained": any weights other than a fresh init
            p.normal_(0, 0.4)
    return base


def mmin(data, **over):
    torch.manual_seed(0)
    m = build(load_config("mmin", None, {**MMIN_TINY, **over}), data.spec)
    m.attach({"encoders": trained_baseline(data)})
    with torch.no_grad():  # fine-tuned: the student has moved away from its teacher
        for p in m.encoders.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def reversed_keep(data, avail=AVAIL, rows=ROWS):
    """MMIN's teacher input: missing modalities real (where the utterance has them), the
    available ones zeroed."""
    return R.natural(data, rows) & ~avail


def capture_inputs(modules: dict):
    """Forward pre-hooks recording the (x, lengths) each encoder is called with."""
    seen = {m: [] for m in modules}
    handles = [mod.register_forward_pre_hook(lambda _, args, m=m: seen[m].append([a.detach().clone() for a in args]))
               for m, mod in modules.items()]
    return seen, handles


# ---- MMIN: the three loss terms ---------------------------------------------------------------------

def test_mmin_paper_weights():
    cfg = load_config("mmin")
    assert cfg["loss"] == {"ce": 1.0, "forward": 4.0, "cycle": 2.0}
    assert cfg["requires"] == {"encoders": "baseline"}


def test_mmin_loss_terms_equal_reference(data):
    m = mmin(data).eval()  # dropout off: the reference has none
    b = masked_batch(data)
    total, parts = m.loss(b)
    with torch.no_grad():
        h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL))  # the masked sample
        recon, latent = R.cra(m.imagine, h)
        ce = R.cross_entropy(R.classifier(m.classifier, latent), b["y"])
        target = R.fuse(R.embed(m.teacher, data, ROWS, reversed_keep(data)))
        forward = 4 * R.mse(target, recon)
        back, _ = R.cra(m.imagine_back, recon)
        cycle = 2 * R.mse(h, back)
    assert set(parts) == {"ce", "forward", "cycle"}
    for name, want in (("ce", ce), ("forward", forward), ("cycle", cycle)):
        torch.testing.assert_close(parts[name], want, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(total, ce + forward + cycle, rtol=1e-4, atol=1e-6)
    # the target of a modality the sample keeps is the teacher's embedding of one zero frame,
    # not a zero vector: row 0 keeps only audio
    zero_a = R.lstm_maxpool(m.teacher.enc["a"], torch.zeros(1, 5))
    torch.testing.assert_close(target[0, :6], zero_a)
    assert zero_a.abs().sum() > 0


def _encoder_grads(m, term):
    params = list(m.encoders.parameters())
    return torch.cat([g.flatten() for g in torch.autograd.grad(term, params)])


def test_mmin_cycle_target_is_detached(data):
    """The cycle term's gradient reaches the student encoders only through the forward and
    backward modules, never through its target h."""
    m = mmin(data).eval()
    b = masked_batch(data)
    _, parts = m.loss(b)
    got = _encoder_grads(m, parts["cycle"])
    h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL))
    back, _ = R.cra(m.imagine_back, R.cra(m.imagine, h)[0])
    detached = _encoder_grads(m, 2 * R.mse(h.detach(), back))
    h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL))
    back, _ = R.cra(m.imagine_back, R.cra(m.imagine, h)[0])
    attached = _encoder_grads(m, 2 * R.mse(h, back))
    torch.testing.assert_close(got, detached, rtol=1e-3, atol=1e-7)
    assert not torch.allclose(got, attached, rtol=1e-3, atol=1e-7)


def test_mmin_forward_target_is_a_constant_of_the_frozen_teacher(data):
    m = mmin(data).eval()
    b = masked_batch(data)
    _, parts = m.loss(b)
    got = _encoder_grads(m, parts["forward"])
    h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL))
    with torch.no_grad():
        target = R.fuse(R.embed(m.teacher, data, ROWS, reversed_keep(data)))
    want = _encoder_grads(m, 4 * R.mse(target, R.cra(m.imagine, h)[0]))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-7)
    assert not m.teacher_target(b).requires_grad


# ---- MMIN: what each part reads ---------------------------------------------------------------------

def test_mmin_teacher_reads_reversed_input(data):
    """Missing real (its true frames and length), available zeroed as one zero frame (length 1);
    a modality the utterance lacks is one zero frame either way."""
    m = mmin(data).eval()
    b = masked_batch(data)
    seen, handles = capture_inputs(dict(m.teacher.enc.items()))
    try:
        m.loss(b)
    finally:
        for hd in handles:
            hd.remove()
    keep = reversed_keep(data)
    for j, mod in enumerate(C.MODALITIES):
        assert len(seen[mod]) == 1, mod  # one teacher pass per loss
        x, lengths = seen[mod][0]
        for r, i in enumerate(ROWS):
            if keep[r, j]:
                n = data.seqs[mod].lengths[i]
                assert lengths[r] == n
                torch.testing.assert_close(x[r, :n], torch.from_numpy(data.seqs[mod].seq(i)))
                assert not x[r, n:].any()
            else:
                assert lengths[r] == 1 and not x[r].any(), (mod, r)
    assert keep.any() and (~keep).any()


def test_mmin_cra_residual_wiring(data):
    """Block 1 reads the fused h; block i reads block i-1's input + its output; the output head
    (Linear-ReLU-Linear) reads the last sum; the classifier reads the concatenated latents; the
    backward module reads the forward output."""
    m = mmin(data).eval()
    b = masked_batch(data)
    rec = {"in": [], "z": [], "out": [], "head_in": [], "head": [], "clf": [], "back": []}

    hooks = [enc.register_forward_hook(R.recorder(rec, "in", "z")) for enc in m.imagine.encoders]
    hooks += [dec.register_forward_hook(R.recorder(rec, None, "out")) for dec in m.imagine.decoders]
    hooks.append(m.imagine.transition.register_forward_hook(R.recorder(rec, "head_in", "head")))
    hooks.append(m.classifier.register_forward_hook(R.recorder(rec, "clf")))
    hooks.append(m.imagine_back.encoders[0].register_forward_hook(R.recorder(rec, "back")))
    R.hooked(lambda: m.loss(b), hooks)
    h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & AVAIL))
    ins, outs = rec["in"], rec["out"]
    assert len(ins) == len(outs) == 5
    torch.testing.assert_close(ins[0], h, rtol=1e-4, atol=1e-5)
    for i in range(1, 5):
        torch.testing.assert_close(ins[i], ins[i - 1] + outs[i - 1])
    (head_in,), (head_out,) = rec["head_in"], rec["head"]
    torch.testing.assert_close(head_in, ins[-1] + outs[-1])
    torch.testing.assert_close(head_out, R.transition(m.imagine.transition, head_in))
    for enc, z, x in zip(m.imagine.encoders, rec["z"], ins):  # no activation on the latent
        torch.testing.assert_close(z, R.ae_encoder(enc, x))
    for dec, z, out in zip(m.imagine.decoders, rec["z"], outs):
        torch.testing.assert_close(out, R.ae_decoder(dec, z))
    torch.testing.assert_close(rec["clf"][0], torch.cat(rec["z"], -1))
    torch.testing.assert_close(rec["back"][0], head_out)


# ---- frozen teacher -----------------------------------------------------------------------------

def test_mmin_teacher_frozen_in_eval_mode_student_trains(data):
    m = mmin(data).train()
    assert all(not mod.training for mod in m.teacher.modules())  # its TextCNN dropout is off
    b = masked_batch(data)
    first = m.teacher_target(b)
    torch.testing.assert_close(first, m.teacher_target(b))  # deterministic although m is in train mode
    with torch.no_grad():
        want = R.fuse(R.embed(m.teacher, data, ROWS, reversed_keep(data)))
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    loss, _ = m.loss(b)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    opt.step()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("teacher."))
    for part in ("encoders.", "imagine.", "imagine_back.", "classifier."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


# ---- predict reads the masked sample only -------------------------------------------------------

@pytest.mark.parametrize("name", ["baseline", "mmin"])
def test_predict_encodes_the_masked_sample(data, name):
    """The student encoders read the masked x and lengths (a masked modality: one zero frame);
    the teacher is not used; the output equals the per-utterance reference."""
    m = (mmin(data) if name == "mmin" else trained_baseline(data)).eval()
    b = C.without_truth(masked_batch(data))
    seen, handles = capture_inputs(dict(m.encoders.enc.items()))
    tseen, thandles = capture_inputs(dict(m.teacher.enc.items())) if name == "mmin" else ({}, [])
    try:
        with torch.no_grad():
            out = m.predict(b)
    finally:
        for hd in handles + thandles:
            hd.remove()
    keep = R.natural(data, ROWS) & AVAIL
    for j, mod in enumerate(C.MODALITIES):
        (x, lengths), = seen[mod]
        torch.testing.assert_close(x, b["x"][mod])
        assert torch.equal(lengths, b["lengths"][mod])
        gone = ~keep[:, j]
        assert (lengths[gone] == 1).all() and not x[gone].any()
    assert not any(tseen.values())
    with torch.no_grad():
        h = R.fuse(R.embed(m.encoders, data, ROWS, keep))
        want = R.classifier(m.classifier, R.cra(m.imagine, h)[1] if name == "mmin" else h)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_paper_sizes_of_encoders_cra_and_classifier(data):
    m = build(load_config("mmin"), data.spec)
    for mod in ("a", "v"):
        enc = m.encoders.enc[mod]
        assert enc.rnn.hidden_size == 128 and enc.rnn.num_layers == 1 and not enc.rnn.bidirectional
        assert enc.pool == "max" and not enc.pool_over_padding
    t = m.encoders.enc["t"]
    assert [tuple(c.weight.shape[:1]) + tuple(c.weight.shape[2:]) for c in t.convs] == [(128, 3), (128, 4), (128, 5)]
    assert t.dropout.p == 0.5 and R.linears(t.embd)[0].weight.shape == (128, 384)
    for enc, dec in zip(m.imagine.encoders, m.imagine.decoders):
        assert [tuple(lin.weight.shape) for lin in R.linears(enc)] == [(256, 384), (128, 256), (64, 128)]
        assert [tuple(lin.weight.shape) for lin in R.linears(dec)] == [(128, 64), (256, 128), (384, 256)]
    assert len(m.imagine.encoders) == 5
    assert [tuple(lin.weight.shape) for lin in R.linears(m.classifier)] == [(128, 320), (128, 128), (4, 128)]


# ---- baselines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("masked", [False, True])
def test_baseline_loss_is_ce_only(data, masked):
    """CE of the classifier on the fused embeddings of the sample as trained: full data for the
    baseline, a masked one (baseline-aug) read from ``x``, never from the truth ``x_full``."""
    m = trained_baseline(data).eval()
    avail = AVAIL if masked else np.ones((len(ROWS), 3), bool)
    b = masked_batch(data, avail)
    total, parts = m.loss(b)
    with torch.no_grad():
        h = R.fuse(R.embed(m.encoders, data, ROWS, R.natural(data, ROWS) & avail))
        ce = R.cross_entropy(R.classifier(m.classifier, h), b["y"])
    assert set(parts) == {"ce"}
    torch.testing.assert_close(parts["ce"], ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, ce, rtol=1e-4, atol=1e-6)


def _training_conditions(name, n=126, epochs=3, tmp_path=None):
    """The condition of every training sample the trainer hands to ``loss`` over a short run."""
    from train.trainer import Trainer

    d = synthetic_data(n=n + 14, dims={"a": 3, "v": 3, "t": 4}, lengths={"a": (2, 4), "v": (2, 4), "t": (5, 6)}, seed=1)
    cfg = load_config(name, None, {**TINY, "train.epochs": epochs, "train.schedule": {"kind": "constant"},
                                   "train.batch_size": 32, "data.normalize": []})
    torch.manual_seed(0)
    m = build(cfg, d.spec)
    seen = []
    loss = m.loss
    m.loss = lambda b: (seen.extend(C.condition_of(r) for r in b["avail"].tolist()), loss(b))[1]
    Trainer(m, d, np.arange(n), np.arange(n, n + 14), cfg, tmp_path, seed=0, signature="sig", progress=False).fit()
    return seen


def test_baseline_trains_on_full_data(tmp_path):
    seen = _training_conditions("baseline", epochs=1, tmp_path=tmp_path)
    assert len(seen) == 126 and set(seen) == {"avt"}


def test_baseline_aug_pools_full_data_with_the_six_missing_conditions(tmp_path):
    assert load_config("baseline-aug")["method"] == "baseline"  # the same model; only the data differ
    seen = _training_conditions("baseline-aug", tmp_path=tmp_path)
    counts = {c: seen.count(c) for c in C.CONDITIONS}
    assert len(seen) == 3 * 126 and set(seen) == set(C.CONDITIONS)
    # uniform over the seven: 54 expected each (binomial sd ~6.8)
    assert all(54 - 27 <= v <= 54 + 27 for v in counts.values()), counts
