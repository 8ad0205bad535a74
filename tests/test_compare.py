"""The comparison benchmark (train/compare.py, train/compare_report.py) on tiny synthetic data:
same numbers on 1 and 2 dask workers, resume without retraining, feature sets reaching the
prerequisites, paired tests equal to scipy's, refusal of runs that differ, the t-SNE figure."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import wilcoxon

from train.compare import compare, plan, sweep
from train.compare_report import _check_comparable, detectable_gap, paired_power, paired_test, pairs_needed
from train.config import load_config
from train.predict import checkpoints
from train.report import ReportError
from train.results import collect
from train.synthetic import synthetic_data, synthetic_folds

TINY = {"train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 8, "model.encoders.v.hidden": 8, "model.encoders.t.channels": 8}


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=48, seed=2, absent=0.1)


@pytest.fixture(scope="module")
def cluster(dask_scheduler):
    return dask_scheduler


def _run(data, tmp, methods, workers=1, features=None, scheduler=None, seeds=(0,)):
    folds = synthetic_folds(data, 2)
    return compare("demo", methods, overrides=TINY, features=features, seeds=list(seeds), workers=workers,
                   scheduler=scheduler, results_dir=tmp, data=data, fold_list=folds, progress=False,
                   log=lambda *_: None)


def _results(root, method):
    return {p.parent.parent.name: json.loads(p.read_text())["test"]
            for p in sorted(root.glob(f"demo/{method}/compare-*/folds/*/seed0/result.json"))}


def test_plan_puts_prerequisites_first(data):
    folds = synthetic_folds(data, 2)
    jobs = plan(["mmin", "baseline-aug"], folds, [0, 1], "demo")
    names = [j.method for j in jobs]
    assert names.index("baseline") < names.index("mmin")
    assert {j.method for j in jobs if not j.listed} == {"baseline"} and len(jobs) == 3 * 2 * 2
    assert [j.seed for j in jobs] == [0] * 6 + [1] * 6  # seed by seed: an interrupted sweep leaves whole seeds


_STARTED: list[tuple[str, float]] = []


def _quick_job(job, ctx, *_deps):
    _STARTED.append((job.key, time.perf_counter()))
    time.sleep(1.0 if job.key == "baseline/f1/s0" else 0.01)
    return {"job": job.key}


def test_a_sweep_runs_at_most_a_seed_ahead_so_a_stopped_one_leaves_whole_seeds(data):
    from distributed import LocalCluster

    jobs = plan(["mmin", "baseline-aug", "if-mmin", "imder"], synthetic_folds(data, 2), [0, 1, 2], "demo")
    ctx = SimpleNamespace(dataset="demo", compare_id="1c6af12178", progress=False)
    _STARTED.clear()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as c:
        done = sweep(jobs, ctx, scheduler=c.scheduler_address, fn=_quick_job)
    assert sorted(done) == sorted(j.key for j in jobs) and not any("error" in o for o in done.values())
    order = [j.key for j in jobs]
    t_slow = dict(_STARTED)["baseline/f1/s0"]
    during = [order.index(k) for k, t in _STARTED if t_slow < t < t_slow + 0.9]  # while the first job runs
    # 14 jobs a seed: the other thread goes at most that far ahead (given all at once: 26 here)
    assert during and max(during) < 14


def test_two_workers_give_the_numbers_of_one_and_resume_reuses(data, tmp_path, cluster):
    methods = ["baseline-aug", "mmin"]
    out1 = _run(data, tmp_path / "w1", methods, workers=1)
    out2 = _run(data, tmp_path / "w2", methods, scheduler=cluster)  # a LocalCluster of 2 workers
    for m in methods:
        assert _results(tmp_path / "w1", m) == _results(tmp_path / "w2", m)
    report = (out1 / "report.md").read_text()
    assert "MR avg 0.1–0.7" in report and "η avg 0.1–0.5" in report and "Wilcoxon" in report
    assert (out1 / "curves.png").is_file() and (out1 / "confusion.png").is_file()
    # the t-SNE shows the imagination method (mmin), not the baseline, from fold 1's seed-0 model
    assert (out1 / "tsne.png").is_file()
    assert "(mmin; `Method.represent`), on the test split of fold f1 (16 utterances) with the seed-0 model" in report
    info = json.loads((out1 / "compare.json").read_text())
    assert not info["failed"] and info["workers"] == 1

    # a comparison killed after some jobs: the rerun trains only what is missing
    run_dir = next((tmp_path / "w1").glob("demo/mmin/compare-*"))
    lost = run_dir / "folds" / "f2" / "seed0"
    for f in lost.iterdir():
        f.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").glob("demo/*/compare-*/folds/f1/seed0/best.pt")}
    _run(data, tmp_path / "w1", methods, scheduler=cluster)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished jobs untouched
    assert (lost / "best.pt").is_file() and _results(tmp_path / "w1", "mmin") == _results(tmp_path / "w2", "mmin")


def test_more_seeds_reuse_the_first_and_each_comparison_reads_its_own(data, tmp_path, cluster):
    _run(data, tmp_path, ["baseline"], scheduler=cluster)
    kept = {p: p.stat().st_mtime_ns for p in tmp_path.glob("demo/baseline/compare-*/folds/*/seed0/best.pt")}
    out = _run(data, tmp_path, ["baseline"], scheduler=cluster, seeds=(0, 1))
    assert len(kept) == 2 and all(p.stat().st_mtime_ns == t for p, t in kept.items())  # seed 0 not retrained
    assert json.loads((out / "compare.json").read_text())["reused_jobs"] == 2
    run_dir = next(tmp_path.glob("demo/baseline/compare-*"))
    assert len(collect(run_dir)) == 4 and "over 4 fold × seed" in (run_dir / "table.md").read_text()
    drawn = (run_dir / "curves.png").stat().st_mtime_ns
    again = _run(data, tmp_path, ["baseline"], scheduler=cluster)  # seed 0 alone: seed 1's runs are left out
    assert {r["seed"] for r in collect(run_dir)} == {0} and "over 2 fold × seed" in (run_dir / "table.md").read_text()
    assert (run_dir / "curves.png").stat().st_mtime_ns != drawn  # its figures redrawn for seed 0 alone
    assert len(checkpoints(run_dir)) == 2 and {p.parent.name for p in checkpoints(run_dir)} == {"seed0"}  # predict too
    assert again != out


def test_a_feature_set_reaches_the_prerequisites(data, tmp_path, cluster):
    feats = {"audio": {"name": "egemaps"}, "video": {"name": "openface"}, "text": {"name": "minilm-l6"}}
    out = _run(data, tmp_path, ["mmin"], features=feats, scheduler=cluster)  # mmin's baseline must read the same features
    cfg = (next(tmp_path.glob("demo/mmin/compare-*")) / "config.yaml").read_text()
    assert "egemaps" in cfg and json.loads((out / "compare.json").read_text())["failed"] == {}
    assert next(tmp_path.glob("demo/mmin/compare-*/prereq/baseline/*/seed0/result.json")).is_file()


def test_paired_test_equals_scipy():
    rng = np.random.default_rng(0)
    a = {(f"f{i}", s): {"average": float(v)} for (i, s), v in zip([(i, s) for i in range(5) for s in (0, 1)],
                                                                   rng.random(10))}
    b = {k: {"average": v["average"] - 0.05 + 0.02 * rng.standard_normal()} for k, v in a.items()}
    keys = sorted(a)
    want = wilcoxon([a[k]["average"] for k in keys], [b[k]["average"] for k in keys])
    got = paired_test(a, b, "average")
    assert got["p"] == pytest.approx(want.pvalue) and got["statistic"] == pytest.approx(want.statistic)
    assert got["n"] == 10
    assert paired_test(a, a, "average")["p"] == 1.0  # identical runs: no difference


def test_power_matches_simulated_paired_t_tests():
    """The stated power is what repeated paired t-tests achieve on simulated differences."""
    from scipy.stats import ttest_1samp

    rng = np.random.default_rng(1)
    for gap, sd, n in [(0.02, 0.04, 6), (0.02, 0.04, 20), (0.01, 0.02, 12)]:
        d = gap + sd * rng.standard_normal((4000, n))
        hits = np.mean(ttest_1samp(d, 0.0, axis=1).pvalue < 0.05)
        assert paired_power(gap, sd, n) == pytest.approx(hits, abs=0.025)
    g = detectable_gap(0.04, 6)
    assert paired_power(g, 0.04, 6) == pytest.approx(0.8) and 0.05 < g < 0.065
    n = pairs_needed(0.02, 0.04)  # the normal approximation gives (1.96 + 0.84)^2 * 4 = 31.4
    assert paired_power(0.02, 0.04, n) >= 0.8 > paired_power(0.02, 0.04, n - 1) and 31 < n < 36


def test_report_refuses_runs_that_differ(tmp_path):
    runs = {}
    for m, folds, seeds in (("a", ["f1", "f2"], [0]), ("b", ["f1", "f2"], [0]), ("c", ["f1"], [0])):
        d = tmp_path / m
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"folds": folds, "seeds": seeds, "task": "classification",
                                                "features": {"audio": {"key": "compare-1"}}}))
        runs[m] = d
    _check_comparable({k: runs[k] for k in ("a", "b")})
    with pytest.raises(ReportError, match="differs from a's in folds"):
        _check_comparable(runs)
    (runs["b"] / "run.json").write_text(json.dumps({"folds": ["f1", "f2"], "seeds": [1], "task": "classification",
                                                    "features": {"audio": {"key": "compare-1"}}}))
    with pytest.raises(ReportError, match="seeds"):
        _check_comparable({k: runs[k] for k in ("a", "b")})


def test_compare_on_a_fresh_cache_builds_the_manifest_first(tiny_demo, tmp_path, monkeypatch):
    """`make compare` on a fresh clone: no manifest, no fold file, no stores yet."""
    monkeypatch.setenv("IMER_CACHE", str(tmp_path / "fresh-cache"))
    out = compare("demo", ["baseline"], overrides=TINY, folds="1", seeds=[0], workers=1, results_dir=tmp_path,
                  data_root=str(tiny_demo.parent), progress=False, log=lambda *_: None)
    info = json.loads((out / "compare.json").read_text())
    assert info["failed"] == {} and info["folds"] and (out / "report.md").is_file()
    assert (tmp_path / "fresh-cache" / "manifests" / "demo" / "manifest.jsonl").is_file()


def test_the_demo_compares_ten_seeds_unless_told():
    from train.compare import default_seeds

    assert default_seeds("demo", "mmin", {}) == list(range(10))  # train/compare.yaml: what a 2-point gap needs
    assert default_seeds("iemocap", "mmin", {}) == [int(s) for s in load_config("mmin", "iemocap").get("seeds", [0])]
    assert load_config("mmin", "demo")["seeds"] == [0]  # make demo keeps the configs' one seed


def test_a_comparison_in_progress_is_not_run_twice(data, tmp_path):
    """While another process holds the comparison's runs, the same comparison says so in one line
    (its pid) and trains nothing."""
    from stage_helpers import lock_held_elsewhere
    from train.compare import CompareInProgress, runs_id

    lock = tmp_path / "demo" / "compare" / f".runs-{runs_id('demo', TINY)}.lock"
    with lock_held_elsewhere(lock) as pid:
        with pytest.raises(CompareInProgress, match=rf"another imer compare \(pid {pid}\) is training"):
            _run(data, tmp_path, ["baseline"])
        assert not list(tmp_path.glob("demo/baseline/*/folds/*/seed0/result.json"))  # nothing trained
