"""Damaged feature stores (issue 19): a deleted, swapped, flipped or unreadable chunk is found by
`imer store verify` (naming the utterances), refused by `imer features` and by training, and
`imer store repair` recomputes only those utterances; old stores are upgraded once; a lowered
commit point is cleared by gc; stores that cannot be opened are one-line errors; two concurrent
extraction runs split the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from extract import base
from manifests.schema import Media, Utterance, write_manifest
from pipeline.cli import main
from pipeline.store import FeatureStore, StoreDamaged, StoreError, store_path
from stage_helpers import RmsStage

REPO = Path(__file__).resolve().parents[1]
SPEC = "test-faults-rms"
N = 6


@base.register
class _Rms(RmsStage):
    """Test-only audio stage: per 10 ms frame [mean, std, peak]; the silent first frames are invalid."""

    name = "test-faults-rms"
    masked = True


def _corpus(d: Path, dataset: str, n: int = N) -> Path:
    utts = []
    for i in range(n):
        p = d / f"u{i}.wav"
        if not p.exists():
            rng = np.random.default_rng(i)
            d.mkdir(parents=True, exist_ok=True)
            y = (0.2 * rng.standard_normal(3200 + 400 * i)).astype(np.float32)
            y[:320] = 0  # two silent frames: invalid in the mask
            sf.write(p, y, 16000)
        utts.append(Utterance(f"u{i}", dataset=dataset, label="ab"[i % 2], speaker=f"s{i % 3}", audio=Media(str(p))))
    return write_manifest(d / "manifest.jsonl", utts, dataset, ["a", "b"], root=d)


@pytest.fixture
def extracted(tmp_path, monkeypatch, capsys):
    """A store of 6 utterances in 16-frame chunks: (dataset, manifest, store path, reference)."""
    monkeypatch.setattr("pipeline.store._chunk_frames", lambda dim, itemsize: 16)
    ds = f"faults-{tmp_path.name}"[:40]
    man = _corpus(tmp_path / "corpus", ds)
    assert main(["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress", "--device", "cpu"]) == 0
    path = store_path(ds, base.create(SPEC).key)
    st = FeatureStore.open(path)
    ref = {u: (st[u].copy(), st.mask(u).copy(), st._entries[u].offset, st._entries[u].length) for u in st.ids()}
    capsys.readouterr()
    return ds, man, path, ref


def _in_chunk(ref, start, stop):
    return sorted(u for u, (_, _, o, n) in ref.items() if o < stop and start < o + n)


def _damage(path: Path, how: str, ref) -> list[str]:
    """Damage the store on disk; return the utterances that lose data."""
    c = lambda name, i: path / name / "c" / str(i) / ("0" if name == "data" else "")  # noqa: E731
    if how == "delete-data-chunk":
        c("data", 1).unlink()
        return _in_chunk(ref, 16, 32)
    if how == "delete-mask-chunk":
        (path / "mask" / "c" / "0").unlink()
        return sorted(ref)
    if how == "flip-64-bytes":
        p = c("data", 2)
        b = bytearray(p.read_bytes())
        mid = len(b) // 2
        b[mid:mid + 64] = bytes(x ^ 0x5A for x in b[mid:mid + 64])
        p.write_bytes(bytes(b))
        return _in_chunk(ref, 32, 48)
    if how == "garbage-header":
        p = c("data", 3)
        p.write_bytes(b"\xff" * 16 + p.read_bytes()[16:])
        return _in_chunk(ref, 48, 64)
    if how == "swap-chunks":  # two valid chunks exchanged: the chunk checksums pass, the utterance ones do not
        a, b = c("data", 1).read_bytes(), c("data", 2).read_bytes()
        c("data", 1).write_bytes(b)
        c("data", 2).write_bytes(a)
        return _in_chunk(ref, 16, 48)
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["delete-data-chunk", "delete-mask-chunk", "flip-64-bytes", "garbage-header",
                                 "swap-chunks"])
def test_damage_is_found_refused_and_repaired(extracted, how, capsys):
    ds, man, path, ref = extracted
    hurt = _damage(path, how, ref)
    assert hurt and len(hurt) <= len(ref)

    assert main(["store", "verify", str(path)]) == 1  # reads every chunk, no traceback
    out = capsys.readouterr().out
    assert f"{len(hurt)} utterance(s) do not match" in out and all(f"'{u}'" in out for u in hurt[:3])
    assert f"imer store repair {path}" in out

    argv = ["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress", "--device", "cpu"]
    assert main(argv) == 2  # not "cached"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged feature store" in err and f"imer store repair {path}" in err
    with pytest.raises(StoreDamaged):  # what training reads (MultimodalData.from_stores -> load)
        FeatureStore.open(path).load()
    with pytest.raises(StoreDamaged):
        from pipeline.runner import ensure_features

        ensure_features(ds, {"audio": SPEC}, manifest=man, device="cpu", progress=False)

    assert main(["store", "repair", str(path), "--manifest", str(man), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"computed {len(hurt)}, cached {len(ref) - len(hurt)}" in out and f"repaired {len(hurt)}" in out
    assert main(["store", "verify", str(path)]) == 0
    st = FeatureStore.open(path)
    assert st.n_entries == len(ref)  # compacted: no superseded damaged entries left
    for u, (x, m, _, _) in ref.items():
        np.testing.assert_array_equal(st[u], x)
        np.testing.assert_array_equal(st.mask(u), m)


def _write_format1(path: Path, feats: dict) -> None:
    """A store exactly as the code before issue 19 wrote it (format 1: no checksums, empty chunks skipped)."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    g = zarr.open_group(str(path), mode="w")
    lens = np.array([len(x) for x in feats.values()], np.int64)
    data = np.concatenate(list(feats.values())).astype(np.float32)
    d = g.create_array("data", shape=data.shape, chunks=(16, 3), dtype="float32", fill_value=0,
                       compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4))
    d[:] = data
    m = g.create_array("mask", shape=(len(data),), chunks=(256,), dtype=bool, fill_value=False,
                       compressors=ZstdCodec(level=3))
    m[:] = np.ones(len(data), bool)
    idx = g.create_group("index")
    cols = {"ids": np.array(list(feats), dtype=object), "fingerprints": np.array(["fp"] * len(feats), dtype=object),
            "notes": np.array(["{}"] * len(feats), dtype=object),
            "offsets": np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64), "lengths": lens,
            "status": np.zeros(len(feats), np.int8)}
    for k, v in cols.items():
        a = idx.create_array(k, shape=(len(v),), chunks=(4096,), dtype=str if v.dtype == object else v.dtype,
                             compressors=ZstdCodec(level=3))
        a[:] = v
    g.attrs.update({"dim": 3, "dtype": "float32", "chunk_frames": 16, "imer_store": 1, "generation": "g1",
                    "key": "old-000", "committed": {"entries": len(feats), "frames": int(lens.sum())}})


