from collections import Counter

import pytest

from manifests import iemocap
from manifests.schema import ManifestError, read_folds, read_manifest
from fixtures_corpora import make_iemocap

MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("iemocap")
    root, rows = make_iemocap(base, sessions=(1, 2, 3))
    out = tmp_path_factory.mktemp("iemocap-out")
    path = iemocap.build(base, out)  # the parent of IEMOCAP_full_release is accepted too
    return root, rows, out, read_manifest(path)


def test_manifest_matches_fixture(built):
    root, rows, out, m = built
    want = {r["id"]: r for r in rows if r["emotion"] in MAP}
    assert set(m.by_id()) == set(want)  # xxx, fru, oth, sur dropped
    assert m.labels == ["ang", "hap", "neu", "sad"]
    assert Counter(u.label for u in m) == Counter(MAP[r["emotion"]] for r in want.values())
    for u in m:
        r = want[u.id]
        assert u.label == MAP[r["emotion"]] and m.labels[u.label_index] == u.label
        assert u.extra["emotion"] == r["emotion"]
        assert u.speaker == r["speaker"] and u.session == str(r["session"])
        assert u.text == r["text"]
        assert u.audio.path == str(root / f"Session{r['session']}/sentences/wav/{r['dialog']}/{u.id}.wav")
        assert u.video.path == str(root / f"Session{r['session']}/dialog/avi/DivX/{r['dialog']}.avi")
        assert (u.video.start, u.video.end) == (r["start"], r["end"])
        # the marker-wearing actor (dialogue name char 5) sits on the left
        assert u.video.side == ("left" if r["speaker"][-1] == r["marker"] else "right")


def test_side_examples(built):
    m = built[3].by_id()
    assert m["Ses01F_impro01_F000"].video.side == "left"
    assert m["Ses01F_impro01_M000"].video.side == "right"
    assert m["Ses01M_script01_1_F000"].video.side == "right"
    assert m["Ses01M_script01_1_M000"].video.side == "left"


def test_mmin10_and_loso5_folds(built):
    _, _, out, m = built
    by = m.by_id()
    proto, folds = read_folds(out / "folds-mmin10.json")
    assert proto == "mmin10" and [f.name for f in folds] == [str(i) for i in range(1, 7)]
    for f in folds:
        s = str((int(f.name) + 1) // 2)
        val_spk, test_spk = {by[i].speaker for i in f.val}, {by[i].speaker for i in f.test}
        assert val_spk == {f"Ses0{s}M" if int(f.name) % 2 else f"Ses0{s}F"}
        assert test_spk == {f"Ses0{s}F" if int(f.name) % 2 else f"Ses0{s}M"}
        assert {by[i].session for i in f.train} == {"1", "2", "3"} - {s}
        assert sorted(f.train + f.val + f.test) == sorted(by)
    _, loso = read_folds(out / "folds-loso5.json")
    assert len(loso) == 3
    for f in loso:
        assert {by[i].session for i in f.test} == {f.name}
        assert f.name not in {by[i].session for i in f.train + f.val}
        assert not set(f.train) & set(f.val) and len(f.val) >= 1
        assert sorted(f.train + f.val + f.test) == sorted(by)


def test_malformed_label_line_names_file_and_line(tmp_path):
    root, _ = make_iemocap(tmp_path, sessions=(1, 2), media=False)
    ev = root / "Session2/dialog/EmoEvaluation/Ses02F_impro01.txt"
    lines = ev.read_text().splitlines(keepends=True)
    lines[7] = "[7.7500 - 8.7500]\tSes02F_impro01_M000\thap\n"  # VAD part missing
    ev.write_text("".join(lines))
    with pytest.raises(ManifestError, match=r"Ses02F_impro01\.txt:8: unrecognised line"):
        iemocap.build(root, tmp_path / "out")


def test_malformed_transcription_line(tmp_path):
    root, _ = make_iemocap(tmp_path, sessions=(1, 2), media=False)
    tr = root / "Session1/dialog/transcriptions/Ses01F_impro01.txt"
    tr.write_text(tr.read_text().replace("Ses01F_impro01_F001 [", "Ses01F_impro01_F001 ("))
    with pytest.raises(ManifestError, match=r"Ses01F_impro01\.txt:\d+: malformed transcription"):
        iemocap.build(root, tmp_path / "out")


def test_missing_media_kept_without_modality(tmp_path):
    root, _ = make_iemocap(tmp_path, sessions=(1, 2), media=False)
    m = read_manifest(iemocap.build(root, tmp_path / "out"))
    assert len(m) == 2 * 9 + 2 and all(u.audio is None and u.video is None and u.text for u in m)


def test_wrong_root_lists_what_was_found(tmp_path):
    (tmp_path / "Sessions").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ManifestError) as e:
        iemocap.build(tmp_path, tmp_path / "out")
    msg = str(e.value)
    assert "Session1..Session5" in msg and "readme.txt" in msg and "Sessions/" in msg
    with pytest.raises(ManifestError, match="--data-root"):
        iemocap.build(None, tmp_path / "out")


def test_complete_corpus_is_held_to_documented_counts(tmp_path, monkeypatch):
    root, rows = make_iemocap(tmp_path, sessions=(1, 2, 3, 4, 5), media=False)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ManifestError, match="counts differ"):
        iemocap.build(root, out)
    report = (out / "count-report.txt").read_text()
    assert "xxx" in report and "2507" in report
    # accepted once -> remembered for later rebuilds of the same corpus
    iemocap.build(root, out, accept_counts=True)
    iemocap.build(root, out)
    # a corpus whose counts are the documented ones passes without the report
    found = Counter(r["emotion"] for r in rows)
    monkeypatch.setattr(iemocap, "DOCUMENTED_ALL", dict(found))
    monkeypatch.setattr(iemocap, "DOCUMENTED_4", dict(Counter(MAP[e] for e in found.elements() if e in MAP)))
    iemocap.build(root, out)
    assert not (out / "count-report.txt").exists()


def test_crlf_and_trailing_blanks_parse_the_same(tmp_path):
    root, _ = make_iemocap(tmp_path, sessions=(1, 2), media=False)
    want = read_manifest(iemocap.build(root, tmp_path / "a")).by_id()
    for sub in ("EmoEvaluation", "transcriptions"):
        p = root / "Session2/dialog" / sub / "Ses02F_impro01.txt"
        p.write_bytes(p.read_bytes().replace(b"\n", b" \r\n"))
    got = read_manifest(iemocap.build(root, tmp_path / "b")).by_id()
    assert {k: (u.label, u.text, u.video) for k, u in got.items()} == {k: (u.label, u.text, u.video) for k, u in want.items()}
