"""Conversations in the data (issue 41, item 1): manifest keys, the demo's two-speaker dialogues
(media, store keys, fingerprints and the data signature unchanged), conversation batches of one
split in turn order, per-utterance masks, and the utterance-level ("UTT") view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from manifests import demo
from manifests.schema import ManifestError, Utterance, read_manifest, write_manifest
from pipeline.store_format import LoadedStore
from train import conversations as conv
from train import protocols
from train.conditions import MODALITIES
from train.data import MultimodalData
from train.methods import Method, register
from train.trainer import evaluate


# ---- manifests --------------------------------------------------------------------------------

def test_manifest_keys_round_trip_and_are_absent_when_unset(tmp_path):
    a = Utterance("u1", conversation="d1", turn=0)
    b = Utterance("u2")
    assert a.to_json()["conversation"] == "d1" and a.to_json()["turn"] == 0
    assert "conversation" not in b.to_json() and "turn" not in b.to_json()  # old manifests byte-identical
    path = write_manifest(tmp_path / "m.jsonl", [a, b], "x")
    back = read_manifest(path).by_id()
    assert (back["u1"].conversation, back["u1"].turn) == ("d1", 0)
    assert (back["u2"].conversation, back["u2"].turn) == (None, None)
    path.write_text(path.read_text().replace('"turn": 0', '"turn": "first"'))
    with pytest.raises(ManifestError, match=r"m.jsonl:2: bad utterance record.*turn"):
        read_manifest(path)


def test_own_corpus_columns(tmp_path):
    from manifests.own import convert

    src = tmp_path / "c.csv"
    src.write_text("id,text,label,conversation,turn\nx1,a,hap,,\nd1a,b,hap,D1,\nd2b,c,sad,D2,1\n"
                   "d1b,d,sad,D1,\nd2a,e,hap,D2,0\n")
    recs, _ = convert(src, tmp_path)
    got = {u.id: (u.conversation, u.turn) for u in recs}
    assert got == {"x1": (None, None), "d1a": ("D1", 0), "d1b": ("D1", 1), "d2a": ("D2", 0), "d2b": ("D2", 1)}
    src.write_text("id,text,conversation,turn\na,x,D1,0\nb,y,D1,0\n")
    with pytest.raises(ManifestError, match=r"c.csv:3: turn 0 of conversation 'D1' is also on line 2"):
        convert(src, tmp_path)
    src.write_text("id,text,conversation,turn\na,x,,2\n")
    with pytest.raises(ManifestError, match=r"c.csv:2: turn '2' given without a conversation"):
        convert(src, tmp_path)


# ---- the demo: conversations of two speakers, everything else unchanged ---------------------------

@pytest.fixture(scope="module")
def demo_manifests(tiny_demo, tmp_path_factory):
    """(the recipe's manifest, the same corpus generated and built as before conversations
    existed: ``demo.conversations`` a no-op) and the two corpus directories."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "conversations", lambda utts, *a: None)
        before = demo.generate(tmp_path_factory.mktemp("demo-before"), seed=0, size="tiny", progress=False).parent
        old = read_manifest(demo.build(before, tmp_path_factory.mktemp("recipe-before")))
    new = read_manifest(demo.build(tiny_demo.parent, tmp_path_factory.mktemp("recipe-after")))
    return new, old, tiny_demo.parent, before


def test_demo_conversations_pair_two_speakers_and_alternate(demo_manifests):
    new = demo_manifests[0]
    by_conv: dict[str, list[Utterance]] = {}
    for u in new:
        by_conv.setdefault(u.conversation, []).append(u)
    speakers = sorted({u.speaker for u in new})
    pairs = {tuple(speakers[p:p + 2]) for p in range(0, len(speakers), 2)}
    for name, utts in by_conv.items():
        utts.sort(key=lambda u: u.turn)
        assert [u.turn for u in utts] == list(range(len(utts)))
        assert tuple(sorted({u.speaker for u in utts})) in pairs
        assert all(a.speaker != b.speaker for a, b in zip(utts, utts[1:]))  # turn by turn
    assert len(by_conv) == len(pairs) * -(-len(new) // len(speakers) // demo.CONVERSATION_TURNS)


class _Store:
    """A feature store as from_stores reads it: whole in memory, with its key."""

    def __init__(self, ids, dim, key, seed):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, 5, len(ids))
        self.attrs = {"key": key, "dim": dim}
        self._ld = LoadedStore(list(ids), rng.normal(size=(int(lengths.sum()), dim)).astype(np.float32),
                               np.ones(int(lengths.sum()), bool), np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                               lengths, dict(self.attrs))

    def load(self):
        return self._ld

    def failures(self):
        return {}