def test_old_store_is_upgraded_once(tmp_path, capsys):
    rng = np.random.default_rng(0)
    feats = {f"x{i}": rng.standard_normal((5 + 7 * i, 3)).astype(np.float32) for i in range(5)}
    _write_format1(tmp_path / "old", feats)
    st = FeatureStore.open(tmp_path / "old")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upgraded feature store" in err[0] and st.format == 2
    for u, x in feats.items():
        np.testing.assert_array_equal(st[u], x)
    assert st.verify() == [] and st.key == "old-000"
    FeatureStore.open(tmp_path / "old")
    assert capsys.readouterr().err == ""  # once
    # now protected: a deleted chunk is damage
    (tmp_path / "old" / "data" / "c" / "1" / "0").unlink()
    assert any("do not match" in p for p in FeatureStore.open(tmp_path / "old").verify())


def test_lowered_commit_point_is_cleared_by_gc(extracted, capsys):
    import zarr

    ds, man, path, ref = extracted
    g = zarr.open_group(str(path), mode="r+")
    com = dict(g.attrs["committed"])
    g.attrs["committed"] = {"entries": com["entries"] - 2, "frames": com["frames"]}
    assert main(["store", "verify", str(path)]) == 1
    assert "commit point says" in capsys.readouterr().out
    assert main(["store", "gc", str(path)]) == 0
    assert main(["store", "verify", str(path)]) == 0
    st = FeatureStore.open(path)
    assert len(st) == len(ref) - 2 and st.n_frames == sum(n for u, (_, _, _, n) in ref.items() if u in st)


def test_verify_unknown_dataset_is_an_error(capsys):
    assert main(["store", "verify", "--dataset", "nosuch"]) == 2
    assert "no feature stores for dataset 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["cut-zarr-json", "wrong-dim", "commit-past-arrays"])
def test_unopenable_store_is_one_line(extracted, how, capsys):
    ds, man, path, ref = extracted
    meta = path / "zarr.json"
    if how == "cut-zarr-json":
        meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2])
    else:
        doc = json.loads(meta.read_text())
        if how == "wrong-dim":
            doc["attributes"]["dim"] = 99
        else:
            doc["attributes"]["committed"]["frames"] += 10_000
        meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError):
        FeatureStore.open(path)
    argv = ["features", "--dataset", ds, "--manifest", str(man), "--extractors", SPEC, "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert main(["store", "verify", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    # imer train reaches the store through the same stage runner: one line too, not a traceback
    from manifests.datasets import manifest_dir
    from manifests.schema import Fold, write_folds

    ids = sorted(ref)
    write_folds(manifest_dir(ds) / "folds-k.json", [Fold("1", ids[2:], ids[:1], ids[1:2])], "k")
    assert main(["train", "--dataset", ds, "--manifest", str(man), "--method", "baseline", "--device", "cpu",
                 "--no-progress", "--set", f"features={{audio: {{name: {SPEC}}}}}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imer train: ") and str(path) in err


def test_concurrent_runs_split_the_work(tmp_path):
    """Two `run_features` processes started together on the same store extract each utterance once
    (before the per-batch claims, both extracted all of it and one threw its results away)."""
    man = _corpus(tmp_path / "corpus", "faults-conc", 8)  # a dataset (store) of its own
    code = ("import sys, time, pathlib; sys.path.insert(0, sys.argv[2]); from test_runner import Frames; "
            "from manifests.schema import read_manifest; from pipeline.runner import run_features; "
            "import pipeline.store, zarr, filelock, tqdm.auto; "  # imported before the barrier
            "d = pathlib.Path(sys.argv[3]); (d / str(time.time())).touch(); "
            "[time.sleep(0.01) for _ in iter(lambda: len(list(d.iterdir())) < 2, False)]; "
            "[s] = run_features(read_manifest(sys.argv[1]), [Frames()], progress=False); "
            "print(s.computed, s.cached, len(Frames.calls))")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "IMER_TEST_SLEEP": "0.4", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(man), str(REPO / "tests"), str(barrier)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    counts = [tuple(map(int, o.strip().split())) for o, _ in outs]
    assert sum(c[0] for c in counts) == 8 and sum(c[1] for c in counts) == 8, counts
    assert sum(c[2] for c in counts) == 8, counts  # utterances extracted: each once, not once per run
    assert all(c[2] > 0 for c in counts), counts  # both did part of it
