"""The planning scan of `imer features` / `imer train` costs O(metadata) (issue 42 item 5): an
unchanged store is not read at all, a chunk file whose size or mtime changed since its commit is
read again and its damage refused, and what the record cannot see is still refused on load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from extract import base
from manifests.schema import Media, Utterance, write_manifest
from pipeline.cli import main
from pipeline.store import FeatureStore, StoreDamaged, store_path
from pipeline.store_integrity import CHUNK_RECORD, StoreChecks
from stage_helpers import RmsStage

SPEC = "test-scan-rms"


@base.register
class _Rms(RmsStage):
    """Test-only audio stage: per 10 ms frame [mean, std, peak]."""

    name = SPEC


def _age(path: Path, seconds: float = 60) -> None:
    """Every chunk file written ``seconds`` ago, then one full read renews the record (as a store
    extracted a while ago and verified since)."""
    for f in list((path / "data").rglob("*")) + list((path / "mask").rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))
    assert FeatureStore.open(path).damaged() == {}


def _chunk(path: Path, i: int) -> Path:
    return path / "data" / "c" / str(i) / "0"


@pytest.fixture
def extracted(tmp_path, monkeypatch, capsys):
    """8 utterances in 16-frame chunks, extracted through the CLI: (argv, store path, {id: (offset, length)})."""
    monkeypatch.setattr("pipeline.store._chunk_frames", lambda dim, itemsize: 16)
    ds = f"scan-{tmp_path.name}"[:40]
    d = tmp_path / "corpus"
    d.mkdir()
    utts = []
    for i in range(8):
        sf.write(d / f"u{i}.wav", (0.2 * np.random.default_rng(i).standard_normal(2400 + 320 * i)).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", dataset=ds, label="ab"[i % 2], speaker=f"s{i % 2}", audio=Media(str(d / f"u{i}.wav"))))
    man = write_manifest(d / "manifest.jsonl", utts, ds, ["a", "b"], root=d)
    argv = ["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    path = store_path(ds, base.create(SPEC).key)
    st = FeatureStore.open(path)
    spans = {u: (st._entries[u].offset, st._entries[u].length) for u in st.ids()}
    assert st.n_frames > 4 * 16  # several chunks
    capsys.readouterr()
    return argv, path, spans


def _no_reads(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the planning scan read frames of an unchanged store")

    monkeypatch.setattr(StoreChecks, "_read_window", fail)


def test_a_commit_records_its_chunks_and_a_noop_run_reads_nothing(extracted, monkeypatch, capsys):
    argv, path, _ = extracted
    rec = json.loads((path / CHUNK_RECORD).read_text())
    st = FeatureStore.open(path)
    n = -(-st.n_frames // 16)
    assert rec["generation"] == st.attrs["generation"]
    assert {f"data/{i}" for i in range(n)} <= set(rec["chunks"])  # every commit recorded what it wrote
    assert rec["chunks"]["data/0"] == [_chunk(path, 0).stat().st_size, _chunk(path, 0).stat().st_mtime_ns]
    _age(path)
    _no_reads(monkeypatch)
    assert FeatureStore.open(path).damaged_changed() == {}
    assert main(argv) == 0  # the no-op rerun: planned without reading a frame
    assert "cached 8" in capsys.readouterr().out


def test_right_after_a_commit_only_its_recent_chunks_are_read_again(extracted, monkeypatch):
    """Chunks written within the mtime clock's tick of the record are read once more (a change in
    the same tick would keep size and mtime); older ones are not."""
    _, path, _ = extracted
    _age(path)
    st = FeatureStore.open(path)
    last = -(-st.n_frames // 16) - 1
    os.utime(_chunk(path, last))  # rewritten just now, same size and content: racy, read again
    read = []
    orig = StoreChecks._read_window
    monkeypatch.setattr(StoreChecks, "_read_window", lambda self, name, s, t, bad: read.append((name, s, t)) or orig(self, name, s, t, bad))
    assert st.damaged_changed() == {}
    lo = min(s for n, s, _ in read if n == "data")
    assert read and lo > 0 and lo >= (last - 1) * 16  # only the utterances over the last chunk


@pytest.mark.parametrize("how", ["flip-bytes", "truncate", "delete"])
def test_a_chunk_changed_after_its_commit_is_read_and_refused(extracted, how, capsys):
    argv, path, spans = extracted
    _age(path)
    p = _chunk(path, 2)
    b = bytearray(p.read_bytes())
    if how == "flip-bytes":  # same size, new mtime
        b[len(b) // 2:len(b) // 2 + 8] = bytes(x ^ 0x5A for x in b[len(b) // 2:len(b) // 2 + 8])
        p.write_bytes(bytes(b))
    elif how == "truncate":  # new size, the old mtime put back
        st = p.stat()
        p.write_bytes(bytes(b[:-4]))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        p.unlink()
    hurt = sorted(u for u, (o, n) in spans.items() if o < 48 and 32 < o + n)
    assert set(FeatureStore.open(path).damaged_changed()) == set(hurt)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "damaged feature store" in err and f"{len(hurt)} utterance(s)" in err


def test_what_the_record_cannot_see_is_refused_on_load(extracted):
    """A chunk rewritten with its size and mtime put back passes the planning scan; every read
    for training still compares each utterance with its checksum."""
    _, path, spans = extracted
    _age(path)
    a, b = _chunk(path, 1), _chunk(path, 2)
    sa, sb = a.stat(), b.stat()
    da, db = a.read_bytes(), b.read_bytes()
    if len(da) != len(db):
        pytest.skip("chunks of different compressed sizes")  # the swap must keep sizes to be invisible
    a.write_bytes(db)
    b.write_bytes(da)
    os.utime(a, ns=(sa.st_atime_ns, sa.st_mtime_ns))
    os.utime(b, ns=(sb.st_atime_ns, sb.st_mtime_ns))
    st = FeatureStore.open(path)
    assert st.damaged_changed() == {}  # metadata unchanged: not read
    with pytest.raises(StoreDamaged):
        st.load()
    assert st.damaged()  # and `imer store verify` / the full read finds it


def test_a_store_without_a_record_is_read_once_then_recorded(extracted, monkeypatch):
    _, path, spans = extracted
    (path / CHUNK_RECORD).unlink()  # a store written before the record existed
    _age(path, 0)  # no-op on mtimes; the full read writes the record
    (path / CHUNK_RECORD).unlink()
    st = FeatureStore.open(path)
    read = []
    orig = StoreChecks._read_window
    monkeypatch.setattr(StoreChecks, "_read_window", lambda self, name, s, t, bad: read.append((name, s, t)) or orig(self, name, s, t, bad))
    assert st.damaged_changed() == {}
    assert sum(t - s for n, s, t in read if n == "data") == st.n_frames  # read through once
    assert (path / CHUNK_RECORD).is_file()


def test_a_change_in_the_records_own_clock_tick_is_read_again(extracted):
    """A chunk changed within the mtime clock's resolution of the record keeps the recorded size
    and mtime; being that close to the record, it is read again and the change caught."""
    _, path, spans = extracted
    _age(path)
    rec = json.loads((path / CHUNK_RECORD).read_text())["chunks"]
    p = _chunk(path, 2)
    b = bytearray(p.read_bytes())
    b[len(b) // 2:len(b) // 2 + 8] = bytes(x ^ 0x5A for x in b[len(b) // 2:len(b) // 2 + 8])
    p.write_bytes(bytes(b))
    size, mtime = rec["data/2"]
    assert p.stat().st_size == size
    os.utime(p, ns=(mtime, mtime))  # the recorded stat, as if written in the record's tick
    os.utime(path / CHUNK_RECORD, ns=(mtime + 10 ** 8, mtime + 10 ** 8))
    hurt = sorted(u for u, (o, n) in spans.items() if o < 48 and 32 < o + n)
    assert set(FeatureStore.open(path).damaged_changed()) == set(hurt)
