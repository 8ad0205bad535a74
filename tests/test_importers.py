"""Importers of released features (MMIN h5 + npy targets, MMSA pickles), tested on tiny files
written in the original formats (tests/fixtures_corpora.py), and training from an import."""

import json
import os
import pickle
from collections import Counter

import h5py
import numpy as np
import pytest
from fixtures_corpora import MMIN_LABELS, make_mmin, make_mmsa

from manifests import datasets
from manifests.importers import open_imported
from manifests.importers.mmin import import_mmin
from manifests.importers.mmsa import import_mmsa
from manifests.schema import ManifestError
from manifests.schema import ManifestError, read_folds, read_manifest
from pipeline.cli import main as imer

NO_FACE = ("Ses01F_impro01_F000", "Ses03F_impro02_M001")
NO_TEXT = ("Ses02F_impro02_M001",)


# ---- MMIN ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mmin_iemocap(tmp_path_factory):
    root, labels = make_mmin(tmp_path_factory.mktemp("mmin"), "iemocap", no_face=NO_FACE, no_text=NO_TEXT)
    name, mapping = import_mmin(root, dataset="t-iemocap-mmin")
    return root, labels, name, mapping


def test_mmin_iemocap_manifest_and_folds(mmin_iemocap):
    root, labels, name, _ = mmin_iemocap
    m = read_manifest(datasets.manifest_dir(name) / "manifest.jsonl")
    assert m.labels == MMIN_LABELS == ["ang", "hap", "neu", "sad"]
    assert {u.id: u.label_index for u in m} == labels  # one-hot argmax, MMIN's class order
    for u in m:
        assert u.label == MMIN_LABELS[u.label_index]
        assert u.speaker == u.id[:5] + u.id[-4] and u.session == u.id[4]
        assert u.audio is None and u.video is None  # no raw media: features only
    assert datasets.protocols(name) == ["mmin10"]
    proto, folds = datasets.load_folds(name)
    assert proto == "mmin10" and [f.name for f in folds] == [str(i) for i in range(1, 11)]
    for f in folds:  # MMIN's own id lists, in their order
        d = root / "target" / f.name
        for part, split in ((f.train, "trn"), (f.val, "val"), (f.test, "tst")):
            assert part == [x[0].decode() for x in np.load(d / f"{split}_int2name.npy")]
        k = (int(f.name) + 1) // 2
        assert {i[:5] + i[-4] for i in f.val} | {i[:5] + i[-4] for i in f.test} == {f"Ses0{k}F", f"Ses0{k}M"}
    doc = json.loads((datasets.manifest_dir(name) / "dataset.json").read_text())
    assert doc["corpus"] == "iemocap" and doc["labels"] == dict(Counter(MMIN_LABELS[y] for y in labels.values()))


def test_mmin_iemocap_stores_hold_the_h5_values(mmin_iemocap):
    root, labels, name, mapping = mmin_iemocap
    stores = open_imported(name)
    assert set(stores) == {"audio", "video", "text"}
    assert json.loads((datasets.manifest_dir(name) / "features.json").read_text()) == mapping
    assert (stores["audio"].dim, stores["video"].dim, stores["text"].dim) == (130, 342, 1024)
    assert stores["audio"].frame_rate == 10.0 and stores["audio"].attrs["feature"] == "comparE"
    for modality, rel in (("audio", "A/comparE.h5"), ("video", "V/denseface.h5"), ("text", "L/bert_large.h5")):
        with h5py.File(root / rel, "r") as f:
            assert sorted(stores[modality].ids()) == sorted(f.keys())
            for uid in list(f.keys())[::7]:
                np.testing.assert_array_equal(stores[modality][uid], f[uid][()])
    # Denseface's single all-zero frame = no face: stored as an invalid frame
    for uid in labels:
        mask = stores["video"].mask(uid)
        assert mask.tolist() == ([False] if uid in NO_FACE else [True] * len(mask))
    assert NO_TEXT[0] not in stores["text"] and len(stores["text"]) == len(labels) - 1


