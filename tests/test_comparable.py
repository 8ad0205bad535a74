"""Runs tested on different test ids never share a table: ``imer report`` and the comparison's
report refuse, in one line naming the two runs, to put side by side runs whose test split of a
fold differs (a subset, another fold file or manifest), and group them apart in the full report.
Runs written before result.json recorded ``test_ids`` are checked from the ids their
predictions.npz saved, else by count."""

from __future__ import annotations

import json
import shutil

import pytest

from manifests.schema import Fold
from train.compare_report import _check_comparable
from train.config import load_config
from train.report import ReportError, report
from train.results import ids_hash, run_test_ids, seal
from train.run import run_experiment
from train.synthetic import synthetic_data, synthetic_folds

TINY = {"train.schedule": {"kind": "linear_decay", "constant": 1, "decay": 1}, "train.batch_size": 16,
        "model.encoders.a.hidden": 8, "model.encoders.v.hidden": 8, "model.encoders.t.channels": 8,
        "eval.conditions": ["avt", "mr=0.3"]}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(data, folds, method, root):
    return run_experiment(data, folds, load_config(method, "demo", TINY), dataset="synth", fold_select="1",
                          seeds=[0], results_dir=root, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """baseline and baseline-aug on the same fold f1 ("same"); baseline-aug on a subset of its test
    ids ("subset") and on as many ids, one swapped for a training id ("swapped"), each beside a
    copy of the baseline run."""
    data = synthetic_data(n=48, seed=4)
    folds = synthetic_folds(data, 2)
    f1 = folds[0]
    subset = [Fold("f1", f1.train, f1.val, f1.test[:-2])]
    swapped = [Fold("f1", [f1.test[0], *f1.train[1:]], f1.val, [f1.train[0], *f1.test[1:]])]
    out = {}
    base = tmp_path_factory.mktemp("same")
    out["same"] = base, {m: _train(data, folds, m, base) for m in ("baseline", "baseline-aug")}
    for name, fl in (("subset", subset), ("swapped", swapped)):
        root = tmp_path_factory.mktemp(name)
        b = root / "synth" / "baseline" / out["same"][1]["baseline"].name
        shutil.copytree(out["same"][1]["baseline"], b)
        out[name] = root, {"baseline": b, "baseline-aug": _train(data, fl, "baseline-aug", root)}
    return out, folds


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_result_json_records_the_test_ids_and_equal_ones_share_a_table(runs):
    out, folds = runs
    root, r = out["same"]
    for d in r.values():
        res = json.loads((d / "folds" / "f1" / "seed0" / "result.json").read_text())
        assert res["test_ids"] == ids_hash(folds[0].test) and res["n"]["test"] == len(folds[0].test)
    assert run_test_ids(r["baseline"]) == {"f1": {"n": len(folds[0].test), "hash": ids_hash(folds[0].test)}}
    assert ids_hash(folds[0].test[::-1]) == ids_hash(folds[0].test)  # the same ids listed in another order
    text = report("synth", root, write=False, methods=["baseline", "baseline-aug"])
    assert "| baseline | UA |" in text and "| baseline-aug | UA |" in text
    _check_comparable(r)


@pytest.mark.parametrize("case,n", [("subset", 14), ("swapped", 16)])
def test_runs_tested_on_other_ids_are_refused_in_one_line(runs, case, n, capsys):
    out, folds = runs
    root, r = out[case]
    with pytest.raises(ReportError) as e:
        report("synth", root, write=False, methods=["baseline", "baseline-aug"])
    msg = str(e.value)
    assert "\n" not in msg and "tested on different test ids" in msg
    assert f"fold f1: 16 test ids (hash {ids_hash(folds[0].test)}) in baseline's run {r['baseline'].name}" in msg
    assert f"vs {n} test ids (hash " in msg and f"in baseline-aug's run {r['baseline-aug'].name}" in msg
    with pytest.raises(ReportError, match=r"baseline-aug's run differs from baseline's in test ids \(fold f1: 16 "):
        _check_comparable(r)
    # the full report puts them in two tables, headed by their test ids
    text = report("synth", root, write=False)
    groups = text.split("## ")[1:]
    assert [("| baseline | UA |" in g, "| baseline-aug | UA |" in g) for g in groups] == [(True, False), (False, True)]
    assert "; test ids f1 16 (" in groups[0] and f"; test ids f1 {n} (" in groups[1]
    from pipeline.cli import main

    assert main(["report", "--dataset", "synth", "--results", str(root), "--methods", "baseline,baseline-aug"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tested on different test ids" in err


def test_older_runs_are_checked_from_their_saved_ids_else_by_count(runs, tmp_path):
    out, folds = runs
    for case in ("subset", "swapped"):
        root = _copy(out[case][0], tmp_path / case)
        for p in root.glob("synth/*/*/folds/*/seed*/result.json"):  # written before test_ids was recorded
            res = json.loads(p.read_text())
            del res["test_ids"], res["checksums"]  # nor checksums
            p.write_text(json.dumps(res))
        with pytest.raises(ReportError, match=f"hash {ids_hash(folds[0].test)}"):  # from predictions.npz
            report("synth", root, write=False, methods=["baseline", "baseline-aug"])
        for p in root.glob("synth/*/*/folds/*/seed*/predictions.npz"):
            p.unlink()
        if case == "subset":  # the count still tells
            with pytest.raises(ReportError, match=r"16 test ids \(hash not recorded\) .* vs 14 test ids"):
                report("synth", root, write=False, methods=["baseline", "baseline-aug"])
        else:  # as many ids, nothing recorded of which: cannot be told apart, read as before
            assert "| baseline-aug | UA |" in report("synth", root, write=False, methods=["baseline", "baseline-aug"])
    # such a run sides with either of two recorded runs, but they are not put together through it
    root = _copy(out["swapped"][0], tmp_path / "three")
    old = next(root.glob("synth/baseline/*/folds/f1/seed0"))
    res = json.loads((old / "result.json").read_text())
    del res["test_ids"], res["checksums"]
    (old / "result.json").write_text(json.dumps(res))
    (old / "predictions.npz").unlink()
    other = _copy(out["same"][1]["baseline-aug"], root / "synth" / "mmin" / "r")
    meta = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**meta, "method": "mmin"}))
    with pytest.raises(ReportError, match="in mmin's run r vs 16 test ids .* in baseline-aug's run"):
        report("synth", root, write=False, methods=["baseline", "mmin", "baseline-aug"])


def test_seeds_of_one_fold_tested_on_other_ids_are_refused(runs, tmp_path):
    out, folds = runs
    run = _copy(out["same"][1]["baseline"], tmp_path / "synth" / "baseline" / "r")
    stale = _copy(run / "folds" / "f1" / "seed0", run / "folds" / "f1" / "seed1")
    res = json.loads((stale / "result.json").read_text())
    stale_res = seal(stale, {**res, "seed": 1, "test_ids": ids_hash(folds[0].test[1:])})  # as imer wrote it
    (stale / "result.json").write_text(json.dumps(stale_res))
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "seeds": [0, 1]}))
    with pytest.raises(ReportError, match="baseline's run r: fold f1 seed 1 was tested on 16 test ids .*, seed 0 on 16"):
        run_test_ids(run)
    with pytest.raises(ReportError, match="fold f1 seed 1 was tested on"):
        report("synth", tmp_path, write=False)
