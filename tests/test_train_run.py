"""The trainer and the run layer on tiny synthetic data: model selection on validation only,
resume == uninterrupted, schedules, early stopping, run outputs, prerequisites, report, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train.config import ConfigError, load_config
from train.data import Normalizer
from train.methods import build
from train.run import run_experiment
from train.synthetic import synthetic_data, synthetic_folds
from train.trainer import Trainer, load_checkpoint, make_scheduler

FAST = {"train.schedule": {"kind": "linear_decay", "constant": 2, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 32, "model.encoders.v.hidden": 32, "model.encoders.t.channels": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return synthetic_data(n=60, seed=0, absent=0.1)


def _cfg(name="baseline", **extra):
    # the demo's per-dataset settings on data named "synth": prerequisites must follow the former
    return load_config(name, "demo", {**FAST, **extra})


def _trainer(data, fold, out, cfg, callbacks=(), seed=0):
    torch.manual_seed(seed)
    tr, va = data.indices(fold.train), data.indices(fold.val)
    norm = Normalizer.fit(data, tr, cfg["data"]["normalize"])
    return Trainer(build(cfg, data.spec), data, tr, va, cfg, out, seed=seed, normalizer=norm,
                   signature="sig", progress=False, callbacks=callbacks)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _strip(history):
    return [{k: v for k, v in h.items() if not k.endswith("_s") and k != "samples_per_s"} for h in history]


def test_selection_reads_train_and_val_only(data, tmp_path):
    fold = synthetic_folds(data, 2)[0]
    cfg = _cfg()
    data.access_log = []
    try:
        summary = _trainer(data, fold, tmp_path / "a", cfg).fit()
        seen = np.unique(np.concatenate(data.access_log))
    finally:
        data.access_log = None
    test_rows = set(data.indices(fold.test).tolist())
    assert not test_rows & set(seen.tolist())
    assert set(seen.tolist()) == set(data.indices(fold.train).tolist()) | set(data.indices(fold.val).tolist())
    # the kept epoch is the best validation epoch
    scores = [h["val_score"] for h in summary["history"]]
    assert summary["best_epoch"] == int(np.argmax(scores)) + 1 and summary["best_score"] == max(scores)
    ck = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    assert ck["epoch"] == summary["best_epoch"] and ck["score"] == summary["best_score"]


def test_test_labels_cannot_change_training(tmp_path):
    """Scrambling the test split's labels leaves the chosen model bit-identical."""
    d1, d2 = synthetic_data(n=60, seed=0), synthetic_data(n=60, seed=0)
    fold = synthetic_folds(d1, 2)[0]
    te = d2.indices(fold.test)
    d2.y[te] = (d2.y[te] + 1) % 4
    cfg = _cfg()
    s1 = _trainer(d1, fold, tmp_path / "a", cfg).fit()
    s2 = _trainer(d2, fold, tmp_path / "b", cfg).fit()
    assert _strip(s1["history"]) == _strip(s2["history"])
    w1, w2 = _weights(tmp_path / "a" / "best.pt"), _weights(tmp_path / "b" / "best.pt")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


class Interrupt(Exception):
    pass


def _interrupt_after(epoch):
    def cb(trainer, e, rec):
        if e + 1 == epoch:
            raise Interrupt
    return cb


def test_trainer_resume_equals_uninterrupted(tmp_path):
    d = synthetic_data(n=60, seed=1)
    fold = synthetic_folds(d, 2)[0]
    cfg = _cfg("baseline-aug")  # dropout + per-sample conditions: both random streams must resume
    full = _trainer(d, fold, tmp_path / "full", cfg).fit()
    with pytest.raises(Interrupt):
        _trainer(d, fold, tmp_path / "cut", cfg, callbacks=[_interrupt_after(2)]).fit()
    assert (tmp_path / "cut" / "last.pt").is_file()
    # a fresh process would rebuild the model with other random weights: resuming must not care
    torch.manual_seed(123)
    resumed = _trainer(d, fold, tmp_path / "cut", cfg, seed=0)
    resumed.method = build(cfg, d.spec)
    res = resumed.fit()
    assert res["epochs_run"] == 3 and _strip(res["history"]) == _strip(full["history"])
    w1, w2 = _weights(tmp_path / "full" / "best.pt"), _weights(tmp_path / "cut" / "best.pt")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # a finished run is not trained again
    again = _trainer(d, fold, tmp_path / "cut", cfg).fit()
    assert again["epochs_run"] == 3