def test_mmin_reimport_writes_nothing_new(mmin_iemocap):
    root, labels, name, mapping = mmin_iemocap
    _, again = import_mmin(root, dataset=name)
    assert all(e["written"] == 0 and e["key"] == mapping[m]["key"] for m, e in again.items())
    assert open_imported(name)["audio"].n_entries == len(labels)


def test_mmin_msp_improv(tmp_path):
    root, labels = make_mmin(tmp_path, "msp-improv", per_speaker=2, dims=(130, 12, 16))
    name, mapping = import_mmin(root, dataset="t-msp-mmin")  # 12 fold folders -> MSP-IMPROV
    m = read_manifest(datasets.manifest_dir(name) / "manifest.jsonl")
    assert {u.id: u.label_index for u in m} == labels
    assert {u.speaker for u in m} == {f"{g}0{k}" for g in "FM" for k in range(1, 7)}
    assert mapping["audio"]["feature"] == "comparE_raw" and mapping["audio"]["frame_rate"] == 100.0
    proto, folds = datasets.load_folds(name)
    assert proto == "mmin12" and len(folds) == 12
    spk = {u.id: u.speaker for u in m}
    for f in folds:
        k = (int(f.name) + 1) // 2
        assert {spk[i] for i in f.val} == {f"M0{k}" if int(f.name) % 2 else f"F0{k}"}
        assert {spk[i] for i in f.test} == {f"F0{k}" if int(f.name) % 2 else f"M0{k}"}
        assert f.test == np.load(root / "target" / f.name / "tst_int2name.npy").tolist()


def test_mmin_ids_saved_as_object_arrays(tmp_path, capsys, monkeypatch):
    """Id lists saved from Python lists of str are object arrays (pickled inside the .npy): read
    with the restricted unpickler; one that would run code is refused."""
    root, labels = make_mmin(tmp_path, "msp-improv", per_speaker=1, dims=(130, 8, 8),
                             no_text=("MSP-IMPROV-S01A-F02-S-FM01",))
    for p in (root / "target").glob("*/*_int2name.npy"):
        np.save(p, np.array(np.load(p).tolist(), dtype=object))
    assert np.load(root / "target/1/trn_int2name.npy", allow_pickle=True).dtype == object
    name, _ = import_mmin(root, dataset="t-msp-objects")
    assert {u.id: u.label_index for u in read_manifest(datasets.manifest_dir(name) / "manifest.jsonl")} == labels
    assert "bert_large.h5: 1 of the 12 utterances in target/ are not in this file (kept without text)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    np.save(root / "target/2/val_int2name.npy", np.array([_Evil()], dtype=object))
    with pytest.raises(ManifestError, match=r"2/val_int2name\.npy: not a readable \.npy file \(refusing to load"):
        import_mmin(root, dataset="t-msp-objects2")
    assert not (tmp_path / "PWNED").exists()


def test_imported_corpus_gets_its_corpus_settings(tmp_path):
    from train.config import load_config

    root, _ = make_mmin(tmp_path, "msp-improv", per_speaker=1, dims=(130, 8, 8))
    name, _ = import_mmin(root, dataset="t-msp-settings")
    assert datasets.corpus_of(name) == "msp-improv" and datasets.corpus_of("msp_improv") == "msp-improv"
    # MMIN selects and reports macro-F1 on MSP-IMPROV (train/configs/_base.yaml), imported or not
    assert load_config("baseline", name)["select"]["metric"] == load_config("baseline", "msp-improv")["select"]["metric"] == "f1"
    plain = load_config("baseline", "t-no-such-dataset")  # neither a recipe nor imported: no override
    assert plain == load_config("baseline") and "dataset_override" not in plain


