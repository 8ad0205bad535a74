import json
from collections import Counter

import pytest
from fixtures_corpora import video, wav

from manifests import datasets, own
from manifests.schema import ManifestError, read_folds, read_manifest
from pipeline.cli import main as imer


def _corpus(tmp_path, speakers=True, n=24):
    media = tmp_path / "media"
    rows = ["id,audio,video,text,label,speaker,video_side,mood"]
    for i in range(n):
        wav(media / f"u{i}.wav", 0.05)
        if i % 3 == 0:
            video(media / f"u{i}.mp4", frames=2)
        spk = f"s{i % 6}" if speakers else ""
        vid = f"media/u{i}.mp4" if i % 3 == 0 else ""
        side = "left" if i % 3 == 0 else ""
        rows.append(f"u{i},media/u{i}.wav,{vid},text {i},{'abc'[i % 3]},{spk},{side},m{i}")
    src = tmp_path / "corpus.csv"
    src.write_text("\n".join(rows) + "\n")
    return src


def test_csv_conversion(tmp_path):
    src = _corpus(tmp_path)
    m = read_manifest(own.build(None, tmp_path / "out", source=src))
    assert len(m) == 24 and m.labels == ["a", "b", "c"]
    u = m.by_id()["u3"]
    assert u.audio.path == str(tmp_path / "media/u3.wav") and u.video.path == str(tmp_path / "media/u3.mp4")
    assert u.video.side == "left" and u.text == "text 3" and u.label == "a" and u.label_index == 0
    assert u.speaker == "s3" and u.extra == {"mood": "m3"}
    assert m.by_id()["u4"].video is None


def test_speaker_independent_kfold(tmp_path):
    src = _corpus(tmp_path)
    out = tmp_path / "out"
    m = read_manifest(own.build(None, out, source=src, k=3, seed=1))
    spk = {u.id: u.speaker for u in m}
    _, folds = read_folds(out / "folds-kfold.json")
    assert len(folds) == 3
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == set(spk) and sum(map(len, tests)) == len(spk)  # a partition
    for i, f in enumerate(folds):
        assert set(f.val) == tests[(i + 1) % 3]
        assert {spk[x] for x in f.test}.isdisjoint({spk[x] for x in f.train + f.val})
        assert sorted(f.train + f.val + f.test) == sorted(spk)


def test_stratified_kfold_without_speakers_is_seeded(tmp_path):
    src = _corpus(tmp_path, speakers=False)
    a = tmp_path / "a"
    m = read_manifest(own.build(None, a, source=src, k=4, seed=7))
    _, f1 = read_folds(a / "folds-kfold.json")
    lab = {u.id: u.label for u in m}
    for f in f1:  # 8 per class over 4 folds -> 2 per class in every test part
        assert Counter(lab[x] for x in f.test) == {"a": 2, "b": 2, "c": 2}
    b = tmp_path / "b"
    own.build(None, b, source=src, k=4, seed=7)
    assert read_folds(b / "folds-kfold.json")[1] == f1
    c = tmp_path / "c"
    own.build(None, c, source=src, k=4, seed=8)
    assert read_folds(c / "folds-kfold.json")[1] != f1


def test_jsonl_with_media_objects_and_values(tmp_path):
    wav(tmp_path / "x.wav", 0.05)
    src = tmp_path / "list.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in [
        {"id": f"x{i}", "audio": {"path": "x.wav", "start": 0.0, "end": 0.04}, "value": i / 2 - 1}
        for i in range(5)]) + "\n")
    m = read_manifest(own.build(None, tmp_path / "o", source=src, k=5))
    assert m.labels is None and [u.value for u in m] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert m.by_id()["x0"].audio.end == 0.04


@pytest.mark.parametrize("text,match", [
    ("audio,label\nx.wav,a\n", r"corpus\.csv:1: header has no 'id' column"),
    ("id,audio\nu1,nope.wav\n", r"corpus\.csv:2: audio file 'nope.wav' not found"),
    ("id,label\nu1,a\nu1,b\n", r"corpus\.csv:3: duplicate id 'u1' \(first on line 2\)"),
    ("id,value\nu1,high\n", r"corpus\.csv:2: value must be a number"),
    ("id,label\n,a\n", r"corpus\.csv:2: empty id"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, match):
    src = tmp_path / "corpus.csv"
    src.write_text(text)
    with pytest.raises(ManifestError, match=match):
        own.build(None, tmp_path / "out", source=src)


def test_too_few_speakers(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text("id,label,speaker\n" + "".join(f"u{i},a,s{i % 2}\n" for i in range(6)))
    with pytest.raises(ManifestError, match="only 2 speakers"):
        own.build(None, tmp_path / "out", source=src)


def test_load_manifest_converts_own_file_and_cli_prints_counts(tmp_path, capsys):
    src = _corpus(tmp_path)
    m = datasets.load_manifest("own", manifest=src)
    assert len(m) == 24 and m.path == datasets.manifest_dir("own") / "manifest.jsonl"
    proto, folds = datasets.load_folds("own")
    assert proto == "kfold" and len(folds) == 5
    assert imer(["manifest", "--dataset", "own", "--manifest", str(src), "--folds-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "24 utterances" in out and "labels: a 8, b 8, c 8" in out and "speakers (6)" in out
    assert "folds-kfold (3 folds" in out
    assert len(datasets.load_folds("own")[1]) == 3


def test_cli_reports_bad_root(tmp_path, capsys):
    (tmp_path / "something").mkdir()
    assert imer(["manifest", "--dataset", "msp-improv", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Evaluation.txt" in err and "something/" in err