def test_checkpoint_of_other_config_is_not_resumed(tmp_path, data):
    fold = synthetic_folds(data, 2)[0]
    cfg = _cfg()
    with pytest.raises(Interrupt):
        _trainer(data, fold, tmp_path, cfg, callbacks=[_interrupt_after(1)]).fit()
    t = _trainer(data, fold, tmp_path, cfg)
    t.signature = "other"
    assert t.fit()["epochs_run"] == 3  # started over


def test_linear_decay_schedule_and_early_stopping(data, tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = make_scheduler(opt, {"kind": "linear_decay", "constant": 2, "decay": 2}, 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])
    fold = synthetic_folds(data, 2)[0]
    cfg = _cfg(**{"train.optimizer.lr": 0.0, "train.early_stop": {"patience": 1},
                  "train.schedule": {"kind": "constant"}, "train.epochs": 6, "model.dropout": 0.0})
    s = _trainer(data, fold, tmp_path, cfg).fit()
    assert s["stopped_early"] and s["epochs_run"] == 2 and s["best_epoch"] == 1  # nothing can improve at lr 0


def test_regression_task_selects_on_mae(tmp_path):
    d = synthetic_data(n=48, seed=2, task="regression")
    fold = synthetic_folds(d, 2)[0]
    s = _trainer(d, fold, tmp_path, _cfg()).fit()
    assert s["metric"] == "mae"
    scores = [h["val_score"] for h in s["history"]]
    assert s["best_score"] == min(scores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """baseline and mmin on two folds (mmin reuses baseline's models as its prerequisite)."""
    root = tmp_path_factory.mktemp("results")
    d = synthetic_data(n=60, seed=0, absent=0.1)
    folds = synthetic_folds(d, 2)
    logs = []
    out = {}
    for m in ("baseline", "mmin"):
        out[m] = run_experiment(d, folds, _cfg(m), dataset="synth", seeds=[0], results_dir=root, progress=False,
                                prereq_overrides={"baseline": FAST}, log=logs.append)
    return root, out, logs, d, folds


def test_run_outputs(runs):
    root, out, logs, d, folds = runs
    run = out["mmin"]
    for f in ("config.yaml", "run.json", "metrics.json", "metrics.csv", "table.md", "curves.png", "conditions.png"):
        assert (run / f).is_file(), f
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete" and meta["folds"] == ["f1", "f2"]
    import pandas as pd

    csv = pd.read_csv(run / "metrics.csv")
    assert len(csv) == 2 * 7 and set(csv["condition"]) == {"a", "v", "t", "av", "at", "vt", "avt"}
    table = (run / "table.md").read_text()
    assert "| {a} | {v} | {t} | {a,v} | {a,t} | {v,t} | Average | {a,v,t} |" in table
    # the Average column is the mean over the six missing conditions, per fold first
    summ = json.loads((run / "metrics.json").read_text())
    per_fold = [np.mean([r["test"][c]["ua"] for c in ("a", "v", "t", "av", "at", "vt")]) for r in summ["runs"]]
    assert summ["summary"]["ua"]["average"]["mean"] == pytest.approx(np.mean(per_fold))
    assert summ["summary"]["ua"]["average"]["std"] == pytest.approx(np.std(per_fold, ddof=1))
    # predictions on disk reproduce the reported metric
    r0 = summ["runs"][0]
    pred = np.load(run / "folds" / r0["fold"] / "seed0" / "predictions.npz")
    from sklearn.metrics import balanced_accuracy_score

    assert balanced_accuracy_score(pred["at_y"], pred["at_out"].argmax(1)) == pytest.approx(r0["test"]["at"]["ua"])
    assert set(pred["ids"]) == set(folds[[f.name for f in folds].index(r0["fold"])].test)


def test_mmin_builds_on_the_baseline_of_the_same_fold(runs):
    root, out, logs, d, folds = runs
    assert any("reusing" in line and "baseline f1 seed 0" in line for line in logs)
    base, _, _ = load_checkpoint(out["baseline"] / "folds" / "f1" / "seed0" / "best.pt")
    pre, _, _ = load_checkpoint(out["mmin"] / "prereq" / "baseline" / "f1" / "seed0" / "best.pt")
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), pre.state_dict().values()))
    mmin, norm, cfg = load_checkpoint(out["mmin"] / "folds" / "f1" / "seed0" / "best.pt")
    assert cfg["name"] == "mmin" and bool(mmin.inherited)
    for k, v in base.encoders.state_dict().items():  # the teacher is the frozen baseline encoders
        assert torch.equal(mmin.teacher.state_dict()[k], v)
    # its normaliser came from the training ids of that fold only
    tr = d.indices(folds[0].train)
    assert np.allclose(norm.mean["a"], Normalizer.fit(d, tr, ["a"]).mean["a"])


