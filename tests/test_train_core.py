"""Training framework units: missing conditions, teacher input, CRA wiring, MMIN losses,
normalisation statistics, metrics, configs and the data module (tiny tensors, no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import conditions as C
from train import protocols as P
from train import metrics
from train.config import ConfigError, list_configs, load_config
from train.data import MultimodalData, Normalizer
from train.methods import available, build
from train.nets import CascadeResidualAE, PlainAE
from train.synthetic import synthetic_data


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=24, seed=3, absent=0.2)


def _batch(data, n=8):
    return data.collate(np.arange(n))


# ---- conditions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cond", C.CONDITIONS)
def test_condition_zeroes_exactly_the_dropped_modalities(data, cond):
    batch = _batch(data)
    n = len(batch["y"])
    out = C.apply_availability(batch, np.tile(C.availability(cond), (n, 1)))
    for i, m in enumerate(C.MODALITIES):
        kept = m in cond
        assert bool(out["avail"][:, i].all()) == kept and bool(out["avail"][:, i].any()) == kept
        # present = exists for the utterance AND kept by the condition
        assert torch.equal(out["present"][:, i], batch["natural"][:, i] & kept)
        if kept:
            assert torch.equal(out["x"][m], batch["x"][m])
        else:
            assert not out["x"][m].any()
        assert torch.equal(out["x_full"][m], batch["x"][m])  # ground truth kept for losses
        # a modality not present is one zero frame: its length and frame mask say nothing
        has = out["present"][:, i]
        assert torch.equal(out["lengths"][m], torch.where(has, batch["lengths"][m], 1))
        assert torch.equal(out["frame_mask"][m], batch["frame_mask"][m] & has[:, None])
        assert torch.equal(out["lengths_full"][m], batch["lengths"][m])
        assert torch.equal(out["frame_mask_full"][m], batch["frame_mask"][m])
    assert batch["x"]["a"].any()  # the original batch is not modified


def test_per_sample_availability_rows(data):
    batch = _batch(data, 6)
    avail = np.array([C.availability(c) for c in ("a", "v", "t", "av", "at", "vt")])
    out = C.apply_availability(batch, avail)
    for b in range(6):
        for i, m in enumerate(C.MODALITIES):
            assert bool(out["x"][m][b].any()) == (bool(avail[b, i]) and bool(batch["x"][m][b].any()))


def test_canonical_names_and_bad_conditions():
    assert C.canonical("ta") == "at" and C.canonical("tva") == "avt"
    for bad in ("", "x", "aa"):
        with pytest.raises(ValueError, match="bad condition"):
            C.canonical(bad)
    assert C.condition_of([True, False, True]) == "at"


def test_training_draws_are_seeded_and_keep_a_modality():
    spec = {"kind": "conditions", "choices": list(C.MISSING_CONDITIONS)}
    a1 = P.draw(spec, 600, np.random.default_rng(5))
    a2 = P.draw(spec, 600, np.random.default_rng(5))
    assert np.array_equal(a1, a2)
    names = [C.condition_of(r) for r in a1]
    assert set(names) == set(C.MISSING_CONDITIONS)  # never full, every missing condition drawn
    counts = np.array([names.count(c) for c in C.MISSING_CONDITIONS])
    assert counts.min() > 60  # uniform: 100 expected each

    r = P.draw({"kind": "missing-rate", "rate": 0.5}, 2000, np.random.default_rng(1))
    assert r.sum(1).min() >= 1
    assert np.array_equal(r, P.draw({"kind": "missing-rate", "rate": 0.5}, 2000, np.random.default_rng(1)))
    assert abs(P.realised_rate(r) - 0.5) <= 1 / (3 * 2000)  # exact on the batch, to one slot
    assert P.draw({"kind": "missing-rate", "rate": 0.0}, 50, np.random.default_rng(0)).all()  # MR 0 = complete

    o = P.draw({"kind": "missing-ratio", "ratio": 0.3}, 100, np.random.default_rng(2))
    assert (o.sum(1) == 2).sum() == 30 and (o.sum(1) == 3).sum() == 70
    assert P.draw({"kind": "full"}, 4, np.random.default_rng(0)).all()
    with pytest.raises(ValueError, match="unknown"):
        P.draw({"kind": "nope"}, 4, np.random.default_rng(0))


def test_reversed_input_is_missing_real_available_zeroed(data):
    batch = _batch(data, 6)
    avail = np.array([C.availability(c) for c in ("a", "v", "t", "av", "at", "vt")])
    b = C.apply_availability(batch, avail)
    rev = C.reversed_input(b)
    for r in range(6):
        for i, m in enumerate(C.MODALITIES):
            if avail[r, i] or not batch["natural"][r, i]:
                assert not rev["x"][m][r].any() and rev["lengths"][m][r] == 1 and not rev["frame_mask"][m][r].any()
            else:
                assert torch.equal(rev["x"][m][r], batch["x"][m][r])
                assert rev["lengths"][m][r] == batch["lengths"][m][r]


# ---- networks -------------------------------------------------------------------------------------

def test_cra_residual_wiring_and_latent_size():
    torch.manual_seed(0)
    cra = CascadeResidualAE(384, layers=[256, 128, 64], blocks=5)
    ins, outs = [], []
    for enc, dec in zip(cra.encoders, cra.decoders):
        enc.register_forward_hook(lambda mod, i, o: ins.append(i[0].detach()))
        dec.register_forward_hook(lambda mod, i, o: outs.append(o.detach()))
    trans_in = []
    cra.transition.register_forward_hook(lambda mod, i, o: trans_in.append(i[0].detach()))
    h = torch.randn(3, 384)
    recon, latent = cra(h)
    assert len(ins) == 5 and latent.shape == (3, 5 * 64) and recon.shape == (3, 384)
    # block k reads h + sum of the previous blocks' outputs (Eq. 2)
    for k in range(5):
        assert torch.allclose(ins[k], h + sum(outs[:k], torch.zeros_like(h)), atol=1e-5)
    # output = transition(h + sum of all block outputs) (Eq. 3 + the authors' head)
    assert torch.allclose(trans_in[0], h + sum(outs, torch.zeros_like(h)), atol=1e-5)
    assert torch.allclose(recon, cra.transition(trans_in[0]))
    # latents = each block's encoder output, concatenated in order
    z = [cra.encoders[k](ins[k]) for k in range(5)]
    assert torch.allclose(latent, torch.cat(z, -1), atol=1e-6)
    # encoder 384-256-128-64: LeakyReLU between layers, nothing after the latent
    lin = [m for m in cra.encoders[0] if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(384, 256), (256, 128), (128, 64)]
    assert isinstance(cra.encoders[0][-1], torch.nn.Linear)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in cra.encoders[0])
    dec = [m for m in cra.decoders[0] if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in dec] == [(64, 128), (128, 256), (256, 384)]


def test_encoders_ignore_batch_padding(data):
    """An utterance's embedding does not depend on how long its batch-mates are."""
    cfg = load_config("baseline")
    m = build(cfg, data.spec).eval()
    lens = data.seqs["a"].lengths
    short = int(np.argmin(lens))
    long = int(np.argmax(lens))
    with torch.no_grad():
        alone = m.encoders(**{k: _batch_of(data, [short])[k] for k in ("x", "lengths")})
        mixed = m.encoders(**{k: _batch_of(data, [short, long])[k] for k in ("x", "lengths")})
    for mod in C.MODALITIES:
        assert torch.allclose(alone[mod][0], mixed[mod][0], atol=1e-5)


