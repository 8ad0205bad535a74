from collections import Counter

import pytest
from fixtures_corpora import make_msp

from manifests import msp_improv
from manifests.schema import ManifestError, read_folds, read_manifest

LET = {"A": "ang", "H": "hap", "N": "neu", "S": "sad"}


def expected(rows):
    return {r["id"]: r for r in rows
            if r["scenario"] == "S" and r["letter"] in LET and r["seconds"] >= 1.0}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("msp")
    root, rows = make_msp(base, sessions=(1, 2, 3))
    out = tmp_path_factory.mktemp("msp-out")
    return root, rows, out, read_manifest(msp_improv.build(base, out))


def test_subset_and_fields(built):
    root, rows, out, m = built
    want = expected(rows)
    assert set(m.by_id()) == set(want)
    assert "MSP-IMPROV-S03S-F01-S-FM03" not in m.by_id()  # 0.6 s
    assert "MSP-IMPROV-S04N-M01-S-MF04" in m.by_id()  # exactly 1.0 s
    assert Counter(u.label for u in m) == Counter(LET[r["letter"]] for r in want.values())
    for u in m:
        r = want[u.id]
        assert u.speaker == f"{r['gender']}0{r['session']}" and u.session == str(r["session"])
        assert m.labels[u.label_index] == u.label == LET[r["letter"]]
        assert u.text == f"text of {u.id}"
        assert u.audio.path.endswith(f"Audio/session{r['session']}/{u.id[11:15]}/S/{u.id}.wav")
        assert u.video.path.endswith(f"Video/session{r['session']}/{u.id[11:15]}/S/{u.id}.avi")
        assert u.extra["turn"] == r["turn"] and abs(u.extra["duration"] - r["seconds"]) < 1e-3
        assert u.extra["avdn"] == [3.0, None, 2.5, 4.0]


def test_mmin12_and_loso6_folds(built):
    _, _, out, m = built
    by = m.by_id()
    _, folds = read_folds(out / "folds-mmin12.json")
    assert [f.name for f in folds] == [str(i) for i in range(1, 7)]
    for f in folds:
        cv = int(f.name)
        k = (cv + 1) // 2
        assert {by[i].speaker for i in f.val} == {f"M0{k}" if cv % 2 else f"F0{k}"}
        assert {by[i].speaker for i in f.test} == {f"F0{k}" if cv % 2 else f"M0{k}"}
        assert str(k) not in {by[i].session for i in f.train}
    _, loso = read_folds(out / "folds-loso6.json")
    for f in loso:
        assert {by[i].session for i in f.test} == {f.name}
        assert {by[i].speaker for i in f.test} == {f"F0{f.name}", f"M0{f.name}"}
        assert not {by[i].speaker for i in f.test} & {by[i].speaker for i in f.train + f.val}


def test_misspelt_label_file_is_accepted(tmp_path):
    root, rows = make_msp(tmp_path, sessions=(1, 2), label_name="Evalution.txt")
    m = read_manifest(msp_improv.build(root, tmp_path / "out"))
    assert set(m.by_id()) == set(expected(rows))


def test_malformed_label_line(tmp_path):
    root, _ = make_msp(tmp_path, sessions=(1, 2))
    ev = root / "Evaluation.txt"
    lines = ev.read_text().splitlines(keepends=True)
    lines[4] = lines[4].replace("; D:2.5 ;", "; D:high ;")
    ev.write_text("".join(lines))
    with pytest.raises(ManifestError, match=r"Evaluation\.txt:5: malformed label line"):
        msp_improv.build(root, tmp_path / "out")


def test_unknown_consensus_letter(tmp_path):
    root, _ = make_msp(tmp_path, sessions=(1, 2))
    ev = root / "Evaluation.txt"
    ev.write_text(ev.read_text().replace("FM01.avi; A;", "FM01.avi; Q;", 1))
    with pytest.raises(ManifestError, match=r"Evaluation\.txt:1: unknown consensus label 'Q'"):
        msp_improv.build(root, tmp_path / "out")


def test_missing_layout(tmp_path):
    (tmp_path / "session1").mkdir()
    with pytest.raises(ManifestError) as e:
        msp_improv.build(tmp_path, tmp_path / "out")
    assert "Evaluation.txt" in str(e.value) and "session1/" in str(e.value)


def test_complete_corpus_stops_with_report(tmp_path, monkeypatch):
    root, rows = make_msp(tmp_path, sessions=range(1, 7))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ManifestError, match="counts differ") as e:
        msp_improv.build(root, out)
    assert "other-improvised" in str(e.value) and "3819" not in str(e.value)  # per-class numbers shown
    assert "1733" in (out / "count-report.txt").read_text()
    assert not (out / "manifest.jsonl").exists()
    # documented counts equal to the parsed ones: builds without a report
    per = {}
    for sc in "RTSP":
        c = Counter(LET[r["letter"]] for r in rows if r["scenario"] == sc and r["letter"] in LET)
        per[sc] = {"turns": sum(r["scenario"] == sc for r in rows), **{k: c.get(k, 0) for k in LET.values()}}
    monkeypatch.setattr(msp_improv, "DOCUMENTED_SCENARIOS", per)
    monkeypatch.setattr(msp_improv, "DOCUMENTED_SUBSET",
                        dict(Counter(LET[r["letter"]] for r in expected(rows).values())))
    m = read_manifest(msp_improv.build(root, out))
    assert len(m) == len(expected(rows)) and not (out / "count-report.txt").exists()