def test_rerun_reuses_finished_folds_and_interrupted_run_resumes(runs, tmp_path):
    root, out, logs, d, folds = runs
    lines = []
    done = sorted(out["baseline"].glob("folds/*/seed0/result.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    again = run_experiment(d, folds, _cfg("baseline"), dataset="synth", seeds=[0], results_dir=root,
                           progress=False, log=lines.append, run_id=out["baseline"].name)
    assert again == out["baseline"] and [p.stat().st_mtime_ns for p in done] == stamps  # nothing retrained
    # the same command without a run id: the finished run is returned as it is, no copy is made
    method_dir = out["baseline"].parent
    before = {p: p.stat().st_mtime_ns for p in method_dir.rglob("*") if p.is_file()}
    lines.clear()
    same = run_experiment(d, folds, _cfg("baseline"), dataset="synth", seeds=[0], results_dir=root,
                          progress=False, log=lines.append)
    assert same == out["baseline"] and sorted(method_dir.iterdir()) == [out["baseline"]]
    assert {p: p.stat().st_mtime_ns for p in method_dir.rglob("*") if p.is_file()} == before
    assert any("already complete" in x for x in lines) and any("| baseline | UA |" in x for x in lines)
    assert lines[-1] in logs  # the very table the finished run printed
    # interrupt a fresh run during fold f2, rerun: resumes that run and ends equal to the complete one
    with pytest.raises(Interrupt):
        run_experiment(d, folds, _cfg("baseline"), dataset="synth", seeds=[0], results_dir=tmp_path,
                       progress=False, log=lambda *_: None,
                       callbacks=[lambda t, e, r: (_ for _ in ()).throw(Interrupt()) if "f2" in t.desc and e == 1 else None])
    resumed = run_experiment(d, folds, _cfg("baseline"), dataset="synth", seeds=[0], results_dir=tmp_path,
                             progress=False, log=lines.append)
    assert any(x.startswith("resuming") for x in lines)
    a = json.loads((resumed / "metrics.json").read_text())["summary"]
    b = json.loads((out["baseline"] / "metrics.json").read_text())["summary"]
    assert a == b


def test_report_puts_methods_side_by_side(runs):
    from train.report import latest_runs, report

    root, out, *_ = runs
    assert list(latest_runs("synth", root)) == ["baseline", "mmin"]
    text = report("synth", root)
    assert "| baseline | UA |" in text and "| mmin | UA |" in text
    assert (root / "synth" / "report.md").is_file() and (root / "synth" / "report.png").is_file()
    assert "No complete training run" in report("nothing-here", root)


def test_report_and_train_commands(runs, capsys):
    from pipeline.cli import main

    root, *_ = runs
    assert main(["report", "--dataset", "synth", "--results", str(root)]) == 0
    assert "| mmin | WA |" in capsys.readouterr().out
    assert main(["train", "--dataset", "synth", "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_predict_from_features_matches_evaluation(runs):
    from train.conditions import availability
    from train.predict import PredictError, predict_features, resolve_run
    from train.trainer import evaluate

    root, out, logs, d, folds = runs
    run = resolve_run("synth/mmin", root)
    assert run == out["mmin"]
    rows = d.indices(folds[0].test)
    i = int(next(r for r in rows if d.natural[r, 0] and d.natural[r, 2]))  # has audio and text
    seqs = {"a": d.seqs["a"].seq(i), "v": None, "t": d.seqs["t"].seq(i)}
    res = predict_features(run, seqs, fold="f1")
    assert res["condition"] == "at" and res["models"] == 1 and sum(res["probabilities"].values()) == pytest.approx(1)
    m, norm, _ = load_checkpoint(run / "folds" / "f1" / "seed0" / "best.pt")
    ev = evaluate(m, d, [i], ["at"], norm)
    p = torch.softmax(torch.from_numpy(ev["at"]["out"][0]), -1).numpy()
    assert np.allclose(list(res["probabilities"].values()), p, atol=1e-5)
    assert res["label"] == d.labels[int(np.argmax(p))]
    assert availability("at").tolist() == [True, False, True]
    with pytest.raises(PredictError, match="nothing to predict"):
        predict_features(run, {"a": None, "v": None, "t": None})
    with pytest.raises(PredictError, match="not a training run"):
        resolve_run(root / "nowhere")


def test_cpu_threads_default_one_and_restored():
    from train.run import cpu_threads

    old = torch.get_num_threads()
    with cpu_threads("cpu"):
        assert torch.get_num_threads() == 1
    with cpu_threads("cpu", 2):
        assert torch.get_num_threads() == 2
    with cpu_threads("cuda"):
        assert torch.get_num_threads() == old
    assert torch.get_num_threads() == old


def test_prerequisite_trained_inside_another_run_is_reused(runs, tmp_path):
    """mmin-nocycle builds on baseline too: with no standalone baseline run left, it copies the
    baseline mmin's run trained under prereq/ instead of training it again."""
    root, out, logs, d, folds = runs
    import shutil

    res = tmp_path / "results"
    shutil.copytree(out["mmin"], res / "synth" / "mmin" / out["mmin"].name)  # no baseline/ run here
    logs2 = []
    run = run_experiment(d, folds[:1], _cfg("mmin-nocycle"), dataset="synth", seeds=[0], results_dir=res,
                         progress=False, prereq_overrides={"baseline": FAST}, log=logs2.append)
    assert any("reusing" in line and "/prereq/baseline/" in line for line in logs2), logs2
    assert not any("training the prerequisite" in line for line in logs2)
    a, _, _ = load_checkpoint(out["mmin"] / "prereq" / "baseline" / "f1" / "seed0" / "best.pt")
    b, _, _ = load_checkpoint(run / "prereq" / "baseline" / "f1" / "seed0" / "best.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prerequisite_with_other_encoders_is_refused(runs, tmp_path):
    """mmin loads its encoders from the baseline: an override of mmin's encoders alone would give a
    state_dict mismatch deep in torch; it is refused up front, naming the section."""
    root, out, logs, d, folds = runs
    cfg = _cfg("mmin", **{"model.encoders.a.hidden": 16})
    with pytest.raises(ConfigError, match="model.encoders differs"):
        run_experiment(d, folds[:1], cfg, dataset="synth", seeds=[0], results_dir=tmp_path, progress=False,
                       prereq_overrides={"baseline": FAST}, log=lambda *a: None)


def test_unknown_invalid_frames_value_is_refused():
    from train.run import build_data

    with pytest.raises(ConfigError, match="invalid_frames must be drop or zero"):
        build_data(None, {}, {"data": {"invalid_frames": "dorp"}})


def test_a_damaged_predictions_file_is_retested_not_lost(data, tmp_path):
    """A kill during the write of predictions.npz (issue 42) left a half-written file that failed
    every later resume: the write is atomic now, and a damaged file found on resume is computed
    again from the selected model (one line says so), without retraining."""
    folds = synthetic_folds(data, 2)[:1]
    logs: list[str] = []
    kw = {"dataset": "synth", "results_dir": tmp_path, "progress": False, "log": logs.append, "run_id": "r"}
    run = run_experiment(data, folds, _cfg(), **kw)
    job = run / "folds" / "f1" / "seed0"
    good = dict(np.load(job / "predictions.npz"))
    stamp = (job / "best.pt").stat().st_mtime_ns
    raw = (job / "predictions.npz").read_bytes()
    (job / "predictions.npz").write_bytes(raw[: len(raw) // 2])  # as a kill mid-write would leave it
    assert not list(job.glob(".*.tmp"))  # the atomic write left no temporary file behind
    run_experiment(data, folds, _cfg(), **kw)
    assert any("predictions.npz is damaged" in line for line in logs)
    again = dict(np.load(job / "predictions.npz"))
    assert set(again) == set(good) and all(np.array_equal(good[k], again[k]) for k in good)
    assert (job / "best.pt").stat().st_mtime_ns == stamp  # retested, not retrained


def test_a_change_of_training_numerics_makes_every_model_stale(monkeypatch):
    """Models trained before a numerics change (even at rounding level) are never reused after it."""
    import train.run as R
    from train.config import load_config
    from train.synthetic import synthetic_data, synthetic_folds

    data = synthetic_data(n=12, seed=1)
    fold = synthetic_folds(data, 2)[0]
    cfg = load_config("baseline", "demo")
    before = R.fold_signature(cfg, data, fold, 0)
    assert R.fold_signature(cfg, data, fold, 0) == before
    monkeypatch.setattr(R, "NUMERICS", R.NUMERICS + 1)
    assert R.fold_signature(cfg, data, fold, 0) != before
