"""Stores larger than the memory budget (issue 40 item 5): streamed batches equal the in-memory
ones bit for bit, reads go in store order and are checked against the utterance checksums, the
budget picks the path, and float16 stores round-trip and never share a data signature with float32."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from extract.base import Failure, Output
from manifests.schema import Manifest, Utterance
from pipeline.store import FeatureStore, StoreDamaged
from train.data import MultimodalData, Normalizer
from train.streaming import StreamedSequences, memory_budget, parse_bytes

N = 23
DIMS = {"audio": 6, "video": 3, "text": 5}


def _stores(root, dtype="float32", aligned=False):
    """Three stores in 8-frame chunks: utterances span chunks; invalid frames, a failure, an absent one."""
    rng = np.random.default_rng(0)
    ids = [f"u{i:02d}" for i in range(N)]
    lens = rng.integers(3, 30, N)
    stores = {}
    for mod, dim in DIMS.items():
        attrs = {"key": f"{mod}-k", "modality": mod, **({"aligned": True} if aligned else {})}
        st = FeatureStore.open_or_create(root / f"{mod}-{dtype}", dim=dim, attrs=attrs, dtype=dtype, chunk_frames=8)
        batch = {}
        for i, u in enumerate(ids):
            if mod == "video" and i == 4:
                batch[u] = (Failure("no face"), "f")
                continue
            if mod == "text" and i == 7:
                continue  # absent
            n = int(lens[i]) if aligned else int(rng.integers(2, 30))
            mk = rng.random(n) > 0.2
            if mod == "video" and i == 9:
                mk[:] = False  # no valid frame: absent
            batch[u] = (Output(rng.normal(size=(n, dim)).astype(np.float32) * 3 + 1, mk), "f")
        # committed in two parts, in another order than the manifest's: store order != row order
        keys = list(batch)[::-1]
        st.commit({k: batch[k] for k in keys[: N // 2]})
        st.commit({k: batch[k] for k in keys[N // 2:]})
        stores[mod] = st
    man = Manifest([Utterance(u, label="ab"[i % 2], label_index=i % 2) for i, u in enumerate(ids)],
                   dataset="t", labels=["a", "b"])
    return stores, man


def _same(a: dict, b: dict) -> None:
    for k in ("x", "lengths", "frame_mask"):
        for m in "avt":
            x, y = a[k][m].numpy(), b[k][m].numpy()
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), (k, m)
    for k in ("natural", "present", "y", "index"):
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    assert a["ids"] == b["ids"]


@pytest.mark.parametrize("kw", [{"invalid_frames": "drop"}, {"invalid_frames": "zero"},
                                {"invalid_frames": "drop", "max_len": {"a": 9}, "fixed_len": True},
                                {"invalid_frames": "drop", "resample_to": 7}, {"aligned": True}])
def test_streamed_batches_equal_in_memory_bit_for_bit(tmp_path, kw):
    kw = dict(kw)
    stores, man = _stores(tmp_path, aligned=kw.pop("aligned", False))
    mem = MultimodalData.from_stores(man, stores, **kw)
    lazy = MultimodalData.from_stores(man, stores, memory_budget=0, **kw)
    assert all(isinstance(s, StreamedSequences) for s in lazy.seqs.values())
    assert all(s.in_memory for s in mem.seqs.values())
    assert mem.signature == lazy.signature and mem.natural.tolist() == lazy.natural.tolist()
    idx = np.arange(N)
    norm = Normalizer.fit(mem, idx, ["a", "v", "t"])
    norm_lazy = Normalizer.fit(lazy, idx, ["a", "v", "t"])
    for m in "avt":  # the statistics read the frames in another order: equal up to rounding
        np.testing.assert_allclose(norm.mean[m], norm_lazy.mean[m], rtol=1e-6, atol=1e-6)
    for bucket in (False, True):
        mem.access_log, lazy.access_log = [], []
        a = list(mem.batches(idx, 5, norm, rng=np.random.default_rng(3), bucket=bucket))
        b = list(lazy.batches(idx, 5, norm, rng=np.random.default_rng(3), bucket=bucket))  # read one batch ahead
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            _same(x, y)
        assert [r.tolist() for r in mem.access_log] == [r.tolist() for r in lazy.access_log]
    _same(mem.collate(idx[:9]), lazy.collate(idx[:9]))  # and without the prefetch


def test_a_batch_reads_its_chunks_once_in_store_order(tmp_path, monkeypatch):
    stores, man = _stores(tmp_path)
    lazy = MultimodalData.from_stores(man, stores, memory_budget=0)
    s = lazy.seqs["a"]
    calls = []
    real = type(s._arr).__getitem__
    monkeypatch.setattr(type(s._arr), "__getitem__", lambda self, key: calls.append(key) or real(self, key))
    rows = [20, 3, 11, 0, 17, 8]
    got = s.read_rows(rows)
    starts = [k.start for k in calls]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # ascending, each range once
    need = {c for i in rows for c in range(s.src_off[i] // 8, (s.src_off[i] + s.src_len[i] - 1) // 8 + 1)}
    assert sum(-(-(k.stop - k.start) // 8) for k in calls) == len(need)  # only the chunks the batch covers
    assert len(calls) == len([c for c in need if c - 1 not in need])  # contiguous chunks in one read
    for i in rows:
        assert np.array_equal(got[i][0], stores["audio"][man.utterances[i].id][stores["audio"].mask(man.utterances[i].id)])


def test_a_streamed_utterance_that_differs_from_its_checksum_is_refused(tmp_path):
    stores, man = _stores(tmp_path)
    lazy = MultimodalData.from_stores(man, stores, memory_budget=0)
    s = lazy.seqs["a"]
    s._crc_data[5] ^= 1  # what a swapped chunk or one read back as fill value looks like
    with pytest.raises(StoreDamaged, match="u05"):
        list(lazy.batches(np.arange(N), 4))
    lazy.collate([6, 7])  # the others still read


def test_the_budget_picks_memory_or_streaming(tmp_path, monkeypatch):
    stores, man = _stores(tmp_path)
    audio = stores["audio"].n_frames * DIMS["audio"] * 4
    d = MultimodalData.from_stores(man, stores, memory_budget=audio - 1)
    assert isinstance(d.seqs["a"], StreamedSequences)
    d = MultimodalData.from_stores(man, stores, memory_budget=audio + 10 ** 6)
    assert d.seqs["a"].in_memory
    assert parse_bytes("1G") == 1 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes(4e9) == 4 * 10 ** 9
    monkeypatch.setenv("IMER_DATA_MEMORY", "2K")
    assert memory_budget() == 2048 and memory_budget("3M") == 3 << 20
    assert isinstance(MultimodalData.from_stores(man, stores).seqs["a"], StreamedSequences)
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_an_abandoned_epoch_leaves_no_reader_thread(tmp_path):
    stores, man = _stores(tmp_path)
    lazy = MultimodalData.from_stores(man, stores, memory_budget=0)
    before = threading.active_count()
    gen = lazy.batches(np.arange(N), 3)
    next(gen)
    gen.close()  # the trainer's max_batches stops an epoch early
    assert threading.active_count() == before


def test_float16_stores_round_trip_and_keep_their_own_signature(tmp_path):
    s32, man = _stores(tmp_path, "float32")
    s16, _ = _stores(tmp_path, "float16")
    st = s16["audio"]
    assert st.dtype == "float16" and st.load().data.dtype == np.float16
    for u in st.ids():
        x32 = s32["audio"][u]
        assert np.array_equal(st[u], x32.astype(np.float16))  # stored exactly as the cast
        assert np.abs(st[u].astype(np.float32) - x32).max() <= np.abs(x32).max() * 2 ** -11
    m16 = MultimodalData.from_stores(man, s16)
    m32 = MultimodalData.from_stores(man, s32)
    assert m16.seqs["a"].data.dtype == np.float16  # half the memory
    assert m16.seqs["a"].nbytes() * 2 == m32.seqs["a"].nbytes()
    assert m16.signature != m32.signature  # same extractor key, other values: runs never mix them
    lazy16 = MultimodalData.from_stores(man, s16, memory_budget=0)
    idx = np.arange(N)
    b16 = m16.collate(idx)
    _same(b16, lazy16.collate(idx))
    assert b16["x"]["a"].dtype.is_floating_point and str(b16["x"]["a"].dtype) == "torch.float32"
    # the float16 batch is the float32 one cast through float16
    b32 = m32.collate(idx)
    assert np.array_equal(b16["x"]["a"].numpy(), b32["x"]["a"].numpy().astype(np.float16).astype(np.float32))