def _break(root, what):
    t = root / "target"
    if what == "fold-missing":
        for p in (t / "10").iterdir():
            p.unlink()
        (t / "10").rmdir()
    elif what == "lengths":
        np.save(t / "3/val_label.npy", np.load(t / "3/val_label.npy")[:-1])
    elif what == "conflict":
        y = np.load(t / "4/trn_label.npy")
        np.save(t / "4/trn_label.npy", np.roll(y, 1, axis=1))
    elif what == "columns":
        np.save(t / "1/tst_label.npy", np.zeros((len(np.load(t / "1/tst_int2name.npy")), 7)))
    elif what == "no-video":
        (root / "V/denseface.h5").rename(root / "V/other.h5")
    elif what == "foreign-h5":
        with h5py.File(root / "L/bert_large.h5", "w") as f:
            f["somethingelse"] = np.zeros((2, 1024), np.float32)
    elif what == "bad-dim":
        with h5py.File(root / "A/comparE.h5", "a") as f:
            uid = sorted(f.keys())[3]
            del f[uid]
            f[uid] = np.zeros((4, 129), np.float32)
    elif what == "not-h5":
        (root / "V/denseface.h5").write_text("not hdf5")


@pytest.mark.parametrize("what,match", [
    ("fold-missing", r"target: expected fold folders 1\.\.10 for iemocap, found \[1, .*9\]|cannot tell IEMOCAP"),
    ("lengths", r"target/3: val_int2name has \d+ ids but val_label has \d+ labels"),
    ("conflict", r"4/trn_label\.npy: \S+ is labelled \w+ here but \w+ in another fold"),
    ("columns", r"1/tst_label\.npy: one-hot labels with 7 columns"),
    ("no-video", r"V/denseface\.h5: not found.*found: other\.h5.*--video NAME"),
    ("foreign-h5", r"L/bert_large\.h5: none of the \d+ utterance ids.*somethingelse"),
    ("bad-dim", r"A/comparE\.h5: Ses\S+ has shape \(4, 129\), other utterances have \(T, 130\)"),
    ("not-h5", r"V/denseface\.h5: not a readable HDF5 file"),
])
def test_mmin_bad_input_names_the_file(tmp_path, what, match):
    root, _ = make_mmin(tmp_path, "iemocap", per_speaker=1, dims=(130, 8, 8))
    _break(root, what)
    with pytest.raises(ManifestError, match=match):
        import_mmin(root, corpus="iemocap" if what == "fold-missing" else None, dataset=f"t-bad-{what}")


