"""Seeds reach the jobs they name, checked from the outputs a run leaves on disk: a two-seed run
(``run_experiment``) and a two-seed comparison on dask (``compare``) must have trained and tested
each fold x seed under that seed. The test masks saved for seed 1 are the protocol's masks for
seed 1 (not seed 0's), the outputs saved under them are what the saved model gives on inputs
masked by them, seed 1's training differs from seed 0's, and seed 1 run alone gives the same
files: the same masks, ids and labels exactly, the same numbers to float rounding (``TOL``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train import protocols
from train.compare import compare
from train.conditions import apply_availability, without_truth
from train.config import load_config
from train.run import run_experiment
from train.synthetic import synthetic_data, synthetic_folds
from train.trainer import load_checkpoint

TINY = {"train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 8, "model.encoders.v.hidden": 8, "model.encoders.t.channels": 8}
DRAWN = ["mr=0.3", "mr=0.5", "eta=0.5"]  # seed-dependent test columns (fixed conditions are not)

# Rerunning a job reproduces its numbers to float rounding, not always bit for bit: once in about ten
# runs of the comparison below, a rerun's epoch-2 validation loss differed in the 5th digit (1.389490
# vs 1.389416; masks, epoch 1 and the selected weights identical). Seeds 0 and 1 differ by 0.06 in
# the history, 0.2 in the outputs and 0.7 in the weights.
TOL = {"rtol": 1e-3, "atol": 2e-3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=48, seed=3, absent=0.05)


def protocol_masks(data, col, ids, seed):
    """The protocol's masks of test rows ``ids``, asked for as the evaluator asks: with the rows'
    natural presence."""
    return protocols.masks(col, ids, seed, data.natural[data.indices(ids)])


def _files(job):
    z = np.load(job / "predictions.npz")
    hist = [{k: v for k, v in h.items() if not k.endswith("_s") and k != "samples_per_s"}
            for h in json.loads((job / "history.json").read_text())]
    return {k: z[k] for k in z.files}, hist, torch.load(job / "best.pt", weights_only=True)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _numbers(history) -> list[float]:
    """The history's numbers in order (the nested validation metrics included)."""
    out = []
    for h in history:
        for k in sorted(h):
            out += _numbers([h[k]]) if isinstance(h[k], dict) else [float(h[k])]
    return out


