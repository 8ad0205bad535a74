"""Run outputs under faults (issue 42): checksums that report, predict and compare verify, damaged
fold outputs recomputed on resume, the run lock, and one line instead of a traceback for damaged
run files, non-finite hyperparameters and a diverging run."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from train.config import load_config
from train.results import ReportError, verified
from stage_helpers import lock_held_elsewhere
from train.run import RunInProgress, run_experiment
from train.synthetic import synthetic_data, synthetic_folds

FAST = {"train.schedule": {"kind": "linear_decay", "constant": 2, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 16, "model.encoders.v.hidden": 16, "model.encoders.t.channels": 16}
COLUMNS = ["a", "avt"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**extra):
    return load_config("baseline", "demo", {**FAST, "eval.conditions": COLUMNS, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished baseline run (one fold, seed 0) under results/synth/baseline/."""
    root = tmp_path_factory.mktemp("results")
    data = synthetic_data(n=48, seed=0, absent=0.1)
    folds = synthetic_folds(data, 2)[:1]
    run = run_experiment(data, folds, _cfg(), dataset="synth", seeds=[0], results_dir=root, progress=False,
                         log=lambda *_: None)
    return root, run.relative_to(root), data, folds


@pytest.fixture
def copy(trained, tmp_path):
    """A private copy of the finished run: (root, run folder, its fold folder, data, folds, logs, rerun)."""
    root, rel, data, folds = trained
    mine = tmp_path / "results"
    shutil.copytree(root, mine)
    logs: list[str] = []

    def rerun(**cfg):
        return run_experiment(data, folds, _cfg(**cfg), dataset="synth", seeds=[0], results_dir=mine,
                              progress=False, log=logs.append)

    return mine, mine / rel, mine / rel / "folds" / "f1" / "seed0", data, folds, logs, rerun


def _edit_result(job, **changes):
    res = json.loads((job / "result.json").read_text())
    res["test"]["avt"]["ua"] = changes.get("ua", 0.99)
    (job / "result.json").write_text(json.dumps(res))


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_an_edited_result_is_refused_by_report_predict_and_compare(copy, capsys):
    from pipeline.cli import main
    from train.compare_report import scores
    from train.predict import PredictError, checkpoints
    from train.report import report

    root, run, job, *_ = copy
    verified(job)  # as written: it agrees with its checksums
    assert report("synth", root, write=False)
    _edit_result(job)
    with pytest.raises(ReportError, match=r"seed0/result.json: edited or damaged"):
        report("synth", root, write=False)
    with pytest.raises(ReportError, match=r"seed0/result.json: edited or damaged"):
        scores(run, "ua", COLUMNS)
    with pytest.raises(PredictError, match=r"seed0/result.json: edited or damaged"):
        checkpoints(run)
    assert main(["report", "--dataset", "synth", "--results", str(root)]) == 2
    assert "run the same imer train command again" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["predictions.npz", "best.pt"])
def test_a_file_that_differs_from_its_checksum_is_named(copy, name):
    """A readable file that is not the one result.json vouches for: its predictions (the numbers
    report shows come from them) or another model."""
    from train.predict import PredictError, checkpoints
    from train.report import report

    root, run, job, *_ = copy
    if name == "predictions.npz":
        z = dict(np.load(job / name))
        z["avt_out"] = z["avt_out"][:, ::-1].copy()
        np.savez_compressed(job / name, **z)
    else:
        raw = bytearray((job / name).read_bytes())
        raw[-20] ^= 1
        (job / name).write_bytes(bytes(raw))
    with pytest.raises(ReportError, match=rf"seed0/{name}: edited or damaged .* result.json records"):
        report("synth", root, write=False)
    if name == "best.pt":
        with pytest.raises(PredictError, match="seed0/best.pt: edited or damaged"):
            checkpoints(run)


def test_an_edited_result_is_recomputed_in_its_run_on_resume(copy):
    """The same command on a complete run with an edited result retrains that fold in the same
    run folder, says so in one line, and the report shows the recomputed number again."""
    from train.report import report

    root, run, job, *_, logs, rerun = copy
    good = json.loads((job / "result.json").read_text())["test"]["avt"]["ua"]
    _edit_result(job, ua=0.01)
    assert rerun() == run
    assert [ln for ln in logs if "result.json is damaged or was edited; training it again" in ln]
    assert verified(job)["test"]["avt"]["ua"] == pytest.approx(good)  # same seed, same model
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no second run folder
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert f"{good:.4f}" in report("synth", root, write=False)