def test_mmin_wrong_root_lists_what_is_there(tmp_path, capsys):
    (tmp_path / "A").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert imer(["import-features", "--format", "mmin", "--source", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not an MMIN feature root" in err and "A, notes.txt" in err and "target/<cv>/" in err


def test_mmin_cli(tmp_path, capsys):
    root, labels = make_mmin(tmp_path, "iemocap", per_speaker=1, dims=(130, 8, 8))
    assert imer(["import-features", "--format", "mmin", "--source", str(root), "--name", "t-cli-mmin"]) == 0
    out = capsys.readouterr().out
    assert "imported as dataset 't-cli-mmin'" in out and f"audio  mmin-comparE-" in out
    assert f"{len(labels)} utterances, dim 130" in out and "folds: mmin10" in out
    for extra in (["--show"], []):  # nothing to rebuild from: both print the imported manifest
        assert imer(["manifest", "--dataset", "t-cli-mmin", *extra]) == 0
        out = capsys.readouterr().out
        assert f"{len(labels)} utterances" in out and "folds-mmin10 (10 folds" in out
    # no media behind imported features: `imer features` refuses in one line instead of failing per file
    assert imer(["features", "--dataset", "t-cli-mmin"]) == 2
    err = capsys.readouterr().err
    assert "holds imported features" in err and "imer train --dataset t-cli-mmin" in err


# ---- MMSA ------------------------------------------------------------------------------------------

def test_mmsa_aligned_mosi(tmp_path):
    pkl = tmp_path / "MOSI/Processed/aligned_50.pkl"
    data = make_mmsa(pkl, "mosi", aligned=True)
    name, mapping = import_mmsa(pkl, dataset="t-mosi-a50")  # (5, 20) dims -> MOSI
    m = read_manifest(datasets.manifest_dir(name) / "manifest.jsonl")
    assert m.labels is None
    stores = open_imported(name)
    assert (stores["audio"].dim, stores["video"].dim, stores["text"].dim) == (5, 20, 768)
    _, (fold,) = read_folds(datasets.manifest_dir(name) / "folds-standard.json")
    by = m.by_id()
    for split, part in (("train", fold.train), ("valid", fold.val), ("test", fold.test)):
        d = data[split]
        want = [i.replace("$_$", "_") for i in d["id"]]
        assert part == want
        for i, uid in enumerate(want):
            u = by[uid]
            assert u.value == pytest.approx(float(d["regression_labels"][i]))
            assert u.extra["mmsa_id"] == d["id"][i] and u.session == d["id"][i].split("$_$")[0]
            assert u.text == d["raw_text"][i] and u.extra["annotation"] == d["annotations"][i]
            audio = np.where(np.isfinite(d["audio"][i]), d["audio"][i], 0)  # COVAREP -inf -> 0
            np.testing.assert_array_equal(stores["audio"][uid], audio)
            np.testing.assert_array_equal(stores["video"][uid], d["vision"][i])  # all 50 steps
            np.testing.assert_array_equal(stores["text"][uid], d["text"][i])
            np.testing.assert_array_equal(stores["text"].mask(uid), d["text_bert"][i][1] > 0)
    first = data["train"]["id"][0].replace("$_$", "_")
    assert stores["audio"].info(first) == {"nonfinite_zeroed": 1}
    assert mapping["audio"]["utterances"] == sum(len(data[s]["id"]) for s in data)


def test_mmsa_unaligned_mosei_cut_to_lengths(tmp_path):
    pkl = tmp_path / "unaligned_50.pkl"
    data = make_mmsa(pkl, "mosei", aligned=False, sizes=(3, 2, 2))
    name, _ = import_mmsa(pkl, dataset="t-mosei-u50")
    assert json.loads((datasets.manifest_dir(name) / "dataset.json").read_text())["corpus"] == "mosei"
    stores = open_imported(name)
    for split in data:
        d = data[split]
        for i, raw in enumerate(d["id"]):
            uid = raw.replace("$_$", "_")
            assert stores["audio"][uid].shape == (d["audio_lengths"][i], 74)
            np.testing.assert_array_equal(stores["video"][uid], d["vision"][i][: d["vision_lengths"][i]])


def test_mmsa_pickle_from_numpy1(tmp_path):
    """Released pickles were written with numpy 1.x, whose arrays reference numpy.core.*."""
    pkl = tmp_path / "aligned_50.pkl"
    make_mmsa(pkl, "mosi", sizes=(2, 1, 1), protocol=2)
    np1 = pkl.read_bytes().replace(b"numpy._core.", b"numpy.core.")
    assert b"cnumpy.core.multiarray\n_reconstruct" in np1 and b"c_codecs\nencode" in np1
    pkl.write_bytes(np1)
    name, mapping = import_mmsa(pkl, dataset="t-mosi-np1")
    assert mapping["text"]["utterances"] == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_mmsa_refuses_code_in_pickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pkl = tmp_path / "aligned_50.pkl"
    pkl.write_bytes(pickle.dumps({"train": {"id": [_Evil()]}, "valid": {}, "test": {}}))
    with pytest.raises(ManifestError, match=r"aligned_50\.pkl: not an MMSA feature pickle \(refusing to load"):
        import_mmsa(pkl, dataset="t-evil")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("valid"), r"expected a dict with train/valid/test"),
    (lambda d: d["test"].pop("regression_labels"), r"split 'test' lacks \['regression_labels'\]"),
    (lambda d: d["train"].__setitem__("vision", d["train"]["vision"][:-1]), r"split 'train': vision has 2 rows for 3 ids"),
    (lambda d: d["test"].__setitem__("id", list(d["train"]["id"][:2])), r"id 'vidtrain0\$_\$1' appears in both train and test"),
    (lambda d: [d[s].__setitem__("audio", d[s]["audio"][..., :3]) for s in d], r"dims \(3, 20\).*pass --corpus"),
])
def test_mmsa_bad_pickles(tmp_path, edit, match):
    pkl = tmp_path / "aligned_50.pkl"
    data = make_mmsa(pkl, "mosi", sizes=(3, 2, 2))
    edit(data)
    pkl.write_bytes(pickle.dumps(data))
    with pytest.raises(ManifestError, match=match):
        import_mmsa(pkl, dataset="t-mmsa-bad")


