"""IMDer: the VE SDE, score matching and samplers on a Gaussian toy whose score is known, and the
method's mechanisms (any width and length, available modalities untouched, the condition steers
the recovery, frozen projections, reproducible evaluation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.conditions import MODALITIES, apply_availability
from train.data import DataSpec
from train.diffusion import VESDE, dsm_loss, sample, sampler_evals
from train.methods import build

SDE = VESDE(25.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

MU, S = 0.5, 0.5  # the toy data: every element ~ N(MU, S^2)


def gaussian_score(x, t):
    """Exact score of the toy data diffused to time t: N(MU, S^2 + std_t^2)."""
    var = S ** 2 + SDE.marginal_std(t).view(-1, *([1] * (x.dim() - 1))) ** 2
    return -(x - MU) / var


def _draw(cfg, n=20000, seed=0):
    torch.manual_seed(seed)
    return sample(gaussian_score, (n, 1), SDE, cfg)


def test_marginal_std_of_the_ve_sde():
    assert float(SDE.marginal_std(1.0)) == pytest.approx(9.845, abs=1e-3)
    stds = SDE.marginal_std(torch.tensor([1e-1, 1e-2, 1e-3, 1e-5]))
    assert bool((stds[1:] < stds[:-1]).all())
    assert float(stds[-1]) == pytest.approx(math.sqrt(1e-5), rel=1e-3)  # ~ sqrt(t) -> 0 as t -> 0
    t = torch.tensor([0.01, 0.3, 0.9])
    assert torch.allclose(SDE.time_of_std(SDE.marginal_std(t)), t, atol=1e-5)


def test_euler_maruyama_recovers_the_gaussian_and_converges():
    err = {}
    for steps in (10, 20, 100):
        x = _draw({"kind": "em", "steps": steps})
        err[steps] = abs(float(x.mean()) - MU) + abs(float(x.std()) - S)
    assert err[100] < 0.03               # mean and std of the target
    assert err[100] < err[20] < err[10]  # and the error shrinks with the steps


def test_em_steps_end_at_t_end_not_past_it():
    seen = []

    def spy(x, t):
        seen.append(float(t[0]))
        return gaussian_score(x, t)

    sample(spy, (4, 1), SDE, {"kind": "em", "steps": 10, "t_end": 1e-3})
    assert len(seen) == 10 == sampler_evals({"kind": "em", "steps": 10})
    # the left ends of 10 equal steps from 1 to 1e-3: the last step lands on t_end
    assert seen == pytest.approx(np.linspace(1.0, 1e-3, 11)[:-1].tolist(), abs=1e-6)


@pytest.mark.parametrize("kind", ["dpm2", "heun"])
def test_fast_samplers_agree_with_euler_maruyama(kind):
    em = _draw({"kind": "em", "steps": 100})
    fast = _draw({"kind": kind, "steps": 10 if kind == "heun" else 5})
    # the probability-flow ODE maps the N(0, std(1)^2) prior, whose mean is not MU, a little off
    # (by MU * S / std(1) ~ 0.025 on the mean): the tolerance allows for that, not more
    assert abs(float(fast.mean()) - float(em.mean())) < 0.05
    assert abs(float(fast.std()) - float(em.std())) < 0.05
    assert sampler_evals({"kind": kind, "steps": 5}) == 10


def test_denoising_loss_is_lowest_for_the_true_score():
    torch.manual_seed(0)
    x0 = MU + S * torch.randn(4096, 3)

    def loss(fn):
        torch.manual_seed(1)  # the same t and z for every candidate
        return float(dsm_loss(fn, x0, SDE))

    true = loss(gaussian_score)
    # its value is known: per element E_t[S^2 / (S^2 + std_t^2)] (the part of z no score can explain)
    t = torch.linspace(1e-5, 1, 20001)
    assert true == pytest.approx(3 * float((S ** 2 / (S ** 2 + SDE.marginal_std(t) ** 2)).mean()), rel=0.05)
    assert true < loss(lambda x, t: 1.2 * gaussian_score(x, t))
    assert true < loss(lambda x, t: gaussian_score(x - 0.3, t))
    assert true < loss(lambda x, t: torch.zeros_like(x))


# ---- the method ------------------------------------------------------------------------------------

def _cfg(method="imder", **recovery):
    return {"method": method, "model": {
        "proj": {"d": 20, "kernel": 3}, "backbone": {"heads": 4, "levels": 1, "mem_layers": 1},
        "score": {"channels": [8, 16, 16], "embed_dim": 16, "heads": 2, "attn_layers": 1},
        "refine": {"blocks": 1, "reduction": 4}, "recovery": {"score": True, "refine": True, **recovery},
        "sampler": {"train": {"kind": "em", "steps": 2}, "val": {"kind": "em", "steps": 2},
                    "test": {"kind": "em", "steps": 3}}}}


SPEC = DataSpec({"a": 7, "v": 5, "t": 9}, "regression", None)
AVAIL = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]], bool)


def _batch(T, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    B = len(AVAIL)
    Ts = lengths or {m: T for m in MODALITIES}
    x = {m: torch.randn(B, Ts[m], SPEC.dims[m], generator=g) for m in MODALITIES}
    batch = {"x": x, "frame_mask": {m: torch.ones(B, Ts[m], dtype=torch.bool) for m in MODALITIES},
             "natural": torch.ones(B, 3, dtype=torch.bool), "y": torch.randn(B, generator=g),
             "lengths": {m: torch.full((B,), Ts[m]) for m in MODALITIES}}
    return apply_availability(batch, AVAIL)


def _model(**recovery):
    torch.manual_seed(0)
    m = build(_cfg(**recovery), SPEC)
    m.inherited.fill_(True)
    return m


@pytest.mark.parametrize("T", [40, 64])
def test_runs_for_any_width_and_length(T):
    m = _model()
    b = _batch(T)
    assert m.predict(b).shape == (len(AVAIL), 1)
    loss, parts = m.loss(b)
    loss.backward()
    assert set(parts) == {"task", "score", "rec"} and all(torch.isfinite(v) for v in parts.values())
    # modalities of different lengths share no step axis for the frame-wise condition: refused
    with pytest.raises(ValueError, match="aligned source or set data.resample_to"):
        m.predict(_batch(0, lengths={"a": 23, "v": 9, "t": 40}))


def test_available_modalities_pass_through_and_missing_ones_are_recovered():
    m = _model().eval()
    b = _batch(40)
    feats, valid = m.features(b["x"], b)
    with torch.no_grad():
        out, ok, _, _ = m.complete(feats, valid, b["present"], "test")
    for i, k in enumerate(MODALITIES):
        keep = b["present"][:, i]
        assert torch.equal(out[k][keep], feats[k][keep]) and torch.equal(ok[k][keep], valid[k][keep])
        assert not torch.equal(out[k][~keep], feats[k][~keep])  # zeros replaced by a recovery
        assert not valid[k][~keep].any() and ok[k][~keep].all()  # the recovery is a complete sequence


def test_the_condition_steers_the_recovery():
    m = _model().eval()
    b = _batch(40)
    feats, valid = m.features(b["x"], b)
    cond, _ = m.condition(feats, valid, b["present"], "a")
    with torch.no_grad():
        torch.manual_seed(5)
        r1 = m.draw("a", cond, "test")
        torch.manual_seed(5)
        r1b = m.draw("a", cond, "test")
        torch.manual_seed(5)
        r2 = m.draw("a", cond + 1.0, "test")
    assert torch.equal(r1, r1b)                  # same noise, same condition: same recovery
    assert (r1 - r2).abs().mean() > 1e-3         # another condition: another recovery


def _raw(T, seed):
    """An unmasked batch of T frames, with random frame masks and lengths (before availability)."""
    g = torch.Generator().manual_seed(seed)
    B = len(AVAIL)
    fm = {m: torch.rand(B, T, generator=g) < 0.8 for m in MODALITIES}
    x = {m: torch.randn(B, T, SPEC.dims[m], generator=g) * fm[m][..., None] for m in MODALITIES}
    return {"x": x, "frame_mask": fm, "natural": torch.ones(B, 3, dtype=torch.bool), "y": torch.randn(B, generator=g),
            "lengths": {m: torch.full((B,), T) for m in MODALITIES}}


def _replaced(raw, m, rows, length, seed):
    """``raw`` with modality ``m`` of ``rows`` replaced: other frames, ``length`` valid ones."""
    g = torch.Generator().manual_seed(seed)
    b = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    x, fm, ln = b["x"][m].clone(), b["frame_mask"][m].clone(), b["lengths"][m].clone()
    T = x.shape[1]
    fm[rows] = torch.arange(T)[None] < length
    x[rows] = torch.randn(x[rows].shape, generator=g) * 30 * fm[rows][..., None]
    ln[rows] = length
    b["x"][m], b["frame_mask"][m], b["lengths"][m] = x, fm, ln
    return b


@pytest.mark.parametrize("m", MODALITIES)
def test_a_masked_modality_reaches_no_prediction(m):
    """Its frames, its true length (1 or all 500 frames) and its frame mask change nothing: the
    backbone reads the masked frame mask, and the recovered sequence is valid where its condition
    is; ``x_full`` & co. stay in the batch (the evaluator removes them; predict must not need that)."""
    model = _model().eval()
    raw = _raw(500, seed=1)
    avail = np.ones((len(AVAIL), 3), bool)
    rows = np.array([True, True, True, False, False, False])
    avail[rows, MODALITIES.index(m)] = False

    def predict(b):
        torch.manual_seed(0)  # the sampler's noise
        with torch.no_grad():
            return model.predict(dict(apply_availability(b, avail), phase="test"))

    ref = predict(raw)
    for length, seed in ((1, 2), (500, 3)):
        assert torch.equal(predict(_replaced(raw, m, torch.as_tensor(rows), length, seed)), ref), (m, length)
    # the modality matters where it is present (so the test can fail)
    assert not torch.equal(predict(_replaced(raw, m, torch.as_tensor(~rows), 500, 4)), ref)


def test_an_aligned_source_keeps_every_step_in_place(tmp_path):
    """MMSA aligned_50: text has L < 50 valid tokens, audio and video 50 steps. A batch keeps the
    50 positions of every modality: audio, video and text step k all come from stored position k
    (text padding zeroed and invalid, not dropped and the rest stretched)."""
    from fixtures_corpora import make_mmsa

    from manifests.datasets import load_manifest
    from manifests.importers import open_imported
    from manifests.importers.mmsa import import_mmsa
    from train.config import load_config
    from train.data import DataError, MultimodalData, Normalizer
    from train.run import build_data

    pkl = tmp_path / "aligned_50.pkl"
    raw = make_mmsa(pkl, "mosi", aligned=True, sizes=(4, 2, 2))
    name, _ = import_mmsa(pkl, dataset="t-imder-steps")
    cfg = load_config("imder", name)
    assert cfg["data"]["resample_to"] == 50 and cfg["data"].get("invalid_frames", "drop") == "drop"
    manifest, stores = load_manifest(name), open_imported(name)
    stored = {s: {i.replace("$_$", "_"): k for k, i in enumerate(raw[s]["id"])} for s in raw}
    for data in (build_data(manifest, stores, cfg),  # in memory, and read per batch:
                 MultimodalData.from_stores(manifest, stores, memory_budget=0, resample_to=50)):
        assert data.aligned and data.steps == 50
        b = data.collate(np.arange(len(data)))
        for row, uid in enumerate(b["ids"]):
            split = next(s for s in stored if uid in stored[s])
            d, i = raw[split], stored[split][uid]
            tok = d["text_bert"][i][1] > 0
            assert 5 <= tok.sum() < 50
            audio = np.where(np.isfinite(d["audio"][i]), d["audio"][i], 0)
            for k in range(50):  # step k of every modality is stored position k
                np.testing.assert_array_equal(b["x"]["a"][row, k].numpy(), audio[k])
                np.testing.assert_array_equal(b["x"]["v"][row, k].numpy(), d["vision"][i][k])
                np.testing.assert_array_equal(b["x"]["t"][row, k].numpy(), d["text"][i][k] if tok[k] else 0 * d["text"][i][k])
            assert b["frame_mask"]["t"][row].numpy().tolist() == tok.tolist()
            assert (int(b["lengths"]["t"][row]), int(b["lengths"]["a"][row])) == (tok.sum(), 50)  # up to the last valid step
            assert bool(b["frame_mask"]["a"][row].all() and b["frame_mask"]["v"][row].all())
        # statistics from valid positions only: the padding's zeros are no text frames
        norm = Normalizer.fit(data, np.arange(len(data)), ["t"])
        frames = np.concatenate([raw[s]["text"][i][raw[s]["text_bert"][i][1] > 0] for s in raw for i in range(len(raw[s]["id"]))])
        np.testing.assert_allclose(norm.mean["t"], frames.mean(0), rtol=1e-4, atol=1e-5)
    # resample_to other than the stored step count would stretch the source: refused
    with pytest.raises(DataError, match="aligned source of 50 steps"):
        build_data(manifest, stores, {**cfg, "data": {**cfg["data"], "resample_to": 16}})
    # an unaligned source is unchanged: padding dropped, sequences resampled
    upkl = tmp_path / "unaligned_50.pkl"
    make_mmsa(upkl, "mosi", aligned=False, sizes=(2, 1, 1))
    uname, _ = import_mmsa(upkl, dataset="t-imder-unaligned")
    assert not build_data(load_manifest(uname), open_imported(uname), cfg).aligned


def test_frozen_projections_get_no_gradient_and_the_rest_learns():
    m = _model()
    m.train()
    loss, _ = m.loss(_batch(40))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.proj.parameters())
    assert not m.proj.training  # frozen parts stay in eval mode
    for part in ("backbone", "score", "refine", "cond_fuse"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(m, part).parameters()), part


@pytest.mark.parametrize("recovery,parts", [({"refine": False}, {"task", "score"}),
                                            ({"score": False}, {"task", "rec"}),
                                            ({"score": False, "refine": False}, {"task"})])
def test_ablations_drop_their_part(recovery, parts):
    m = _model(**recovery)
    loss, got = m.loss(_batch(40))
    assert set(got) == parts
    assert (m.score is None) == (not recovery.get("score", True))
    assert (m.refine is None) == (not recovery.get("refine", True))


# ---- end to end: the prerequisite, inheritance, the missing-rate protocol, seeded evaluation ----------

TINY = {"model.proj": {"d": 12, "kernel": 3}, "model.backbone.levels": 1, "model.backbone.heads": 4,
        "train.epochs": 2, "train.batch_size": 8, "data.resample_to": None,  # aligned: kept at 50 steps ...
        "data.max_len": {"a": 12, "v": 12, "t": 12},  # ... of which the first 12 (a cut keeps positions)
        "eval.conditions": ["mr=0.0", "mr=0.3", "mr=0.6"]}
TINY_IMDER = {**TINY, "model.score": _cfg()["model"]["score"], "model.refine": {"blocks": 1},
              "model.sampler": _cfg()["model"]["sampler"], "select.conditions": ["mr=0.3"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """imder (and its prerequisite) trained for 2 epochs on a tiny MMSA aligned_50 MOSI pickle,
    imported as the MOSI recipe's users would (regression on the sentiment value)."""
    from fixtures_corpora import make_mmsa

    from manifests.datasets import load_folds, load_manifest
    from manifests.importers import open_imported
    from manifests.importers.mmsa import import_mmsa
    from train.config import load_config
    from train.run import build_data, train_method

    root = tmp_path_factory.mktemp("imder")
    pkl = root / "MOSI/Processed/aligned_50.pkl"
    make_mmsa(pkl, "mosi", aligned=True, sizes=(10, 5, 5))
    name, _ = import_mmsa(pkl, dataset="t-imder-mosi")
    run = train_method(name, "imder", seeds=[0], device="cpu", results_dir=root / "results", overrides=TINY_IMDER,
                       prereq_overrides={"imder-pretrain": TINY}, progress=False, log=lambda *a: None)
    data = build_data(load_manifest(name), open_imported(name), load_config("imder", name, TINY_IMDER))
    return data, load_folds(name)[1][0], run