def test_demo_media_fingerprints_store_keys_and_signature_unchanged(demo_manifests, tiny_demo):
    from extract.base import Extractor

    new, old, after, before = demo_manifests
    # the records differ by the two keys only; the media files are byte for byte the same
    assert all(u.conversation is None for u in old) and all(u.conversation is not None for u in new)
    for a, b in zip(new, old):
        a, b = a.to_json(), b.to_json()
        assert {k: v for k, v in a.items() if k not in ("conversation", "turn")} == {**b, "audio": a["audio"], "video": a["video"]}
        for m in ("audio", "video"):  # absolute paths into the two corpora
            assert {**a[m], "path": None} == {**b[m], "path": None}
            assert Path(a[m]["path"]).read_bytes() == Path(b[m]["path"]).read_bytes()
    # the manifest of the corpus itself: the same records but the two keys
    raw_new, raw_old = read_manifest(after / "manifest.jsonl"), read_manifest(before / "manifest.jsonl")
    for a, b in zip(raw_new, raw_old):
        assert {k: v for k, v in a.to_json().items() if k not in ("conversation", "turn", "audio", "video")} == \
            {k: v for k, v in b.to_json().items() if k not in ("audio", "video")}
    # what an extractor hashes for an utterance (file content, segment, transcript) is unchanged
    for modality in MODALITIES:
        ext = type("E", (Extractor,), {"modality": {"a": "audio", "v": "video", "t": "text"}[modality]})
        e = ext.__new__(ext)
        assert [e.fingerprint(u) for u in new] == [e.fingerprint(u) for u in old]
    stores = {m: _Store([u.id for u in new], 3 + k, f"feat-{m}", k) for k, m in enumerate(MODALITIES)}
    d_new = MultimodalData.from_stores(new, stores)
    d_old = MultimodalData.from_stores(old, stores)  # a manifest written before conversations existed
    assert d_new.signature == d_old.signature
    assert {m: s.attrs["key"] for m, s in stores.items()} == {m: f"feat-{m}" for m in MODALITIES}
    # the old manifest gets the same conversations from the recipe (in memory), the new one from its keys
    for f in ("conv", "turn", "speaker"):
        assert np.array_equal(getattr(d_new.conversations, f), getattr(d_old.conversations, f))
    assert all(u.conversation is None for u in old)  # derived on a copy: the manifest is untouched


# ---- conversation items -----------------------------------------------------------------------------

def _data(n_conv=3, turns=5, seed=0):
    """``n_conv`` two-speaker conversations, rows stored in scrambled order."""
    rng = np.random.default_rng(seed)
    rows = [(f"c{c}", t, f"s{c}{t % 2}") for c in range(n_conv) for t in range(turns)]
    perm = rng.permutation(len(rows))
    rows = [rows[k] for k in perm]
    n = len(rows)
    seqs = {m: [rng.normal(size=(int(rng.integers(2, 6)), d)).astype(np.float32) for _ in range(n)]
            for m, d in zip(MODALITIES, (3, 2, 4))}
    d = MultimodalData.from_arrays([f"u{k}" for k in range(n)], rng.integers(0, 2, n), seqs, labels=["x", "y"])
    d.conversations = conv.ConversationIndex.from_lists(*zip(*rows))
    return d, rows