@pytest.mark.parametrize("pool", ["max", "last", "mean"])
def test_lstm_encoder_equals_packed_sequences(pool):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from train.nets import LSTMEncoder

    torch.manual_seed(0)
    enc = LSTMEncoder(5, hidden=7, pool=pool)
    x, lengths = torch.randn(4, 9, 5), torch.tensor([9, 3, 1, 6])
    for b, n in enumerate(lengths):
        x[b, n:] = 0
    out, (h, _) = enc.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=9)
    ref = {"last": h[-1],
           "max": torch.stack([out[b, :n].amax(0) for b, n in enumerate(lengths)]),
           "mean": torch.stack([out[b, :n].mean(0) for b, n in enumerate(lengths)])}[pool]
    assert torch.allclose(enc(x, lengths), ref, atol=1e-6)


def _batch_of(data, rows):
    return data.collate(np.asarray(rows))


def _mmin(data, **over):
    cfg = load_config("mmin", overrides=over)
    base = build(load_config("baseline"), data.spec)
    torch.manual_seed(1)
    for p in base.parameters():  # a "trained" baseline: any weights other than the student's init
        p.data.normal_(0, 0.1)
    m = build(cfg, data.spec)
    m.attach({"encoders": base})
    return m, base


def test_mmin_sizes_and_attach(data):
    m, base = _mmin(data)
    assert m.encoders.out_dim == 384 and m.imagine.latent_dim == 320
    first = [mod for mod in m.classifier.net if isinstance(mod, torch.nn.Linear)][0]
    assert first.in_features == 320  # the classifier reads the 5 concatenated latents
    for name, p in base.encoders.state_dict().items():  # student and teacher start from the baseline
        assert torch.equal(m.encoders.state_dict()[name], p) and torch.equal(m.teacher.state_dict()[name], p)
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert not any(p is q for p in m.trainable_parameters() for q in m.teacher.parameters())
    m.train()
    assert not m.teacher.training  # the frozen teacher's dropout stays off
    fresh = build(load_config("mmin"), data.spec)
    with pytest.raises(RuntimeError, match="never loaded"):
        fresh.loss(C.apply_availability(_batch(data), np.ones((8, 3), bool)))


