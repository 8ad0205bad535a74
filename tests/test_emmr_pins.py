"""EMMR mechanism pins the reference tests (tests/test_emmr_reference.py) leave loose: there the
tiny model's attention is nearly uniform, so which frames an attention or a pooling reads hardly
moves a number. Here: the Judge (Eqs. 8-9) on a hand-built sequence with peaked attention, each
subset's attention and pooling over its own slots only (never padding); the Transformer's encoder
attends to the sample's valid frames and its decoder to every slot (Eq. 7, module docstring); the
key-missing check and the AE / CRA recovery terms cover exactly the samples that keep one or two
modalities (not a sample left with none, possible when natural absence meets a condition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.conditions import apply_availability, availability
from train.config import load_config
from train.data import MultimodalData
from train.methods import build
from train.methods.emmr_nets import SUBSET_NAMES, Judge, Layout

from test_emmr_reference import judge_ref  # Eqs. 8-9 written out, shared with the reference tests

ORDER = ("v", "a", "t")  # X = [E_v; E_a; E_t] (Eq. 2)
LENS = {"v": 3, "a": 4, "t": 3}
ZERO = {"model.dropout": 0.0, "model.encoder": {"dim": 4, "heads": 2, "dropout": 0.0}, "model.tf": {"ffn": 6},
        "model.ae": {"layers": [3, 2, 1]}, "model.cra": {"layers": [3, 2, 1], "blocks": 2}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _positions():
    out, start = {}, 0
    for m in ORDER:
        out[m] = list(range(start, start + LENS[m]))
        start += LENS[m]
    return out


def test_judge_attends_and_pools_over_each_subsets_slots_only():
    torch.manual_seed(0)
    judge = Judge(4, 2, 3, 0.0).eval()
    with torch.no_grad():
        judge.qkv.weight.mul_(8.0)  # peaked attention: every frame read shows in the output
    pos_of = _positions()
    n, T = 4, sum(LENS.values())
    seq = torch.randn(n, T, 4) * 2
    # slot patterns (v | a | t): padding at the ends of sequences, one sample missing v (all v slots)
    pattern = ["110" "1100" "111", "111" "1110" "100", "111" "1000" "110", "110" "1111" "111"]
    slots = torch.tensor([[c == "1" for c in p] for p in pattern])
    with torch.no_grad():
        got = judge(seq, slots, Layout(LENS))
        for i in range(n):
            for k, s in enumerate(SUBSET_NAMES):
                want = judge_ref(judge, seq[i], slots[i], s, pos_of)
                assert torch.allclose(got[i, k], want, atol=1e-5), (i, s)
        # the pin is sharp: reading the padding too would move the logits by far more than atol
        every = torch.ones(T, dtype=torch.bool)
        off = max(float((judge_ref(judge, seq[i], every, "vat", pos_of) - got[i, SUBSET_NAMES.index("vat")])
                        .abs().max()) for i in range(n))
    assert off > 1e-2


# ---- the model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data():
    """Six utterances; u5 has audio only (no face, no transcript: naturally absent)."""
    rng = np.random.default_rng(3)
    dims = {"a": 3, "v": 2, "t": 4}
    lens = {"a": [4, 2, 3, 1, 4, 3], "v": [3, 1, 2, 3, 2, None], "t": [2, 3, 1, 3, 2, None]}
    seqs = {m: [None if n is None else rng.normal(size=(n, dims[m])).astype(np.float32) for n in lens[m]]
            for m in dims}
    d = MultimodalData.from_arrays([f"u{i}" for i in range(6)], np.array([0, 1, 2, 0, 1, 2]), seqs,
                                   labels=["neg", "neu", "pos"])
    d.max_len, d.fixed_len = {"a": 5, "v": 3, "t": 4}, True
    return d


CONDS = ["avt", "at", "v", "av", "t", "vt"]  # u5 under vt: no modality left at all


def _model(data, **over):
    torch.manual_seed(11)
    teacher = build(load_config("emmr-teacher", None, ZERO), data.spec)
    torch.manual_seed(12)
    m = build(load_config("emmr", None, {**ZERO, **over}), data.spec)
    m.attach({"teacher": teacher})
    with torch.no_grad():  # peaked attention in the Transformer, so the keys it reads matter
        for mha in (m.tf.enc_mha, m.tf.dec_mha):
            mha.in_proj_weight.mul_(6.0)
    return m


def _batch(data):
    avail = np.stack([availability(c) for c in CONDS])
    b = apply_availability(data.collate(np.arange(len(CONDS))), avail)
    assert int(b["present"][5].sum()) == 0 and bool(b["natural"][5, 0])
    return b


def test_transformer_encoder_reads_valid_frames_decoder_every_slot(data):
    m = _model(data).eval()
    b = _batch(data)
    seen = {}
    def keep(name):
        return lambda mod, args, kw: seen.__setitem__(name, kw["key_padding_mask"])

    hooks = [mod.register_forward_pre_hook(keep(name), with_kwargs=True)
             for name, mod in (("enc", m.tf.enc_mha), ("dec", m.tf.dec_mha))]
    with torch.no_grad():
        m.forward_parts(b)
    for h in hooks:
        h.remove()
    present = torch.stack([b["present"][:, "avt".index(x)] for x in ORDER], 1)
    valid = torch.cat([b["frame_mask"][x] & present[:, i, None] for i, x in enumerate(ORDER)], 1)
    missing = torch.cat([(~present[:, i, None]).expand(-1, b["x"][x].shape[1]) for i, x in enumerate(ORDER)], 1)
    rows = valid.any(1)  # a sample with no valid frame keeps one key (train.nets.key_padding_mask)
    assert torch.equal(seen["enc"][rows], ~valid[rows])
    assert torch.equal(seen["dec"], ~(valid | missing))
    assert not torch.equal(valid | missing, valid)  # missing modalities' slots are decoder keys too


def test_check_and_recovery_terms_cover_samples_keeping_one_or_two_modalities(data):
    m = _model(data, **{"loss.backward": 0.7, "loss.forward": 0.0, "loss.judge": 0.0}).train()
    b = _batch(data)
    n_present = b["present"].sum(1)
    rows = torch.nonzero((n_present >= 1) & (n_present <= 2)).view(-1)
    assert rows.tolist() == [1, 2, 3, 4]  # not u0 (complete), not u5 (nothing left)
    total, parts = m.loss(b)
    with torch.no_grad():
        p = m.forward_parts(b, judge_all=True)
    assert torch.equal(p["check"], rows)
    assert not p["fire"][5] and not p["fire"][0]
    # Eq. 16 with the AE / CRA decoders on the checked rows only, each per-frame symmetric KL
    # averaged over the frames the complete sample has
    frames = torch.cat([b["frame_mask_full"][x] & b["natural"][:, "avt".index(x), None] for x in ORDER], 1)
    m.encoder.eval()
    with torch.no_grad():  # X~: the student encoder (eval mode) on the complete sample
        full = {x: b["frame_mask_full"][x] & b["natural"][:, "avt".index(x), None] for x in ORDER}
        enc = m.encoder(b["x_full"], full)
    target = torch.cat([enc[x] for x in ORDER], 1)

    def kl(a, c, f):
        pa, pc = torch.softmax(a, -1), torch.softmax(c, -1)
        per = 0.5 * ((pa * (pa.log() - pc.log())).sum(-1) + (pc * (pc.log() - pa.log())).sum(-1))
        return per[f].mean()

    want = 0.7 * (kl(p["dec"]["tf"], target, frames) + kl(p["check_dec"]["ae"], target[rows], frames[rows])
                  + kl(p["check_dec"]["cra"], target[rows], frames[rows])) / 3
    assert p["check_dec"]["ae"].shape[0] == len(rows)
    assert parts["backward"].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