def test_groups_hold_one_split_in_turn_order():
    d, rows = _data()
    # c0 and c1 without their turn 2, c2 by its last turn only
    split = np.array([k for k, r in enumerate(rows) if (r[0] != "c2" and r[1] != 2) or (r[0] == "c2" and r[1] == 4)])
    got = conv.groups(d, split)
    assert sorted(np.concatenate(got).tolist()) == sorted(split.tolist())  # only the split's rows
    for g in got:
        names = {rows[k][0] for k in g}
        assert len(names) == 1
        turns = [rows[k][1] for k in g]
        assert turns == sorted(turns)
    batch = next(conv.batches(d, split, 10))
    assert batch["index"].tolist() == np.concatenate(got).tolist()
    for c in range(len(got)):
        sel = batch["conversation"] == c
        assert batch["turn"][sel].tolist() == list(range(int(sel.sum())))  # renumbered inside the split
        first = [rows[k][2] for k in got[c]]
        want = [sorted(set(first), key=first.index).index(s) for s in first]
        assert batch["speaker"][sel].tolist() == want  # numbered by first turn


def test_order_maps_evaluator_rows_back():
    d, _ = _data()
    idx = np.array([3, 7, 1, 0, 12, 9, 4])
    pos = conv.order(d, idx)
    assert sorted(pos.tolist()) == list(range(len(idx)))
    got = [b["index"].tolist() for b in conv.batches(d, idx[pos], 2)]
    assert sum(got, []) == idx[pos].tolist()


def test_shuffled_batches_are_whole_conversations():
    d, rows = _data(n_conv=7)
    bs = conv.batch_rows(d, np.arange(len(rows)), 3, np.random.default_rng(1))
    assert [len(b) for b in bs] == [3, 3, 1]
    flat = [rows[k][0] for b in bs for g in b for k in g]
    assert sorted(flat) == sorted(r[0] for r in rows)
    # what the trainer gets: the data module's conversation batches, shuffled by its generator
    shuffled = d.batches(np.arange(len(rows)), 3, rng=np.random.default_rng(1), unit="conversation")
    got = [b["index"].tolist() for b in shuffled]
    assert got == [np.concatenate(b).tolist() for b in bs]
    assert got != [np.concatenate(b).tolist() for b in conv.batch_rows(d, np.arange(len(rows)), 3)]


def test_without_conversations_every_row_is_its_own():
    d, _ = _data()
    d.conversations = None
    batch = next(conv.batches(d, np.arange(4), 8))
    assert batch["conversation"].tolist() == [0, 1, 2, 3] and batch["turn"].tolist() == [0, 0, 0, 0]


def test_utterance_view_is_the_mean_over_valid_frames():
    x = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    fm = torch.tensor([[True, False, True, False], [False, False, False, False]])
    batch = {"x": {m: x for m in MODALITIES}, "frame_mask": {m: fm for m in MODALITIES}}
    u = conv.utterance_view(batch)["a"]
    assert torch.equal(u[0], (x[0, 0] + x[0, 2]) / 2)
    assert torch.equal(u[1], torch.zeros(3))  # no valid frame: zero


# ---- the trainer and evaluator: conversation batches, per-utterance masks ----------------------------

@register
class _ConversationProbe(Method):
    name = "_conversation_probe"
    batching = "conversation"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.lin = torch.nn.Linear(sum(spec.dims.values()), spec.out_dim)
        self.seen: list[dict] = []

    def predict(self, batch):
        self.seen.append({"index": batch.get("index"), "conversation": batch["conversation"].clone(),
                          "present": batch["present"].clone()})
        u = conv.utterance_view(batch)
        return self.lin(torch.cat([u[m] for m in MODALITIES], -1))

    def loss(self, batch):
        out = self.predict(batch)
        self.seen[-1]["index"] = batch["index"].clone()
        return self.task_loss(out, batch["y"]), {}


def test_evaluator_masks_stay_per_utterance():
    d, rows = _data()
    m = _ConversationProbe({"model": {}}, d.spec)
    idx = np.array([k for k, r in enumerate(rows) if r[0] != "c1"])
    res = evaluate(m, d, idx, ["mr=0.4", "at"], batch_size=1, seed=3)
    ids = [d.ids[i] for i in idx]
    for c in ("mr=0.4", "at"):
        assert np.array_equal(res[c]["avail"], protocols.masks(c, ids, 3, d.natural[idx]))
        assert np.array_equal(res[c]["index"], idx)  # outputs back in the order of idx
    # each forward saw one whole conversation (batch_size 1) with exactly those masks per row
    pos = conv.order(d, idx)
    want = (protocols.masks("mr=0.4", ids, 3, d.natural[idx]) & d.natural[idx])[pos]
    seen = m.seen[::2]  # per batch, the columns in turn: mr=0.4 first
    assert all(int(s["conversation"].max()) == 0 for s in seen)
    assert np.array_equal(torch.cat([s["present"] for s in seen]).numpy(), want)


