"""EMMR: recovery of the missing slice, the key-missing check and its branch, the pair weights,
the attention fusion, the frozen teacher on the complete sample, the symmetric KL, the
vectorised branch against a per-sample loop, and bench/emmr_check.py on a tiny run (the loss
terms against the paper's equations: tests/test_emmr_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.conditions import MODALITIES, apply_availability, availability
from train.config import load_config
from train.methods import build
from train.methods.emmr import EMMR, EMMRTeacher
from train.methods.emmr_nets import ORDER, Fusion, key_representation, pair_weights, sym_kl
from train.synthetic import synthetic_data

TINY = {"model.encoder": {"dim": 16, "heads": 2, "dropout": 0.0}, "model.tf": {"ffn": 16},
        "model.ae": {"layers": [12, 8, 4]}, "model.cra": {"layers": [12, 8, 4], "blocks": 2}}
LENS = {"a": 12, "v": 6, "t": 5}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(name="emmr", **extra):
    """``extra``: model switches by bare name (fusion="max") or any dotted key."""
    return load_config(name, None, {**TINY, **{k if "." in k else f"model.{k}": v for k, v in extra.items()}})


@pytest.fixture(scope="module")
def data():
    d = synthetic_data(n=64, dims={"a": 5, "v": 4, "t": 6}, seed=2)
    d.max_len, d.fixed_len = dict(LENS), True
    return d


def model(data, seed=0, **extra) -> EMMR:
    torch.manual_seed(seed + 100)
    teacher = build(tiny_cfg("emmr-teacher"), data.spec)
    torch.manual_seed(seed)
    m = build(tiny_cfg(**extra), data.spec)
    m.attach({"teacher": teacher})
    return m


def masked(data, conds, rows=None) -> dict:
    """A batch whose i-th sample keeps the modalities of conds[i % len(conds)]."""
    rows = np.arange(len(conds) if rows is None else rows)
    avail = np.stack([availability(conds[i % len(conds)]) for i in range(len(rows))])
    return apply_availability(data.collate(rows), avail)


def eval_batch(batch):
    b = dict(batch)
    b.pop("x_full")
    return b


MIXED = ["av", "at", "vt", "a", "t", "avt", "v", "at"]


_FIRED: dict = {}


def fired_model(data, **extra):
    """A model (and batch) where the check fires on some samples with one missing and not on
    others (eval mode; built once per setting)."""
    key = repr(sorted(extra.items()))
    if key not in _FIRED:
        _FIRED[key] = _find_fired(data, **extra)
    return _FIRED[key]


def _find_fired(data, **extra):
    for seed in range(40):
        m = model(data, seed, **extra).eval()
        b = masked(data, MIXED * 4)
        with torch.no_grad():
            p = m.forward_parts(eval_batch(b))
        f = p["fire"][p["check"]]
        if f.any() and not f.all():
            return m, b, p
    raise AssertionError("no seed gave both fired and unfired samples")


# ---- recovery -------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["a", "v", "t"])
def test_recovered_input_is_decoder_slice_for_the_missing_modality_and_x_elsewhere(data, missing):
    m = model(data).eval()
    keep = "".join(x for x in MODALITIES if x != missing)
    with torch.no_grad():
        p = m.forward_parts(eval_batch(masked(data, [keep] * 6)))
    sl = p["layout"].slices[ORDER.index(missing)]
    assert torch.equal(p["check"], torch.arange(6))  # every sample misses one modality
    for j, rec in p["check_recovered"].items():
        dec, x = p["check_dec"][j], p["x"]
        assert torch.equal(rec[:, sl], dec[:, sl]), j
        assert not torch.equal(dec[:, sl], x[:, sl])  # the decoder really changed it
        for other in ORDER:
            if other != missing:
                s2 = p["layout"].slices[ORDER.index(other)]
                assert torch.equal(rec[:, s2], x[:, s2]), (j, other)
    assert set(p["check_recovered"]) == {"tf", "ae", "cra"}
    assert torch.equal(p["check_recovered"]["tf"], p["recovered"]["tf"])


def test_a_fully_missing_modality_gives_finite_outputs(data):
    m = model(data).eval()
    for cond in ("a", "v", "t", "av"):
        with torch.no_grad():
            out = m.predict(eval_batch(masked(data, [cond] * 4)))
        assert torch.isfinite(out).all(), cond


# ---- the key-missing check and its branch ---------------------------------------------------------

def test_check_fires_exactly_when_the_argmaxes_differ(data):
    m, b, p = fired_model(data)
    n_avail = b["present"].sum(1)
    assert torch.equal(p["check"], ((n_avail >= 1) & (n_avail < 3)).nonzero().squeeze(1))
    differ = p["l_full"].argmax(-1) != p["l_avail"].argmax(-1)
    expect = torch.zeros_like(p["fire"])
    expect[p["check"]] = differ[p["check"]]
    assert torch.equal(p["fire"], expect)
    assert not p["fire"][n_avail == 3].any()  # a complete sample has nothing to recover


def test_unfired_output_is_the_encoder_branch_bit_for_bit_and_fired_the_ensemble(data):
    m, b, p = fired_model(data)
    keep = ~p["fire"]
    assert torch.equal(p["out"][keep], p["out_f"][keep])
    with torch.no_grad():
        ens = m.key_classifier(m.fusion(p["e_key"]))
    assert torch.equal(p["out"][p["idx"]], ens)
    assert not torch.allclose(p["out"][p["idx"]], p["out_f"][p["idx"]])


def test_without_the_ensemble_every_output_is_the_encoder_branch(data):
    m = model(data, reconstructors=["tf"], ensemble=False).eval()
    with torch.no_grad():
        p = m.forward_parts(eval_batch(masked(data, MIXED)))
    assert "fire" not in p and p["out"] is p["out_f"] and not hasattr(m, "judge")


# ---- pair weights and fusion ---------------------------------------------------------------------

def test_pair_weights_sum_to_one_and_come_from_probabilities():
    # pair 0 has the larger raw logit, pair 1 the larger maximum probability
    logits = torch.tensor([[[5.0, 4.9, 4.8], [2.0, -3.0, -3.0], [0.0, 0.0, 0.0]]])
    w = pair_weights(logits)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    probs = torch.softmax(logits, -1).amax(-1)
    assert torch.allclose(w, torch.softmax(probs, -1))
    assert w[0, 1] > w[0, 0]  # from raw logits (softmax of 5.0 vs 2.0) pair 0 would win
    assert not torch.allclose(w, torch.softmax(logits.amax(-1), -1))
    e = key_representation(logits)
    assert torch.allclose(e, (w[..., None] * logits).flatten(-2))


def test_model_key_representation_uses_the_pair_weights(data):
    m, b, p = fired_model(data)
    w = pair_weights(p["pair_logits"])
    assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
    assert torch.allclose(p["e_key"], (w[..., None] * p["pair_logits"]).flatten(-2))


def test_zero_attention_weights_give_the_mean_of_the_reconstructors():
    h = torch.randn(4, 3, 6)
    f = Fusion(6)
    with torch.no_grad():
        f.w.zero_()
    assert torch.allclose(f(h), h.mean(1), atol=1e-6)
    with torch.no_grad():
        f.w.normal_()
    beta = torch.softmax(torch.tanh(h) @ f.w, -1)
    assert torch.allclose(f(h), (beta[..., None] * h).sum(1), atol=1e-6)
    assert torch.allclose(Fusion(6, "max")(h), h.amax(1)) and torch.allclose(Fusion(6, "average")(h), h.mean(1))


# ---- the teacher ---------------------------------------------------------------------------------

def test_teacher_is_frozen_unchanged_by_a_step_and_reads_the_complete_sample(data):
    m = model(data).train()
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(not p.requires_grad or not any(p is q for q in m.teacher.parameters()) for p in m.trainable_parameters())
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    seen = {}
    hooks = [m.teacher.proj[x].register_forward_hook(lambda mod, inp, out, x=x: seen.__setitem__(x, inp[0].clone()))
             for x in ORDER]
    b = masked(data, ["vt", "at", "av", "t"] * 4)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=1e-2)
    loss, parts = m.loss(b)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for h in hooks:
        h.remove()
    for x in ORDER:
        assert torch.equal(seen[x], b["x_full"][x]), x
    assert not torch.equal(seen["a"], b["x"]["a"])  # audio was masked in some samples
    assert all(torch.equal(before[k], v) for k, v in m.teacher.state_dict().items())
    assert any(not torch.equal(student[k], v) for k, v in m.encoder.state_dict().items())
    assert m.teacher.training is False


def test_teacher_weights_come_from_the_prerequisite_and_loss_needs_them(data):
    torch.manual_seed(5)
    t = build(tiny_cfg("emmr-teacher"), data.spec)
    assert isinstance(t, EMMRTeacher)
    m = build(tiny_cfg(), data.spec)
    with pytest.raises(RuntimeError, match="never loaded"):
        m.loss(masked(data, ["at"] * 4))
    m.attach({"teacher": t})
    assert all(torch.equal(v, t.encoder.state_dict()[k]) for k, v in m.teacher.state_dict().items())
    assert not all(torch.equal(v, t.encoder.state_dict()[k]) for k, v in m.encoder.state_dict().items())
    m2 = build(tiny_cfg(student_init="teacher"), data.spec)
    m2.attach({"teacher": t})
    assert all(torch.equal(v, t.encoder.state_dict()[k]) for k, v in m2.encoder.state_dict().items())


# ---- losses --------------------------------------------------------------------------------------

def test_symmetric_kl_is_zero_on_identical_inputs_and_matches_a_hand_computation():
    a = torch.randn(2, 3, 4)
    assert sym_kl(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    x, y = [0.5, -1.0, 2.0], [1.5, 0.0, -0.5]
    p = [math.exp(v) / sum(math.exp(u) for u in x) for v in x]
    q = [math.exp(v) / sum(math.exp(u) for u in y) for v in y]
    hand = 0.5 * (sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) + sum(qi * math.log(qi / pi) for pi, qi in zip(p, q)))
    got = sym_kl(torch.tensor([[x, x]]), torch.tensor([[y, x]]), torch.tensor([[True, False]]))
    assert got.item() == pytest.approx(hand, rel=1e-5)  # the second frame is masked out
    assert sym_kl(torch.tensor([[x, x]]), torch.tensor([[y, x]])).item() == pytest.approx(hand / 2, rel=1e-5)


def test_loss_terms_are_the_weighted_kls_against_teacher_and_recovery_targets(data):
    m, b, _ = fired_model(data, **{"loss.forward": 0.3, "loss.backward": 0.7})  # eval mode: no dropout
    _, parts = m.loss(b)
    p = m.forward_parts(b)
    assert p["fire"].any()  # the CE reads the ensemble's outputs too
    frames = torch.cat([b["frame_mask_full"][x] for x in ORDER], 1)  # frames the complete sample has
    with torch.no_grad():
        pre = torch.cat([m.teacher(b["x_full"], {x: b["frame_mask_full"][x] for x in ORDER})[x] for x in ORDER], 1)
        full = torch.cat([m.encoder(b["x_full"], {x: b["frame_mask_full"][x] for x in ORDER})[x] for x in ORDER], 1)
    assert parts["forward"].item() == pytest.approx(0.3 * sym_kl(p["f"], pre, frames).item(), rel=1e-5)
    target = torch.where(p["missing"][..., None], full, p["x"])
    assert not torch.equal(target, p["x"])  # the missing slices' target is the real modality's encoding
    rows = p["check"]
    assert 0 < len(rows) < len(b["y"])
    terms = [sym_kl(p["dec"]["tf"], target, frames)]  # the backbone on every sample
    terms += [sym_kl(p["check_dec"][j], target[rows], frames[rows]) for j in ("ae", "cra")]  # the others where they ran
    bwd = torch.stack(terms).mean()
    assert parts["backward"].item() == pytest.approx(0.7 * bwd.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(p["out"], b["y"]).item(), rel=1e-5)


# ---- vectorised branch vs a per-sample loop -------------------------------------------------------

def _row(batch, i):
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[i:i + 1]
        elif isinstance(v, dict):
            out[k] = {kk: vv[i:i + 1] for kk, vv in v.items()}
        else:
            out[k] = v[i:i + 1]
    return out


@pytest.mark.parametrize("fusion", ["attention", "max"])
def test_vectorised_branch_equals_a_per_sample_loop(data, fusion):
    m, b, p = fired_model(data, fusion=fusion)
    b = eval_batch(b)
    with torch.no_grad():
        for i in range(len(b["y"])):
            q = m.forward_parts(_row(b, i))
            assert bool(q["fire"][0]) == bool(p["fire"][i]), i
            assert torch.allclose(q["out"][0], p["out"][i], atol=1e-5, rtol=1e-5), i


# ---- end to end: the runner trains the teacher first and EMMR freezes it ----------------------------

def test_run_trains_the_teacher_then_emmr_under_both_protocols(tmp_path):
    from train.run import run_experiment
    from train.synthetic import synthetic_folds
    from train.trainer import load_checkpoint

    d = synthetic_data(n=45, dims={"a": 5, "v": 4, "t": 6}, seed=0)
    d.max_len, d.fixed_len = dict(LENS), True
    folds = synthetic_folds(d, 1)
    quick = {"train.epochs": 1, "train.batch_size": 16}
    cfg = tiny_cfg(**quick, **{"eval.conditions": ["a", "avt", "eta=0.2", "eta=0.5"]})
    run = run_experiment(d, folds, cfg, dataset="synth", seeds=[0], results_dir=tmp_path, progress=False,
                         prereq_overrides={"emmr-teacher": {**TINY, **quick}}, log=lambda *a: None)
    pre, _, _ = load_checkpoint(next(run.glob("prereq/emmr-teacher/*/seed0/best.pt")))
    m, _, _ = load_checkpoint(next(run.glob("folds/*/seed0/best.pt")))
    assert isinstance(m, EMMR) and bool(m.inherited)
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(m.teacher.state_dict()[k], v)
    table = (run / "table.md").read_text()
    assert "eta" in table.lower() and "{a}" in table

    # bench/emmr_check.py on this run: the run's own evaluator, so the run's test outputs come back
    from bench.emmr_check import check_outputs, markdown, run_check

    res = run_check(run, data=d, folds=folds, log=lambda *a: None)
    assert res["max_abs_diff_vs_predictions"] < 1e-6
    by_col = {r["column"]: r for r in res["rows"]}
    assert set(by_col) == {"a", "avt", "eta=0.2", "eta=0.5"}
    n = len(folds[0].test)
    assert by_col["avt"]["checked"] == by_col["avt"]["fired"] == 0 and by_col["a"]["checked"] == n
    assert by_col["eta=0.5"]["checked"] == round(0.5 * n) and by_col["eta=0.2"]["checked"] == round(0.2 * n)
    _, norm, _ = load_checkpoint(next(run.glob("folds/*/seed0/best.pt")))
    r = check_outputs(m, d, d.indices(folds[0].test), ["a"], norm, 256, 0)["a"]
    assert np.array_equal(r["out"][~r["fired"]], r["out_f"][~r["fired"]])
    f = r["fired"]
    assert by_col["a"]["fired"] == f.sum() and by_col["a"]["ens_right"] == (r["out"][f].argmax(1) == r["y"][f]).sum()
    assert by_col["a"]["f_right"] == (r["out_f"][f].argmax(1) == r["y"][f]).sum()
    assert "| eta=0.5 |" in markdown(res)