def test_trains_on_its_prerequisite_under_the_missing_rate_protocol(trained):
    import json

    from train.trainer import load_checkpoint

    data, fold, run = trained
    res = json.loads(next(run.glob("folds/*/seed0/result.json")).read_text())
    assert set(res["test"]) == {"mr=0", "mr=0.3", "mr=0.6"} and res["select_metric"] == "loss"
    assert {"acc2", "acc2_has0", "f1", "acc7", "mae", "corr"} <= set(res["test"]["mr=0.6"])  # regression
    assert {"task", "score", "rec"} <= set(res["history"][0])
    pre, _, _ = load_checkpoint(next(run.glob("prereq/imder-pretrain/*/seed0/best.pt")))
    first = json.loads(next(run.glob("prereq/imder-pretrain/*/seed0/history.json")).read_text())
    assert "score" not in first[0]  # the prerequisite trains the task loss on complete data only
    model, _, _ = load_checkpoint(next(run.glob("folds/*/seed0/best.pt")))
    # the frozen projections are the prerequisite's, unchanged by training
    for a, b in zip(model.proj.state_dict().values(), pre.proj.state_dict().values()):
        assert torch.equal(a, b)


def test_two_evaluations_give_identical_numbers(trained):
    from train.trainer import evaluate, load_checkpoint

    data, fold, run = trained
    model, norm, _ = load_checkpoint(next(run.glob("folds/*/seed0/best.pt")))
    idx = data.indices(fold.test)
    one = evaluate(model, data, idx, ["mr=0.6"], norm, seed=3)
    two = evaluate(model, data, idx, ["mr=0.6"], norm, seed=3)
    other = evaluate(model, data, idx, ["mr=0.6"], norm, seed=4)  # other masks and noise
    assert np.array_equal(one["mr=0.6"]["out"], two["mr=0.6"]["out"])
    assert not np.array_equal(one["mr=0.6"]["out"], other["mr=0.6"]["out"])
    # a column's draws do not depend on which other columns are evaluated with it (a comparison
    # evaluates 22 columns, a missing-rate run 8: the same model must score the same under MR 0.6)
    many = evaluate(model, data, idx, ["avt", "mr=0.3", "eta=0.2", "mr=0.6"], norm, seed=3)
    assert np.array_equal(one["mr=0.6"]["out"], many["mr=0.6"]["out"])


def test_configs_the_paper_and_its_ablations():
    from train.config import load_config

    imder, pre = load_config("imder"), load_config("imder-pretrain")
    assert imder["requires"] == {"pretrained": "imder-pretrain"}
    assert all(imder[k] == pre[k] for k in ("features", "data")) and imder["model"]["proj"] == pre["model"]["proj"]
    assert imder["model"]["backbone"] == pre["model"]["backbone"]
    assert (imder["model"]["sigma"], imder["loss"]["mmd"], imder["train"]["optimizer"]["lr"]) == (25.0, 0.1, 2e-3)
    assert imder["model"]["sampler"]["test"] == {"kind": "em", "steps": 100, "t_end": 1e-3}
    assert imder["train"]["missing"]["kind"] == "missing-rate" and imder["select"]["metric"] == "loss"
    for name, rec in (("imder-norefine", {"score": True, "refine": False}), ("imder-noscore", {"score": False, "refine": True}),
                      ("imder-norecovery", {"score": False, "refine": False})):
        abl = load_config(name)
        assert {k for k in imder if imder[k] != abl[k]} == {"name", "model"}
        assert {k for k in imder["model"] if imder["model"][k] != abl["model"][k]} == {"recovery"}
        assert abl["model"]["recovery"] == rec