def test_mmin_teacher_target_uses_reversed_input(data):
    m, _ = _mmin(data)
    m.eval()
    b = C.apply_availability(_batch(data, 4), np.array([C.availability(c) for c in ("a", "vt", "at", "v")]))
    tgt = m.teacher_target(b)
    with torch.no_grad():
        rev = C.reversed_input(b)
        h = m.teacher(rev["x"], rev["lengths"])
        zero = {mod: torch.zeros_like(b["x_full"][mod]) for mod in C.MODALITIES}
        hz = m.teacher(zero, {mod: torch.ones_like(v) for mod, v in b["lengths"].items()})
    assert torch.allclose(tgt, m.teacher.fuse(h))
    # sample 0 keeps only "a": its audio target is the teacher's embedding of a zero sequence,
    # which is not a zero vector
    assert torch.allclose(tgt[0, :128], hz["a"][0], atol=1e-6) and tgt[0, :128].abs().sum() > 0
    # and its video target is the teacher's embedding of the real video
    real = m.teacher({k: v for k, v in b["x_full"].items()}, b["lengths_full"])
    assert torch.allclose(tgt[0, 128:256], real["v"][0], atol=1e-6)


@pytest.mark.parametrize("w", [(1.0, 4.0, 2.0), (0.5, 3.0, 0.7)])
def test_mmin_loss_composition(data, w):
    # PyTorch's init: under the authors' kaiming init (mmin.yaml) the CRA path's gradient is ~1e5
    # and swamps the cycle target's share that the detach check below measures
    m, _ = _mmin(data, **{"loss.ce": w[0], "loss.forward": w[1], "loss.cycle": w[2], "model.init": "default"})
    m.eval()  # no dropout, so the hand computation sees the same forward pass
    b = C.apply_availability(_batch(data), P.draw({"kind": "conditions"}, 8, np.random.default_rng(0)))
    total, parts = m.loss(b)
    with torch.no_grad():
        h = m.encoders.fuse(m.encoders(b["x"], b["lengths"]))
        recon, latent = m.imagine(h)
        logits = m.classifier(latent)
        ce = torch.nn.functional.cross_entropy(logits, b["y"])
        rev = C.reversed_input(b)
        target = m.teacher.fuse(m.teacher(rev["x"], rev["lengths"]))
        fwd = ((recon - target) ** 2).mean()
        back, _ = m.imagine_back(recon)
        cyc = ((back - h) ** 2).mean()
    assert set(parts) == {"ce", "forward", "cycle"}
    assert torch.allclose(parts["ce"], w[0] * ce, rtol=1e-5)
    assert torch.allclose(parts["forward"], w[1] * fwd, rtol=1e-5)
    assert torch.allclose(parts["cycle"], w[2] * cyc, rtol=1e-5)
    assert torch.allclose(total, w[0] * ce + w[1] * fwd + w[2] * cyc, rtol=1e-5)
    # the cycle target is detached: the cycle loss sends no gradient into h through the target
    m.zero_grad()
    parts["cycle"].backward()
    assert m.classifier.net[0].weight.grad is None or not m.classifier.net[0].weight.grad.any()
    # ... and the encoders' gradient equals that of the loss with h.detach() as the target, not with h
    def enc_grad(detach: bool):
        m.zero_grad()
        h = m.encoders.fuse(m.encoders(b["x"], b["lengths"]))
        back, _ = m.imagine_back(m.imagine(h)[0])
        (w[2] * ((back - (h.detach() if detach else h)) ** 2).mean()).backward()
        return grads()

    def grads():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in m.encoders.parameters()])

    m.zero_grad()
    total, parts = m.loss(b)
    parts["cycle"].backward()
    g = grads()
    assert torch.allclose(g, enc_grad(True), atol=1e-6) and not torch.allclose(g, enc_grad(False), atol=1e-6)