def test_a_truncated_result_or_a_missing_predictions_file_is_recomputed(copy):
    root, run, job, *_, logs, rerun = copy
    stamp = (job / "best.pt").stat().st_mtime_ns
    (job / "predictions.npz").unlink()  # recorded in result.json, gone: tested again, not retrained
    rerun()
    assert [ln for ln in logs if "predictions.npz is damaged; testing the selected model again" in ln]
    assert (job / "best.pt").stat().st_mtime_ns == stamp and verified(job)
    raw = (job / "result.json").read_text()
    (job / "result.json").write_text(raw[: len(raw) // 2])
    logs.clear()
    rerun()
    assert [ln for ln in logs if "result.json is damaged or was edited; training it again" in ln]
    assert verified(job)["fold"] == "f1"


@pytest.mark.parametrize("damage", ["object array", "truncated"])
def test_a_damaged_predictions_file_and_a_new_eval_column(copy, damage):
    """A new --eval column reuses the finished model (a new run folder, its files copied): a
    predictions.npz that cannot be read without pickles, or a cut one, is tested again."""
    root, run, job, *_, logs, rerun = copy
    p = job / "predictions.npz"
    if damage == "object array":
        z = dict(np.load(p))
        z["ids"] = np.array(list(z["ids"]), dtype=object)
        np.savez_compressed(p, **z)
    else:
        p.write_bytes(p.read_bytes()[:100])
    new = rerun(**{"eval.conditions": [*COLUMNS, "vt"]})
    assert new != run and [ln for ln in logs if "predictions.npz is damaged" in ln]
    job2 = new / "folds" / "f1" / "seed0"
    assert {"a_out", "avt_out", "vt_out", "ids"} <= set(np.load(job2 / "predictions.npz").files)
    assert set(verified(job2)["test"]) == {"a", "avt", "vt"}


def test_damaged_run_json_and_result_json_are_one_line(copy, capsys):
    from pipeline.cli import main

    root, run, job, *_ = copy
    raw = (job / "result.json").read_text()
    (job / "result.json").write_text(raw[:40])
    assert main(["report", "--dataset", "synth", "--results", str(root)]) == 2
    assert "seed0/result.json: damaged (JSONDecodeError" in _one_line(capsys.readouterr().err)
    (job / "result.json").write_text(raw)
    raw = (run / "run.json").read_text()
    (run / "run.json").write_text(raw[: len(raw) // 2])
    assert main(["predict", "--run", str(run), "--text", "hello", "--device", "cpu"]) == 2
    assert "run.json: damaged" in _one_line(capsys.readouterr().err)
    assert main(["report", "--dataset", "synth", "--results", str(root)]) == 1  # nothing complete to show
    cap = capsys.readouterr()
    assert f"skipping {run}: its run.json is damaged" in _one_line(cap.err) and "No complete" in cap.out


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_non_finite_hyperparameters_are_refused_before_anything_starts(tmp_path, capsys, value):
    from pipeline.cli import main

    rc = main(["train", "--dataset", "demo", "--method", "mmin", "--results", str(tmp_path),
               "--set", f"baseline:train.optimizer.lr={value}"])
    assert rc == 2
    assert "train.optimizer.lr must be a finite number" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing marked running


def test_a_diverging_run_is_one_line_and_marked_failed(trained, tmp_path, capsys, monkeypatch):
    import torch

    import train.run
    from pipeline.cli import main

    _, _, data, folds = trained

    def poison(trainer, epoch, rec):  # the weights blow up: the next epoch's loss is NaN
        with torch.no_grad():
            for p in trainer.method.parameters():
                p.fill_(float("nan"))

    def train_method(dataset, method, **kw):
        return run_experiment(data, folds, _cfg(), dataset="synth", seeds=[0], results_dir=tmp_path,
                              progress=False, callbacks=[poison], log=lambda *_: None)

    monkeypatch.setattr(train.run, "train_method", train_method)
    assert main(["train", "--dataset", "demo", "--method", "baseline"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "the training loss became nan" in line and "marked failed" in line
    meta = json.loads(next(tmp_path.glob("synth/baseline/*/run.json")).read_text())
    assert meta["status"] == "failed" and "FloatingPointError" in meta["error"]


def test_a_run_in_progress_is_not_trained_twice(copy):
    """While another process holds the run's lock, the same command says so in one line (its pid)
    and trains nothing; once it is gone, the command resumes the run."""
    root, run, job, *_, logs, rerun = copy
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "running"}))  # as while it trains
    (job / "result.json").unlink()  # a fold still to train
    with lock_held_elsewhere(run / ".lock") as pid:
        with pytest.raises(RunInProgress, match=rf"{run} is being trained by another imer train \(pid {pid}\)"):
            rerun()
        assert not (job / "result.json").exists() and not (job / "last.pt").exists()  # nothing trained
    t0 = time.perf_counter()
    assert rerun() == run and verified(job)  # the lock died with its holder
    assert time.perf_counter() - t0 < 30
    assert not (run / ".lock.pid").exists()
