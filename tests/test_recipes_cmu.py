import json

import pytest
from fixtures_corpora import make_mosei, make_mosi

from manifests import _cmu_std_folds, mosei, mosi
from manifests.schema import ManifestError, read_folds, read_manifest

MOSI_VIDEOS = {
    _cmu_std_folds.MOSI["train"][0]: [1.4, -0.6, 0.0],
    _cmu_std_folds.MOSI["train"][1]: [2.8],
    _cmu_std_folds.MOSI["valid"][0]: [-3.0, 0.2],
    _cmu_std_folds.MOSI["test"][0]: [3.0],
    "notInAnySplit": [0.4],
}


def test_embedded_sdk_lists():
    for corpus, sizes in ((_cmu_std_folds.MOSI, (52, 10, 31)), (_cmu_std_folds.MOSEI, (2250, 300, 678))):
        parts = [set(corpus[s]) for s in ("train", "valid", "test")]
        assert tuple(len(p) for p in parts) == sizes == tuple(len(corpus[s]) for s in ("train", "valid", "test"))
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_mosi_manifest_and_standard_fold(tmp_path, capsys):
    root = make_mosi(tmp_path, MOSI_VIDEOS)
    out = tmp_path / "out"
    out.mkdir()
    m = read_manifest(mosi.build(root, out))
    want = {f"{v}_{i}": (v, i, y) for v, ys in MOSI_VIDEOS.items() for i, y in enumerate(ys, 1)}
    assert set(m.by_id()) == set(want) and m.labels is None
    for u in m:
        vid, seg, y = want[u.id]
        assert u.value == y and u.label is None and u.speaker is None and u.session == vid
        assert u.text == f"segment {seg} of {vid}"
        assert u.audio.path == str(root / "Raw/Audio/WAV_16000/Segmented" / f"{u.id}.wav")
        assert u.video.path == str(root / "Raw/Video/Segmented" / f"{u.id}.mp4")
    proto, (fold,) = read_folds(out / "folds-standard.json")
    assert proto == "standard" and fold.name == "standard"
    split = {v: s for s in ("train", "valid", "test") for v in _cmu_std_folds.MOSI[s]}
    assert sorted(fold.train) == sorted(i for i, (v, _, _) in want.items() if split.get(v) == "train")
    assert sorted(fold.val) == sorted(i for i, (v, _, _) in want.items() if split.get(v) == "valid")
    assert sorted(fold.test) == sorted(i for i, (v, _, _) in want.items() if split.get(v) == "test")
    assert "1 utterances belong to videos outside the standard splits" in capsys.readouterr().out


def test_mosi_user_split_file(tmp_path):
    root = make_mosi(tmp_path, MOSI_VIDEOS)
    vids = list(MOSI_VIDEOS)
    sp = tmp_path / "splits.json"
    sp.write_text(json.dumps({"train": vids[:3], "valid": [vids[3]], "test": [vids[4]]}))
    mosi.build(root / "Raw", tmp_path, splits=sp)  # Raw/ itself is accepted as the root too
    _, (fold,) = read_folds(tmp_path / "folds-standard.json")
    assert fold.test == ["notInAnySplit_1"] and len(fold.train) == 6
    sp.write_text(json.dumps({"train": vids}))
    with pytest.raises(ManifestError, match="bad split file"):
        mosi.build(root, tmp_path, splits=sp)


@pytest.mark.parametrize("bad,match", [
    ("2.0,3.5,vid,1", "expected 5 fields"),
    ("2.0,3.5,vid,one,1.0", "not numbers"),
    ("2.0,3.5,vid,1,3.5", r"sentiment 3.5 outside \[-3, 3\]"),
])
def test_mosi_malformed_label_rows(tmp_path, bad, match):
    root = make_mosi(tmp_path, {"vid": [0.5, 1.0]})
    csv = root / "Raw/Labels/OpinionLevelSentiment.csv"
    csv.write_text(csv.read_text() + bad + "\n")
    with pytest.raises(ManifestError, match=rf"OpinionLevelSentiment\.csv:3: {match}"):
        mosi.build(root, tmp_path)


def test_mosi_malformed_transcript(tmp_path):
    root = make_mosi(tmp_path, {"vid": [0.5]})
    (root / "Raw/Transcript/Segmented/vid.annotprocessed").write_text("1_DELIM_ok\nno delimiter here\n")
    with pytest.raises(ManifestError, match=r"vid\.annotprocessed:2: malformed transcript line"):
        mosi.build(root, tmp_path)


def test_mosi_wrong_root(tmp_path):
    (tmp_path / "Audio").mkdir()
    with pytest.raises(ManifestError) as e:
        mosi.build(tmp_path, tmp_path)
    assert "OpinionLevelSentiment.csv" in str(e.value) and "Audio/" in str(e.value)


MOSEI_VIDEOS = {
    _cmu_std_folds.MOSEI["train"][0]: [0.6667, -1.0],
    _cmu_std_folds.MOSEI["valid"][0]: [2.0],
    _cmu_std_folds.MOSEI["test"][0]: [-2.3333, 0.0, 1.0],
}


def test_mosei_labels_from_csd(tmp_path):
    root = make_mosei(tmp_path, MOSEI_VIDEOS, csd_offset=0.01)
    m = read_manifest(mosei.build(root, tmp_path))
    want = {f"{v}_{i}": y for v, ys in MOSEI_VIDEOS.items() for i, y in enumerate(ys)}
    assert set(m.by_id()) == set(want)
    for u in m:
        assert u.value == pytest.approx(want[u.id], abs=1e-6)
        assert u.video.path == u.audio.path == str(root / "Videos/Segmented/Combined" / f"{u.id}.mp4")
        assert u.text == f"words of segment {u.extra['segment']}"
    _, (fold,) = read_folds(tmp_path / "folds-standard.json")
    assert (len(fold.train), len(fold.val), len(fold.test)) == (2, 1, 3)


def test_mosei_intervals_too_far_are_not_matched(tmp_path, capsys):
    root = make_mosei(tmp_path, MOSEI_VIDEOS, csd_offset=0.5)
    with pytest.raises(ManifestError, match="no labelled segments"):
        mosei.build(root, tmp_path)
    assert "6 transcript segments have no label" in capsys.readouterr().out


def test_mosei_label_csv_and_malformed_transcript(tmp_path):
    root = make_mosei(tmp_path, MOSEI_VIDEOS)
    vids = list(MOSEI_VIDEOS)
    labels = tmp_path / "labels.csv"
    labels.write_text("".join(f"0.5,2.25,{v},0,{0.5 * i}\n" for i, v in enumerate(vids)))
    m = read_manifest(mosei.build(root, tmp_path, labels=labels))
    assert sorted((u.id, u.value) for u in m) == sorted((f"{v}_0", 0.5 * i) for i, v in enumerate(vids))
    vid = vids[0]
    t = root / "Transcript/Segmented/Combined" / f"{vid}.txt"
    t.write_text(t.read_text() + f"{vid}___2___x___4.0___text\n")
    with pytest.raises(ManifestError, match=rf"{vid}\.txt:3: malformed line"):
        mosei.build(root, tmp_path)


def test_mosei_without_labels_says_what_to_pass(tmp_path):
    root = make_mosei(tmp_path, MOSEI_VIDEOS)
    (root / "Labels/CMU_MOSEI_LabelsSentiment.csd").unlink()
    with pytest.raises(ManifestError, match=r"Labels.*\*\.csd.*--labels FILE"):
        mosei.build(root, tmp_path)