def test_mmsa_cli(tmp_path, capsys):
    pkl = tmp_path / "aligned_50.pkl"
    make_mmsa(pkl, "mosi", sizes=(2, 1, 1))
    assert imer(["import-features", "--format", "mmsa", "--source", str(pkl), "--name", "t-cli-mmsa"]) == 0
    out = capsys.readouterr().out
    assert "imported as dataset 't-cli-mmsa'" in out and "text   mmsa-text-" in out and "folds: standard" in out
    assert imer(["import-features", "--format", "mmsa", "--source", str(tmp_path / "nope.pkl")]) == 2
    assert "nope.pkl: file not found" in capsys.readouterr().err


# ---- training from an import -----------------------------------------------------------------------

TINY = {"train.schedule": {"kind": "linear_decay", "constant": 3, "decay": 1}, "train.batch_size": 16,
        "train.optimizer.lr": 3.0e-3, "eval.conditions": ["a", "avt"], "seeds": [0]}


def test_model_trains_from_imported_mmin(tmp_path):
    """`imer train` on an imported MMIN dataset: no raw media, no extraction, the imported stores."""
    from train.run import train_method

    root, labels = make_mmin(tmp_path, "iemocap", per_speaker=4, dims=(130, 24, 32), no_face=("Ses01F_impro01_F000",))
    name, _ = import_mmin(root, dataset="t-train-mmin")
    run = train_method(name, "baseline", folds=["1"], device="cpu", results_dir=tmp_path / "results",
                       overrides=TINY, progress=False, log=lambda *a: None)
    res = json.loads((run / "folds/1/seed0/result.json").read_text())
    fold = datasets.load_folds(name)[1][0]
    assert res["n"] == {"train": len(fold.train), "val": len(fold.val), "test": len(fold.test)}
    assert res["epochs_run"] == 4 and set(res["test"]) == {"a", "avt"}
    meta = json.loads((run / "run.json").read_text())
    assert {m: f["key"] for m, f in meta["features"].items()} == {m: s.key for m, s in open_imported(name).items()}
    # the fixture's features are class-dependent: a trained model beats chance (0.25) by far
    assert res["test"]["avt"]["ua"] > 0.6
    # no extractor can reproduce imported features from media: predict says so in one line
    from train.predict import PredictError, predict

    assert {f.get("format") for f in meta["features"].values()} == {"mmin"}
    with pytest.raises(PredictError, match="imported mmin features"):
        predict(run, text="hello there")


def test_mmin_label_row_that_is_not_one_hot(tmp_path):
    from manifests.importers.mmin import _labels

    assert _labels(np.eye(4)[[2, 0]], tmp_path / "trn_label.npy") == [2, 0]
    with pytest.raises(ManifestError, match=r"trn_label.npy: row 1 is not one-hot"):
        _labels(np.array([[0, 1, 0, 0], [0, 0, 0, 0]]), tmp_path / "trn_label.npy")