def test_mmin_ablation_switches(data):
    nc, _ = _mmin(data, **{"loss.cycle": 0.0})
    assert nc.imagine_back is None
    _, parts = nc.loss(C.apply_availability(_batch(data), P.draw({"kind": "conditions"}, 8, np.random.default_rng(0))))
    assert set(parts) == {"ce", "forward"}
    ae = build(load_config("mmin-ae"), data.spec)
    assert isinstance(ae.imagine, PlainAE) and ae.imagine.latent_dim == 256
    assert load_config("mmin-nocycle")["loss"]["cycle"] == 0.0
    shared = build(load_config("mmin", "msp-improv"), data.spec)
    assert shared.imagine_back is shared.imagine
    sep = build(load_config("mmin"), data.spec)
    assert sep.imagine_back is not sep.imagine


def test_baseline_predict_ignores_x_full(data):
    m = build(load_config("baseline"), data.spec).eval()
    b = C.apply_availability(_batch(data), np.tile(C.availability("a"), (8, 1)))
    out1 = m.predict(b)
    b2 = dict(b, x_full={k: torch.randn_like(v) for k, v in b["x_full"].items()})
    assert torch.equal(out1, m.predict(b2)) and out1.shape == (8, 4)


# ---- normalisation ------------------------------------------------------------------------------

def test_normalizer_uses_training_rows_only():
    d = synthetic_data(n=30, seed=1)
    train = np.arange(0, 20)
    norm = Normalizer.fit(d, train, ["a", "t"])
    frames = np.concatenate([d.seqs["a"].seq(i) for i in train]).astype(np.float64)
    assert np.allclose(norm.mean["a"], frames.mean(0), atol=1e-5)
    assert np.allclose(norm.std["a"], frames.std(0), atol=1e-5)
    assert "v" not in norm.mean  # only the configured modalities
    # changing the held-out utterances changes nothing
    d.seqs["a"].data[d.seqs["a"].offsets[25]:d.seqs["a"].offsets[25] + d.seqs["a"].lengths[25]] += 100.0
    again = Normalizer.fit(d, train, ["a"])
    assert np.array_equal(again.mean["a"], norm.mean["a"])
    assert not np.allclose(Normalizer.fit(d, np.arange(30), ["a"]).mean["a"], norm.mean["a"])
    # applied in collate: real frames standardised, padding and absent frames stay zero
    b = d.collate(train[:5], norm)
    x, fm = b["x"]["a"].numpy(), b["frame_mask"]["a"].numpy()
    assert not x[~fm].any()
    raw = d.collate(train[:5])["x"]["a"].numpy()
    assert np.allclose(x[fm], (raw[fm] - norm.mean["a"]) / norm.std["a"], atol=1e-5)
    assert Normalizer.from_dict(norm.to_dict()).mean["a"].tolist() == norm.mean["a"].tolist()


# ---- metrics ---------------------------------------------------------------------------------------