def test_trainer_feeds_conversations_of_the_training_split(tmp_path):
    from train.trainer import Trainer

    d, rows = _data(n_conv=4)
    tr = np.array([k for k, r in enumerate(rows) if r[0] in ("c0", "c1", "c2") and r[1] != 0])
    va = np.array([k for k, r in enumerate(rows) if r[0] == "c3"])
    cfg = {"train": {"batch_size": 2, "epochs": 1, "optimizer": {"kind": "adam", "lr": 1e-3},
                     "missing": {"kind": "missing-rate", "rate": 0.3}}, "select": {}, "model": {}}
    m = _ConversationProbe(cfg, d.spec)
    Trainer(m, d, tr, va, cfg, tmp_path, progress=False).train_epoch(0, torch.optim.Adam(m.parameters()),
                                                                     torch.amp.GradScaler("cuda", enabled=False),
                                                                     list(m.parameters()), 2)
    train_batches = [s for s in m.seen if s["index"] is not None and set(s["index"].tolist()) <= set(tr.tolist())]
    assert sorted(np.concatenate([s["index"].numpy() for s in train_batches]).tolist()) == sorted(tr.tolist())
    for s in train_batches:
        names = [rows[k][0] for k in s["index"].tolist()]
        for c in s["conversation"].unique().tolist():
            sel = (s["conversation"] == c).numpy()
            assert len({n for n, k in zip(names, sel) if k}) == 1  # one conversation per item
            turns = [rows[k][1] for k, keep in zip(s["index"].tolist(), sel) if keep]
            assert turns == sorted(turns) and 0 not in turns  # the split's turns only, in order


def test_speakers_are_numbered_by_first_turn():
    d, _ = _data(n_conv=1, turns=3)
    # stored rows: turn 1 by B, turn 0 by A, turn 2 by B: B is coded first, A speaks first
    d.conversations = conv.ConversationIndex.from_lists(["c", "c", "c"], [1, 0, 2], ["B", "A", "B"])
    batch = next(conv.batches(d, np.arange(3), 4))
    assert batch["index"].tolist() == [1, 0, 2] and batch["speaker"].tolist() == [0, 1, 1]


# ---- the corpus recipes ---------------------------------------------------------------------------

def test_recipes_name_conversations_and_turns(tmp_path):
    from fixtures_corpora import make_iemocap, make_mosi, make_msp

    from manifests import iemocap, mosi, msp_improv

    _, rows = make_iemocap(tmp_path / "i", sessions=(1, 2))
    man = read_manifest(iemocap.build(tmp_path / "i", tmp_path / "io")).by_id()
    for dialog in {r["dialog"] for r in rows}:
        kept = sorted((r["start"], r["id"]) for r in rows if r["dialog"] == dialog and r["id"] in man)
        assert [(man[u].conversation, man[u].turn) for _, u in kept] == [(dialog, k) for k in range(len(kept))]
    make_msp(tmp_path / "m", sessions=(1, 2))
    man = read_manifest(msp_improv.build(tmp_path / "m", tmp_path / "mo")).by_id()
    # FM01 (F) and MF01 (M) of sentence 1A: one improvisation, two speakers, turn order by number
    a, b = man["MSP-IMPROV-S01A-F01-S-FM01"], man["MSP-IMPROV-S01A-M01-S-MF01"]
    assert a.conversation == b.conversation and a.speaker != b.speaker and (a.turn, b.turn) == (0, 1)
    root = make_mosi(tmp_path / "c", {"vidA": [1.0, -1.0, 0.5], "vidB": [2.0]})
    sp = tmp_path / "splits.json"
    sp.write_text(json.dumps({"train": ["vidA"], "valid": [], "test": ["vidB"]}))
    man = read_manifest(mosi.build(root, tmp_path / "co", splits=sp)).by_id()
    assert [(man[f"vidA_{k}"].conversation, man[f"vidA_{k}"].turn) for k in (1, 2, 3)] == [("vidA", t) for t in range(3)]
