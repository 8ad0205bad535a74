"""Evaluation that shares per-modality encodings across conditions, and length bucketing: both
must leave the numbers as they were (exactness), while doing less work (encoder passes, padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import protocols as P
from train.config import load_config
from train.methods import build
from train.synthetic import synthetic_data
from train.trainer import evaluate, shares_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"model.encoders.a.hidden": 16, "model.encoders.v.hidden": 16, "model.encoders.t.channels": 16,
         "model.encoders.t.embed": 16, "model.classifier": [16]}
COLUMNS = [*P.expand("conditions"), "mr=0.3", "mr=0.7", "eta=0.3"]


@pytest.fixture(scope="module")
def data():
    # lengths that vary a lot, and some naturally absent modalities
    return synthetic_data(n=70, seed=3, absent=0.15, lengths={"a": (2, 60), "v": (1, 20), "t": (3, 25)})


def model(name, data):
    over = dict(SMALL)
    if name.startswith("if-mmin"):
        over["model.invariance.layers"] = [16]
    if name in ("mmin", "if-mmin"):
        over["model.imagination.layers"] = [32, 16]
    torch.manual_seed(0)
    m = build(load_config(name, None, over), data.spec)
    m.eval()
    return m


@pytest.mark.parametrize("name", ["baseline", "mmin", "if-mmin-pretrain", "if-mmin"])
def test_shared_encoding_equals_one_forward_per_condition(data, name):
    m = model(name, data)
    assert shares_encoders(m)
    idx = np.arange(5, 70)[::-1]  # an order that is not the length order
    shared = evaluate(m, data, idx, COLUMNS, batch_size=16, seed=1)
    plain = evaluate(m, data, idx, COLUMNS, batch_size=16, seed=1, share=False)
    for c in COLUMNS:
        np.testing.assert_array_equal(shared[c]["index"], idx)  # rows come back in the caller's order
        np.testing.assert_array_equal(shared[c]["y"], data.y[idx])
        np.testing.assert_array_equal(shared[c]["avail"], plain[c]["avail"])
        scale = float(np.abs(plain[c]["out"]).max())  # float rounding only: other batch-mates, other sums
        np.testing.assert_allclose(shared[c]["out"], plain[c]["out"], rtol=0, atol=2e-6 * scale, err_msg=c)


def test_encoders_run_twice_per_batch_whatever_the_number_of_conditions(data):
    m = model("mmin", data)
    calls = []
    m.encoders.register_forward_hook(lambda *_: calls.append(1))
    evaluate(m, data, np.arange(64), COLUMNS, batch_size=16)
    assert len(calls) == 2 * 4  # 4 batches x (as given, all zeroed), for 10 columns
    calls.clear()
    evaluate(m, data, np.arange(64), COLUMNS, batch_size=16, share=False)
    assert len(calls) == len(COLUMNS) * 4


def test_methods_without_per_modality_encoders_keep_their_own_forward(data):
    cfg = load_config("cm-arr", None, {"model.d": 16} if "d" in load_config("cm-arr")["model"] else {})
    m = build(cfg, data.spec)
    assert not shares_encoders(m)


def rows_ok(rows, idx):
    flat = np.concatenate(rows)
    assert sorted(flat.tolist()) == sorted(np.asarray(idx).tolist())


def by_duration(n=120, seed=0):
    """Utterances whose three modalities' lengths follow one duration, as in a real corpus."""
    from train.data import MultimodalData

    rng = np.random.default_rng(seed)
    dur = rng.integers(3, 90, n)
    seqs = {m: [np.ones((max(1, int(d // k)), 4), np.float32) for d in dur] for m, k in (("a", 1), ("v", 3), ("t", 4))}
    return MultimodalData.from_arrays([f"u{i}" for i in range(n)], rng.integers(0, 2, n), seqs, labels=["x", "y"])


def test_bucketing_covers_every_row_once_and_cuts_padding():
    data = by_duration()
    idx = np.arange(len(data))
    plain = data.batch_rows(idx, 8, rng=np.random.default_rng(0))
    bucketed = data.batch_rows(idx, 8, rng=np.random.default_rng(0), bucket=True)
    rows_ok(plain, idx)
    rows_ok(bucketed, idx)
    before, after = data.padding_fraction(plain)["all"], data.padding_fraction(bucketed)["all"]
    assert after < 0.2 * before, (before, after)
    again = data.batch_rows(idx, 8, rng=np.random.default_rng(0), bucket=True)
    assert all(np.array_equal(a, b) for a, b in zip(bucketed, again))  # seeded: a resumed run redraws it
    dropped = data.batch_rows(idx, 8, rng=np.random.default_rng(0), bucket=True, drop_last=True)
    assert all(len(r) == 8 for r in dropped) and len(dropped) == len(idx) // 8


def test_unbucketed_batches_are_the_shuffled_slices_they_always_were(data):
    idx = np.arange(len(data))
    perm = idx[np.random.default_rng(4).permutation(len(idx))]
    rows = data.batch_rows(idx, 16, rng=np.random.default_rng(4))
    assert all(np.array_equal(r, perm[k * 16:(k + 1) * 16]) for k, r in enumerate(rows))


def test_padding_fraction_by_hand():
    from train.data import MultimodalData

    seqs = {m: [np.zeros((n, 2), np.float32) for n in (2, 4)] for m in "avt"}
    d = MultimodalData.from_arrays(["u0", "u1"], [0, 1], seqs, labels=["x", "y"])
    f = d.padding_fraction([np.array([0, 1])])
    assert f["a"] == pytest.approx(2 / 8) and f["all"] == pytest.approx(2 / 8)
    assert d.padding_fraction([np.array([0]), np.array([1])])["all"] == 0.0


def test_folds_on_two_workers_give_the_numbers_of_one(tmp_path, dask_scheduler):
    """MMIN with its baseline prerequisite, 2 folds: in sequence, then on 2 workers."""
    import json

    from pipeline.cluster import Cluster
    from train.run import run_experiment
    from train.synthetic import synthetic_folds

    data = synthetic_data(n=60, seed=0)
    folds = synthetic_folds(data, 2)
    over = {**SMALL, "train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 1}, "train.batch_size": 16,
            "model.imagination.layers": [32, 16]}
    cfg = load_config("mmin", "demo", over)
    prereq = {"*": {}, "baseline": {k: v for k, v in over.items() if k.startswith("model.") and "imagination" not in k}}
    res = {}
    for workers in (1, 2):
        cluster = Cluster(scheduler=dask_scheduler) if workers > 1 else None
        run = run_experiment(data, folds, cfg, dataset="synth", seeds=[0], results_dir=tmp_path / f"w{workers}",
                             progress=False, log=lambda *_: None, workers=workers, prereq_overrides=prereq,
                             cluster=cluster)
        if cluster is not None:
            cluster.close()
        res[workers] = {p.parent.parent.name + p.parent.name: json.loads(p.read_text())["test"]
                        for p in run.glob("folds/*/seed*/result.json")}
    assert len(res[1]) == 2 and res[1] == res[2]