def test_classification_metrics_equal_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    p = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2, 1])
    m = metrics.classification_metrics(y, p)
    assert m["wa"] == pytest.approx(6 / 10)
    recalls = [2 / 3, 1 / 2, 3 / 4, 0 / 1]
    assert m["ua"] == pytest.approx(np.mean(recalls))
    prec = [2 / 3, 1 / 3, 3 / 4, 0.0]
    f1s = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(prec, recalls)]
    assert m["f1"] == pytest.approx(np.mean(f1s))
    logits = np.eye(4)[p] * 3.0
    assert metrics.compute("classification", y, logits) == m
    assert np.isnan(metrics.classification_metrics([], [])["wa"])


def test_regression_metrics_equal_hand_computed():
    y = np.array([-2.4, -0.2, 0.0, 0.6, 3.4, 1.4])
    p = np.array([-1.0, 0.3, 0.2, 1.7, 2.2, -0.1])
    m = metrics.regression_metrics(y, p)
    assert m["acc2"] == pytest.approx(3 / 5)  # zero label excluded: (-2.4,-1) ok, (-0.2,.3) no, .6 ok, 3.4 ok, 1.4 no
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    assert m["acc7"] == pytest.approx(2 / 6)  # rounded clipped: [-2,0,0,1,3,1] vs [-1,0,0,2,2,0]
    assert m["acc3"] == pytest.approx(3 / 6)
    assert m["mae"] == pytest.approx(np.abs(y - p).mean())
    # weighted F1 over the non-zero labels
    yt, pt = y[y != 0] > 0, p[y != 0] > 0
    f = []
    for c in (False, True):
        tp = np.sum((yt == c) & (pt == c))
        pr, rc = tp / max(np.sum(pt == c), 1), tp / np.sum(yt == c)
        f.append((2 * pr * rc / (pr + rc) if pr + rc else 0.0, np.sum(yt == c)))
    assert m["f1"] == pytest.approx(sum(a * n for a, n in f) / len(yt))
    assert metrics.better("mae", 0.5, 0.7) and not metrics.better("ua", 0.5, 0.7)
    assert metrics.better("ua", 0.1, None) and not metrics.better("ua", float("nan"), None)


# ---- configs ---------------------------------------------------------------------------------------

def test_every_config_builds_and_ablations_differ_by_one_switch(data):
    names = list_configs()
    assert {"baseline", "baseline-aug", "mmin", "mmin-ae", "mmin-nocycle"} <= set(names)
    for n in names:
        cfg = load_config(n, "demo")
        assert cfg["method"] in available(), n
    mmin, ae = load_config("mmin"), load_config("mmin-ae")
    assert {k for k in mmin if mmin[k] != ae[k]} - {"name"} == {"model"}
    assert (mmin["loss"], mmin["train"]["optimizer"]["lr"], mmin["train"]["clip_grad_norm"]) == (
        {"ce": 1.0, "forward": 4.0, "cycle": 2.0}, 2e-4, 1.0)
    demo = load_config("mmin", "demo")
    assert demo["features"]["video"]["name"] == "fer-cnn" and demo["dataset_override"]["dataset"] == "demo"
    assert load_config("mmin", "msp-improv")["select"]["metric"] == "f1"
    assert load_config("baseline-aug")["train"]["missing"]["choices"][0] == "avt"
    with pytest.raises(ConfigError, match="unknown method config"):
        load_config("nope")


# ---- data module -----------------------------------------------------------------------------------

def test_collate_pads_and_marks_absent_modalities():
    seqs = {"a": [np.ones((3, 2)), np.ones((5, 2)) * 2], "v": [None, np.ones((2, 3))], "t": [np.ones((1, 4)), None]}
    d = MultimodalData.from_arrays(["u0", "u1"], [0, 1], seqs, labels=["x", "y"])
    b = d.collate([0, 1])
    assert b["x"]["a"].shape == (2, 5, 2) and not b["x"]["a"][0, 3:].any()
    assert b["lengths"]["a"].tolist() == [3, 5]
    assert b["lengths"]["v"].tolist() == [1, 2]  # absent = one zero frame
    assert not b["x"]["v"][0].any() and b["frame_mask"]["v"][0].tolist() == [False, False]
    assert b["natural"].tolist() == [[True, False, True], [True, True, False]]
    assert b["ids"] == ["u0", "u1"]


