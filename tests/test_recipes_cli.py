"""Fold invariants asserted when folds are built, and the commands behind `make features
DATASET=... DATA_ROOT=...` / `imer manifest` on fixture trees of the raw layouts."""

import pytest
from fixtures_corpora import make_iemocap, make_mosi

from manifests import _cmu_std_folds, datasets
from manifests._cmu import write_standard_folds
from manifests._common import finish_folds
from manifests.schema import Fold, ManifestError, Utterance, check_speaker_disjoint
from pipeline.cli import main as imer


def _utts():
    return [Utterance(id=f"u{i}", speaker=f"s{i % 4}", session=str(i % 2)) for i in range(8)]


def test_speaker_in_train_and_test_is_refused(tmp_path):
    utts = _utts()
    ok = Fold("1", ["u0", "u4", "u2"], ["u6"], ["u1", "u5"])  # s0, s2 | s2 | s1
    assert finish_folds(tmp_path, "p", [ok], utts, "ds").is_file()
    leak = Fold("2", ["u0", "u1"], [], ["u5", "u2"])  # s1 in train and test
    with pytest.raises(ManifestError, match=r"ds/p: fold 2: speakers \['s1'\] are in both train and test"):
        finish_folds(tmp_path, "p", [ok, leak], utts, "ds")
    speakers = {u.id: u.speaker for u in utts}
    check_speaker_disjoint([Fold("3", ["u0"], ["u4"], ["u1"])], speakers)  # val may share (not test)


@pytest.mark.parametrize("fold,match", [
    (Fold("a", ["u0", "u1"], ["u1"], ["u2"]), "fold a: splits overlap"),
    (Fold("b", ["u0", "x9"], [], ["u1"]), r"fold b: ids not in the manifest: \['x9'\]"),
    (Fold("c", ["u0"], ["u1"], []), r"fold c has an empty train or test split \(1/1/0\)"),
])
def test_fold_structure_is_checked(tmp_path, fold, match):
    with pytest.raises(ManifestError, match=match):
        finish_folds(tmp_path, "p", [fold], _utts(), "ds")
    assert not (tmp_path / "folds-p.json").exists()


def test_cmu_splits_must_be_video_disjoint(tmp_path):
    utts = [Utterance(id=f"{v}_{i}", session=v) for v in ("va", "vb", "vc") for i in (1, 2)]
    splits = {"train": ["va", "vb"], "valid": [], "test": ["vc", "vb"]}
    with pytest.raises(ManifestError, match=r"videos \['vb'\] are in both train and test"):
        write_standard_folds(tmp_path, utts, "mosi", splits)


def test_make_features_with_a_wrong_data_root(tmp_path, capsys):
    (tmp_path / "Session1").mkdir()  # a session without dialog/EmoEvaluation
    (tmp_path / "notes.txt").write_text("x")
    assert imer(["features", "--dataset", "iemocap", "--data-root", str(tmp_path), "--extractors", "logmel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imer features: iemocap:")
    assert "dialog/EmoEvaluation/<dialog>.txt" in err and "Session1/, notes.txt" in err
    assert imer(["features", "--dataset", "mosi", "--data-root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "OpinionLevelSentiment.csv" in err


def test_make_features_from_an_iemocap_tree(tmp_path, capsys):
    """`make features DATASET=iemocap DATA_ROOT=...`: manifest from the raw layout, then features."""
    root, rows = make_iemocap(tmp_path, sessions=(1, 2))
    assert imer(["features", "--dataset", "iemocap", "--data-root", str(root.parent), "--extractors", "logmel",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    n = sum(r["emotion"] in ("neu", "hap", "exc", "ang", "sad") for r in rows)
    assert f"{n} utterances" in out and "failed 0" in out
    assert imer(["manifest", "--dataset", "iemocap", "--show"]) == 0
    out = capsys.readouterr().out
    assert f"{n} utterances" in out and "with media: audio 20, video 20, text 20" in out
    assert "folds-mmin10 (4 folds" in out and "folds-loso5 (2 folds" in out and "speakers (4)" in out


def test_manifest_command_on_a_mosi_tree(tmp_path, capsys):
    vids = {_cmu_std_folds.MOSI["train"][0]: [1.0, -2.0], _cmu_std_folds.MOSI["test"][0]: [0.0]}
    root = make_mosi(tmp_path, vids)
    assert imer(["manifest", "--dataset", "cmu-mosi", "--data-root", str(root)]) == 0  # alias
    out = capsys.readouterr().out
    assert "3 utterances" in out and "values: n=3 min=-2.000 max=1.000" in out
    assert "folds-standard (1 folds; train/val/test):\n  standard: 2/0/1" in out
    assert datasets.manifest_dir("cmu-mosi") == datasets.manifest_dir("mosi")