def _near(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.allclose(x, y, **TOL) if x.is_floating_point() else torch.equal(x, y)


def _close(a, b) -> bool:
    """Two jobs' files (``_files``) agree: masks, ids and labels exactly, numbers within ``TOL``."""
    (pa, ha, wa), (pb, hb, wb) = a, b
    exact = all(np.array_equal(pa[k], pb[k]) for k in pa if not k.endswith("_out"))
    outs = all(np.allclose(pa[k], pb[k], **TOL) for k in pa if k.endswith("_out"))
    hist = len(ha) == len(hb) and np.allclose(_numbers(ha), _numbers(hb), equal_nan=True, **TOL)
    weights = all(_near(wa[k], wb[k]) for k in wa)
    return pa.keys() == pb.keys() and wa.keys() == wb.keys() and exact and outs and hist and weights


def check_seed_outputs(data, jobs: dict[int, object], columns):
    """``jobs``: {seed: fold x seed folder} of one method and fold, seeds 0 and 1."""
    files = {s: _files(d) for s, d in jobs.items()}
    for s, d in jobs.items():
        res = json.loads((d / "result.json").read_text())
        assert res["seed"] == s
        preds = files[s][0]
        ids = [str(u) for u in preds["ids"]]
        for c in columns:
            want = protocol_masks(data, c, ids, s)
            assert np.array_equal(preds[f"{c}_avail"], want), (s, c)
            seen = want & data.natural[data.indices(ids)]
            assert res["realised"][c]["mr"] == pytest.approx(protocols.realised_rate(seen))
        # the outputs saved under a column are the model's on inputs masked by that seed's masks
        method, norm, _ = load_checkpoint(d / "best.pt")
        rows = data.indices(ids)
        batch = data.collate(rows, norm)
        for c in columns[:2]:
            b = without_truth(apply_availability(batch, protocol_masks(data, c, ids, s)))
            b["phase"] = "test"
            with torch.no_grad():
                out = method.predict(b).numpy()
            np.testing.assert_allclose(preds[f"{c}_out"], out, atol=1e-5)
    (p0, h0, w0), (p1, h1, w1) = files[0], files[1]
    assert np.array_equal(p0["ids"], p1["ids"])  # one fold, one test split
    for c in columns:
        assert not np.array_equal(p0[f"{c}_avail"], p1[f"{c}_avail"]), c
    assert not np.allclose(_numbers(h0), _numbers(h1), **TOL)  # trained under its own seed
    assert not all(_near(w0[k], w1[k]) for k in w0)
    return files


def test_a_two_seed_run_trains_and_tests_each_seed_with_its_seed(data, tmp_path, dask_scheduler):
    from pipeline.cluster import Cluster

    cfg = load_config("baseline-aug", "demo", {**TINY, "eval.conditions": ["avt", *DRAWN]})
    folds = synthetic_folds(data, 2)
    kw = dict(dataset="synth", fold_select="1", progress=False, log=lambda *_: None)
    both = run_experiment(data, folds, cfg, seeds=[0, 1], results_dir=tmp_path / "both", **kw)
    files = check_seed_outputs(data, {s: both / "folds" / "f1" / f"seed{s}" for s in (0, 1)}, DRAWN)
    # seed 1 alone, in another results folder (nothing to reuse): the same files
    alone = run_experiment(data, folds, cfg, seeds=[1], results_dir=tmp_path / "alone", **kw)
    assert _close(_files(alone / "folds" / "f1" / "seed1"), files[1])
    # the same two seeds as parallel tasks on dask workers: the same files, seed for seed
    with Cluster(2, dask_scheduler) as cluster:
        par = run_experiment(data, folds, cfg, seeds=[0, 1], results_dir=tmp_path / "dask", workers=2,
                             cluster=cluster, **kw)
    assert all(_close(_files(par / "folds" / "f1" / f"seed{s}"), files[s]) for s in (0, 1))


def test_a_two_seed_comparison_on_dask_gives_each_job_its_seed(data, tmp_path, dask_scheduler):
    folds = synthetic_folds(data, 2)
    kw = dict(overrides=TINY, folds="1", scheduler=dask_scheduler, data=data, fold_list=folds,
              progress=False, log=lambda *_: None)
    out = compare("demo", ["mmin"], seeds=[0, 1], results_dir=tmp_path / "both", **kw)
    assert json.loads((out / "compare.json").read_text())["failed"] == {}
    files = {}
    for m in ("baseline", "mmin"):  # baseline: mmin's prerequisite, a job of its own
        run = next((tmp_path / "both").glob(f"demo/{m}/compare-*"))
        files[m] = check_seed_outputs(data, {s: run / "folds" / "f1" / f"seed{s}" for s in (0, 1)}, DRAWN)
    # each mmin job built on the baseline job of its own seed
    mmin = next((tmp_path / "both").glob("demo/mmin/compare-*"))
    for s in (0, 1):
        pre = mmin / "prereq" / "baseline" / "f1" / f"seed{s}"
        assert json.loads((pre / "result.json").read_text())["seed"] == s
        assert _same_weights(torch.load(pre / "best.pt", weights_only=True)["model"], files["baseline"][s][2])
    # seed 1 alone: the same files
    compare("demo", ["mmin"], seeds=[1], results_dir=tmp_path / "alone", **kw)
    for m in ("baseline", "mmin"):
        assert _close(_files(next((tmp_path / "alone").glob(f"demo/{m}/compare-*")) / "folds" / "f1" / "seed1"),
                      files[m][1]), m


def test_each_seed_starts_from_the_weights_its_seed_draws(data, tmp_path):
    """With a learning rate of 0 the saved weights are the initial ones: seed s's are those the
    method is built with after ``torch.manual_seed(s)``."""
    from train.methods import build

    cfg = load_config("baseline", "demo", {**TINY, "train.optimizer.lr": 0.0, "eval.conditions": ["avt"]})
    run = run_experiment(data, synthetic_folds(data, 2), cfg, dataset="synth", fold_select="1", seeds=[0, 1],
                         results_dir=tmp_path, progress=False, log=lambda *_: None)
    saved = {s: torch.load(run / "folds" / "f1" / f"seed{s}" / "best.pt", weights_only=True)["model"] for s in (0, 1)}
    for s in (0, 1):
        torch.manual_seed(s)
        assert _same_weights(saved[s], build(cfg, data.spec).state_dict()), s
    assert not _same_weights(saved[0], saved[1])