def test_fixed_lengths_pad_to_the_cap_or_to_the_corpus_longest():
    seqs = {"a": [np.ones((3, 2)), np.ones((9, 2))], "v": [np.ones((2, 3)), np.ones((4, 3))],
            "t": [np.ones((1, 4)), None]}
    d = MultimodalData.from_arrays(["u0", "u1"], [0, 1], seqs, labels=["x", "y"],
                                   max_len={"a": 6, "v": 10, "t": 5}, fixed_len=True)
    for rows in ([0], [1], [0, 1]):  # one layout whatever the batch holds
        b = d.collate(rows)
        # a: cut at the cap 6; v and t: every sample is shorter than the cap, so the corpus's longest
        assert [b["x"][m].shape[1] for m in "avt"] == [6, 4, 1]
    assert d.padding_fraction([np.array([0])])["v"] == 0.5
    d.fixed_len = False
    assert d.collate([0])["x"]["a"].shape[1] == 3


def test_invalid_frames_are_dropped_or_zeroed():
    seq = np.arange(8, dtype=np.float32).reshape(4, 2) + 1
    mask = np.array([True, False, True, False])
    for mode, length in (("drop", 2), ("zero", 4)):
        d = MultimodalData.from_arrays(["u"], [0], {"a": [seq], "v": [seq], "t": [seq]}, labels=["x"],
                                       masks={"v": [mask]}, invalid_frames=mode)
        assert d.seqs["v"].lengths[0] == length
    none = MultimodalData.from_arrays(["u"], [0], {"a": [seq], "v": [seq], "t": [seq]}, labels=["x"],
                                      masks={"v": [np.zeros(4, bool)]})
    assert not none.natural[0, 1]  # no valid frame at all = modality absent


def test_from_stores_reads_feature_stores(tmp_path):
    from extract.base import Failure, Output
    from manifests.schema import Manifest, Utterance
    from pipeline.store import FeatureStore

    rng = np.random.default_rng(0)
    ids = [f"u{i}" for i in range(5)]
    stores = {}
    for mod, dim in (("audio", 3), ("video", 2), ("text", 4)):
        st = FeatureStore.open_or_create(tmp_path / mod, dim=dim, attrs={"key": f"{mod}-k", "modality": mod})
        batch = {}
        for i, u in enumerate(ids):
            if mod == "video" and i == 1:
                batch[u] = (Failure("no face"), "f")
            elif mod == "text" and i == 2:
                continue  # absent from the store
            else:
                x = rng.normal(size=(i + 2, dim)).astype(np.float32)
                mk = np.ones(i + 2, bool)
                if mod == "video":
                    mk[0] = False
                batch[u] = (Output(x, mk), "f")
        st.commit(batch)
        stores[mod] = st
    man = Manifest([Utterance(u, label="x", label_index=i % 2) for i, u in enumerate(ids)] +
                   [Utterance("unlabelled")], dataset="t", labels=["x", "y"])
    with pytest.warns(UserWarning, match="without a label"):
        mem = MultimodalData.from_stores(man, stores)
    with pytest.warns(UserWarning):
        lazy = MultimodalData.from_stores(man, stores, memory_budget=0)
    assert not lazy.seqs["a"].in_memory and mem.seqs["a"].in_memory
    assert mem.natural.tolist() == lazy.natural.tolist()
    assert mem.natural[:, 1].tolist() == [True, False, True, True, True]
    assert mem.natural[:, 2].tolist() == [True, True, False, True, True]
    assert mem.seqs["v"].lengths[3] == 4  # 5 frames, the invalid first one dropped
    for m in C.MODALITIES:
        for i in range(5):
            assert np.array_equal(mem.seqs[m].seq(i), lazy.seqs[m].seq(i))
    assert np.array_equal(mem.seqs["a"].seq(4), stores["audio"]["u4"])
    assert mem.signature == lazy.signature and mem.labels == ["x", "y"]


def test_frozen_teacher_stays_in_eval_mode_and_untrainable(data):
    """Method.freeze: train() leaves the teacher in eval mode (its dropout off) and it has no
    trainable parameter, while the student trains."""
    m, _ = _mmin(data)
    m.train()
    assert m.encoders.training and not m.teacher.training
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.encoders.parameters())
    assert not any(p is q for p in m.trainable_parameters() for q in m.teacher.parameters())
