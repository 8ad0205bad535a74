"""Feature store: ragged round trip, index semantics, crash consistency, verify, gc, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from extract.base import Failure, Output
from pipeline.store import FeatureStore, StoreError, list_stores, store_path

ATTRS = {"extractor": "t", "key": "t-000", "modality": "audio", "frame_rate": 100.0, "dataset": "unit",
         "params": {"n": 1}}


def _ragged(seed=0, n=7, dim=5):
    rng = np.random.default_rng(seed)
    lens = [0, 1, 3, 17, 40, 2, 9][:n]
    feats = {f"utt{i:02d}": rng.standard_normal((L, dim)).astype(np.float32) for i, L in enumerate(lens)}
    masks = {u: rng.random(len(x)) > 0.3 for u, x in feats.items()}
    return feats, masks


def _new(tmp_path, name="s", dim=5, **kw) -> FeatureStore:
    return FeatureStore.open_or_create(tmp_path / name, dim=dim, attrs=ATTRS, **kw)


def test_ragged_round_trip(tmp_path):
    feats, masks = _ragged()
    st = _new(tmp_path, chunk_frames=8)  # several chunks, and chunks shared by utterances
    ids = list(feats)
    st.commit({u: (Output(feats[u], masks[u], {"n": i}), f"fp-{u}") for i, u in enumerate(ids[:4])})
    st.commit({u: (Output(feats[u], masks[u]), f"fp-{u}") for u in ids[4:]})

    s2 = FeatureStore.open(tmp_path / "s")
    assert s2.ids() == ids and len(s2) == len(ids) and "utt03" in s2 and "nope" not in s2
    for u in ids:
        np.testing.assert_array_equal(s2[u], feats[u])
        np.testing.assert_array_equal(s2.mask(u), masks[u])
        assert s2.fingerprint(u) == f"fp-{u}"
    assert s2.info("utt02") == {"n": 2}
    assert [u for u, _ in s2] == ids
    a = s2.attrs
    assert (a["dim"], a["dtype"], a["modality"], a["frame_rate"], a["params"]) == (5, "float32", "audio", 100.0, {"n": 1})
    assert a["imer_version"] and a["created"] and s2.modality == "audio" and s2.frame_rate == 100.0

    L = s2.load()
    np.testing.assert_array_equal(L.data, np.concatenate([feats[u] for u in ids]))
    np.testing.assert_array_equal(L.mask, np.concatenate([masks[u] for u in ids]))
    np.testing.assert_array_equal(L.lengths, [len(feats[u]) for u in ids])
    np.testing.assert_array_equal(L.offsets, np.cumsum([0] + [len(feats[u]) for u in ids])[:-1])
    np.testing.assert_array_equal(L.get("utt04"), feats["utt04"])
    np.testing.assert_array_equal(L.get_mask("utt04"), masks["utt04"])
    assert L.position("utt05") == 5 and L.get("utt00").shape == (0, 5)
    np.testing.assert_array_equal(s2.to_dask().compute(), L.data)
    assert s2.verify() == []


def test_layout_is_one_chunked_compressed_array(tmp_path):
    feats, masks = _ragged()
    st = _new(tmp_path, chunk_frames=8)
    st.commit({u: (Output(feats[u], masks[u]), "fp") for u in feats})
    meta = json.loads((tmp_path / "s" / "data" / "zarr.json").read_text())
    assert meta["shape"] == [sum(len(x) for x in feats.values()), 5]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [8, 5]
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "lz4"
    chunks = list((tmp_path / "s" / "data" / "c").rglob("*"))
    assert len([c for c in chunks if c.is_file()]) == -(-meta["shape"][0] // 8)  # no per-utterance arrays
    assert st.to_dask().chunks[0][0] == 8


def test_float16_store(tmp_path):
    feats, _ = _ragged()
    st = _new(tmp_path, dtype="float16")
    st.commit({u: (Output(x), "fp") for u, x in feats.items()})
    s2 = FeatureStore.open(tmp_path / "s")
    assert s2.dtype == "float16" and s2["utt04"].dtype == np.float16
    np.testing.assert_array_equal(s2["utt04"], feats["utt04"].astype(np.float16))
    assert store_path("d", "k", "float16").name == "k-f16" and store_path("d", "k").name == "k"


def test_values_float16_cannot_hold_are_one_error_not_every_utterance_failed(tmp_path):
    st = _new(tmp_path, dtype="float16")
    big = np.full((3, 5), 7.3e6, np.float32)  # ComParE's energy-like LLDs reach this
    with pytest.raises(StoreError, match=r"float16 cannot hold .*7\.3e\+06.*extract it in float32"):
        st.commit({"utt00": (Output(big), "fp")})
    assert FeatureStore.open(tmp_path / "s").ids() == []  # nothing recorded as failed or written
    nan = np.full((3, 5), np.nan, np.float32)  # a real NaN stays one utterance's failure
    st.commit({"utt01": (Output(nan), "fp")})
    assert "non-finite" in st.failures()["utt01"]["reason"]


def test_last_entry_wins_and_gc_compacts(tmp_path):
    feats, masks = _ragged()
    st = _new(tmp_path)
    st.commit({u: (Output(x, masks[u]), "v1") for u, x in feats.items()})
    new = np.full((6, 5), 7.0, np.float32)
    assert st.commit({"utt03": (Output(new), "v2")}) == ["utt03"]
    assert st.commit({"utt04": (Output(new), "v1")}) == []  # same source already there: skipped
    order = [u for u in feats if u != "utt03"] + ["utt03"]
    assert st.ids() == order and st.n_entries == len(feats) + 1
    np.testing.assert_array_equal(st["utt03"], new)
    L = st.load()  # superseded frames are left out, offsets rebased
    np.testing.assert_array_equal(L.data, np.concatenate([feats[u] for u in order[:-1]] + [new]))
    np.testing.assert_array_equal(L.mask, np.concatenate([masks[u] for u in order[:-1]] + [np.ones(6, bool)]))
    np.testing.assert_array_equal(st.to_dask().compute(), L.data)

    assert st.compact() == (len(feats) + 1, len(feats))
    s2 = FeatureStore.open(tmp_path / "s")
    assert s2.n_entries == len(feats) and s2.ids() == order and s2.verify() == []
    assert s2.n_frames == len(L.data)
    np.testing.assert_array_equal(s2.load().data, L.data)
    assert s2.attrs["created"] == st.attrs["created"]


def test_failures_and_bad_outputs(tmp_path):
    st = _new(tmp_path, dim=3)
    good = np.ones((4, 3), np.float32)
    st.commit({"a": (Output(good), "fa"), "b": (Failure("corrupt file"), "fb"),
               "wrongdim": (Output(np.ones((4, 2), np.float32)), "fw"),
               "nan": (Output(np.array([[0, np.nan, 1]], np.float32)), "fn")})
    assert st.ids() == ["a"]
    f = st.failures()
    assert f["b"] == {"reason": "corrupt file", "fingerprint": "fb"}
    assert "shape (4, 2)" in f["wrongdim"]["reason"] and "NaN" in f["nan"]["reason"]
    with pytest.raises(KeyError, match="corrupt file"):
        st["b"]
    assert st.commit({"a": (Failure("flaky"), "fa")}) == []  # a failure never replaces good features
    assert st.commit({"b": (Output(good), "fb")}) == ["b"]  # a success replaces a failure
    assert "b" in st and "b" not in st.failures()
    assert st.verify() == []
    s16 = FeatureStore.open_or_create(tmp_path / "h", dim=1, attrs=ATTRS, dtype="float16")
    with pytest.raises(StoreError, match="float16 cannot hold"):  # every utterance would fail: one error
        s16.commit({"big": (Output(np.array([[1e6]], np.float32)), "f")})


def test_crash_mid_commit_is_invisible_and_overwritten(tmp_path, monkeypatch):
    feats, masks = _ragged()
    ids = list(feats)
    st = _new(tmp_path)
    st.commit({u: (Output(feats[u], masks[u]), "fp") for u in ids[:3]})
    committed = (st.n_entries, st.n_frames)

    import zarr.core.attributes as zattrs

    def die(self, *a, **k):  # the process dies right before writing the commit point
        raise KeyboardInterrupt

    monkeypatch.setattr(zattrs.Attributes, "update", die)
    with pytest.raises(KeyboardInterrupt):
        st.commit({u: (Output(feats[u] + 100, masks[u]), "fp") for u in ids[3:]})
    monkeypatch.undo()
    s2 = FeatureStore.open(tmp_path / "s")
    assert (s2.n_entries, s2.n_frames) == committed and s2.ids() == ids[:3]
    assert s2._arrays["data"].shape[0] > s2.n_frames  # the orphan rows are on disk...
    assert s2.verify() == []  # ...but past the commit point
    s2.commit({u: (Output(feats[u], masks[u]), "fp") for u in ids[3:]})
    s3 = FeatureStore.open(tmp_path / "s")
    for u in ids:
        np.testing.assert_array_equal(s3[u], feats[u])
    assert s3.verify() == []


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore.open(tmp_path / "missing")
    import zarr

    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreError, match="not an imer feature store"):
        FeatureStore.open(tmp_path / "plain")
    _new(tmp_path, dim=5)
    with pytest.raises(StoreError, match="dim=5"):
        FeatureStore.open_or_create(tmp_path / "s", dim=6, attrs=ATTRS)
    with pytest.raises(StoreError, match="key"):
        FeatureStore.open_or_create(tmp_path / "s", dim=5, attrs={**ATTRS, "key": "other"})
    with pytest.raises(ValueError, match="dtype"):
        _new(tmp_path, name="x", dtype="int8")


def test_verify_finds_corruption(tmp_path):
    import zarr

    feats, _ = _ragged()
    st = _new(tmp_path)
    st.commit({u: (Output(x), "fp") for u, x in feats.items()})
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    g["data"][22, 1] = np.inf  # lengths 0,1,3,17 come first: utt04 starts at frame 21
    problems = FeatureStore.open(tmp_path / "s").verify()
    # a write past the store's checks is damage (checksum) and, here, a non-finite value
    assert len(problems) == 2 and "'utt04' (frames differ from their checksum)" in problems[0]
    assert problems[1] == "NaN/Inf at frame 22 (utterance 'utt04')"
    g["index/offsets"][2] = 5
    problems = FeatureStore.open(tmp_path / "s").verify(check_values=False)
    assert problems[0] == "index offsets are not the running sum of lengths" and "'utt02'" in problems[1]


def test_store_cli_ls_verify_gc(tmp_path, capsys):
    from pipeline.cli import main

    feats, _ = _ragged()
    p = store_path("clitest", "t-000")
    st = FeatureStore.open_or_create(p, dim=5, attrs={**ATTRS, "dataset": "clitest"})
    st.commit({u: (Output(x), "v1") for u, x in feats.items()})
    st.commit({"utt06": (Output(feats["utt06"] * 2), "v2"), "bad": (Failure("x"), "f")})
    leftover = p.with_name(p.name + ".tmp-999999999")
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    assert p in list_stores("clitest")

    assert main(["store", "ls", "--dataset", "clitest"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["dataset", "store", "utterances", "failed", "dim", "frames", "dtype", "size"]
    row = out[1].split()
    assert row[:7] == ["clitest", "t-000", "7", "1", "5", str(st.n_frames), "float32"]

    assert main(["store", "verify", str(p)]) == 0
    assert capsys.readouterr().out.strip() == f"{p}: ok"
    assert main(["store", "gc", "--dataset", "clitest"]) == 0
    out = capsys.readouterr().out
    assert f"{p}: 9 -> 8 index entries" in out and "removed leftover" in out and not leftover.exists()
    s2 = FeatureStore.open(p)
    np.testing.assert_array_equal(s2["utt06"], feats["utt06"] * 2)
    assert s2.failures()["bad"]["reason"] == "x"
    assert main(["store", "verify", str(tmp_path / "nothing")]) == 2
