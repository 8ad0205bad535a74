"""GCNet's mechanisms (issue 41, items 2 and 4): which turns and speakers each graph edge joins
(window sizes, relation types), the RGCN and GraphConv layers against their equations, what the
classifier and the completion head read, both loss terms against references computed here from
the equations, and what a prediction may depend on (its conversation, never a masked modality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import conversations as conv
from train.conditions import MODALITIES, apply_availability, without_truth
from train.config import load_config
from train.data import MultimodalData
from train.methods import build

DIMS = {"a": 3, "v": 2, "t": 4}
# two conversations in one batch: speakers per turn (ids of the data's speakers)
CONV = {"c0": ["A", "B", "A", "A", "B", "B", "A"], "c1": ["C", "D", "D"]}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    rows = [(c, t, s) for c, spk in CONV.items() for t, s in enumerate(spk)]
    n = len(rows)
    seqs = {m: [rng.normal(size=(int(rng.integers(2, 5)), d)).astype(np.float32) for _ in range(n)]
            for m, d in DIMS.items()}
    d = MultimodalData.from_arrays([f"u{k}" for k in range(n)], rng.integers(0, 4, n), seqs, labels=list("abcd"))
    d.conversations = conv.ConversationIndex.from_lists(*zip(*rows))
    return d, rows


def _method(name="gcnet", **model):
    cfg = load_config(name, "demo")
    cfg["model"].update(hidden=6, graph_hidden=4, **model)
    torch.manual_seed(0)
    return build(cfg, _data()[0].spec).eval()


def _batch(d, avail=None):
    b = next(conv.batches(d, np.arange(len(d)), 8))
    return apply_availability(b, np.ones((len(d), 3), bool) if avail is None else avail)


def _capture(module, store, key, what="input"):
    def hook(mod, args, out):
        store[key] = args if what == "input" else out
    return module.register_forward_hook(hook)


def _expected_edges(past, future, S=2):
    """From the authors' edge rule: turn j sends to turns j-past .. j+future of its conversation;
    temporal relation past/now/future as the sender is before/at/after the receiver; speaker
    relation S * speaker(receiver) + speaker(sender), speakers numbered by first turn."""
    L = max(map(len, CONV.values()))
    temporal = np.zeros((len(CONV), 3, L, L))
    speaker = np.zeros((len(CONV), S * S, L, L))
    for c, spk in enumerate(CONV.values()):
        local = [sorted(set(spk), key=spk.index).index(s) for s in spk]
        for j in range(len(spk)):
            for i in range(max(0, j - past), min(len(spk), j + future + 1)):
                temporal[c, 0 if j < i else 1 if j == i else 2, i, j] = 1
                speaker[c, S * local[i] + local[j], i, j] = 1
    return temporal, speaker


@pytest.mark.parametrize("past,future", [(2, 2), (1, 3)])
def test_graph_edges_join_the_window_with_their_relation_types(past, future):
    m = _method(window={"past": past, "future": future})
    d, _ = _data()
    got = {}
    hooks = [_capture(m.temporal.rgcn, got, "t"), _capture(m.speaker.rgcn, got, "s")]
    with torch.no_grad():
        m.predict(without_truth(_batch(d)))
    for h in hooks:
        h.remove()
    temporal, speaker = _expected_edges(past, future)
    assert np.array_equal(got["t"][1].numpy(), temporal)
    assert np.array_equal(got["s"][1].numpy(), speaker)
    # and the graphs read the context LSTM's states of those turns
    assert got["t"][0].shape == (2, 7, 12) and torch.equal(got["t"][0], got["s"][0])


def test_rgcn_and_graphconv_follow_their_equations():
    m = _method()
    torch.manual_seed(1)
    h = torch.randn(2, 7, 12)
    _, adj = _expected_edges(2, 2)
    adj = torch.tensor(adj, dtype=torch.float32)
    rg = m.speaker.rgcn
    want = torch.zeros(2, 7, 4)
    for c in range(2):
        for i in range(7):
            want[c, i] = h[c, i] @ rg.root.weight.T + rg.root.bias
            for r in range(4):
                senders = torch.nonzero(adj[c, r, i]).flatten()
                if len(senders):
                    want[c, i] += (h[c, senders] @ rg.weight[r]).mean(0)  # mean over the relation's senders
    with torch.no_grad():
        assert torch.allclose(rg(h, adj), want, atol=1e-5)
        gc = m.speaker.gconv
        g = torch.randn(2, 7, 4)
        any_edge = adj.amax(1)
        want = torch.stack([torch.stack([gc.rel(g[c][any_edge[c, i] > 0].sum(0)) + gc.root(g[c, i])
                                         for i in range(7)]) for c in range(2)])
        assert torch.allclose(gc(g, any_edge), want, atol=1e-5)


def test_classifier_and_completion_read_the_sum_of_both_graphs():
    m = _method()
    d, _ = _data()
    got = {}
    hooks = [_capture(m.temporal, got, "t", "output"), _capture(m.speaker, got, "s", "output"),
             _capture(m.classifier, got, "cls"), _capture(m.reconstruct, got, "rec"),
             _capture(m.context, got, "ctx")]
    b = without_truth(_batch(d))
    with torch.no_grad():
        m.predict(b)
    for h in hooks:
        h.remove()
    grid = got["t"] + got["s"]  # (C, L, D_h)
    rows = torch.stack([grid[c, t] for c, t in zip(b["conversation"], b["turn"])])
    assert torch.equal(got["cls"][0], rows) and torch.equal(got["rec"][0], rows)
    # the context LSTM reads the utterance-level features, laid out by conversation and turn
    x = torch.cat([conv.utterance_view(b)[mm] for mm in MODALITIES], -1)
    packed = got["ctx"][0]
    padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(packed, batch_first=True)
    assert lengths.tolist() == [7, 3]
    for k, (c, t) in enumerate(zip(b["conversation"].tolist(), b["turn"].tolist())):
        assert torch.equal(padded[c, t], x[k])


@pytest.mark.parametrize("name,kept", [("gcnet-nospeaker", "temporal"), ("gcnet-notemporal", "speaker")])
def test_ablations_keep_one_graph(name, kept):
    m = _method(name)
    assert getattr(m, kept) is not None and getattr(m, {"temporal": "speaker", "speaker": "temporal"}[kept]) is None
    d, _ = _data()
    got = {}
    hooks = [_capture(getattr(m, kept), got, "g", "output"), _capture(m.classifier, got, "cls")]
    b = without_truth(_batch(d))
    with torch.no_grad():
        m.predict(b)
    for h in hooks:
        h.remove()
    assert torch.equal(got["cls"][0], got["g"][b["conversation"], b["turn"]])


def test_loss_terms_equal_the_equations():
    m = _method()
    d, _ = _data()
    rng = np.random.default_rng(4)
    avail = rng.random((len(d), 3)) < 0.6
    avail[np.arange(len(d)), rng.integers(0, 3, len(d))] = True
    b = _batch(d, avail)
    got = {}
    hooks = [_capture(m.classifier, got, "logits", "output"), _capture(m.reconstruct, got, "recon", "output")]
    m.train()
    torch.manual_seed(0)
    total, parts = m.loss(b)
    for h in hooks:
        h.remove()
    logits, recon = got["logits"].detach(), got["recon"].detach()
    y = b["y"]
    ce = -(logits - logits.exp().sum(1, keepdim=True).log())[torch.arange(len(y)), y].mean()
    assert torch.allclose(parts["ce"], ce, atol=1e-6)
    # reconstruction: the modalities the protocol removed, squared error averaged over each one's
    # dimensions, summed over them, averaged over the utterances; the targets are the true
    # utterance-level features, computed here from the stored frames
    want, off = 0.0, 0
    for i in range(len(d)):
        row = int(b["index"][i])
        off = 0
        for k, mm in enumerate(MODALITIES):
            dim = DIMS[mm]
            if bool(b["natural"][i, k]) and not avail[i, k]:
                seq = d.seqs[mm].seq(row)
                target = torch.tensor(seq.mean(0))
                want += float(((recon[i, off:off + dim] - target) ** 2).mean())
            off += dim
    want /= len(d)
    assert (~avail).any() and abs(float(parts["recon"].detach()) - want) < 1e-5
    assert torch.allclose(total, parts["ce"] + parts["recon"])


def test_a_prediction_depends_on_its_conversation_only():
    m = _method()
    d, _ = _data()
    b = without_truth(_batch(d))
    with torch.no_grad():
        ref = m.predict(b)
        x = {k: v.clone() for k, v in b["x"].items()}
        c1 = (b["conversation"] == 1).nonzero().flatten()
        x["a"][c1] += 5.0  # another conversation's audio changes
        out = m.predict(dict(b, x=x))
        c0 = b["conversation"] == 0
        assert torch.equal(ref[c0], out[c0]) and not torch.equal(ref[~c0], out[~c0])
        # a neighbour's change reaches a turn of the same conversation
        x = {k: v.clone() for k, v in b["x"].items()}
        x["t"][(c0 & (b["turn"] == 1)).nonzero().flatten()] += 5.0
        out = m.predict(dict(b, x=x))
        assert not torch.equal(ref[c0 & (b["turn"] == 0)], out[c0 & (b["turn"] == 0)])
        # the short conversation alone in its batch: the same outputs (no LSTM reads padding)
        alone = without_truth(apply_availability(next(conv.batches(d, np.arange(7, 10), 8)), np.ones((3, 3), bool)))
        assert torch.allclose(m.predict(alone), ref[~c0], atol=1e-6)


def test_speakers_matter_only_through_the_speaker_graph():
    d, _ = _data()
    b = without_truth(_batch(d))
    swapped = dict(b, speaker=torch.where(b["conversation"] == 0, 1 - b["speaker"], b["speaker"]))
    with torch.no_grad():
        full, nospk = _method(), _method("gcnet-nospeaker")
        assert not torch.equal(full.predict(b), full.predict(swapped))
        assert torch.equal(nospk.predict(b), nospk.predict(swapped))


def test_too_many_speakers_is_a_clear_error():
    m = _method(speakers=1)
    d, _ = _data()
    with pytest.raises(ValueError, match="2 speakers, the model 1"):
        m.predict(without_truth(_batch(d)))


@pytest.mark.parametrize("m_idx", range(3))
def test_masked_modality_content_changes_nothing_in_a_conversation(m_idx):
    m = _method()
    d, _ = _data()
    avail = np.ones((len(d), 3), bool)
    avail[::2, m_idx] = False
    raw = next(conv.batches(d, np.arange(len(d)), 8))
    mod = MODALITIES[m_idx]
    with torch.no_grad():
        ref = m.predict(without_truth(apply_availability(raw, avail)))
        tampered = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
        x = raw["x"][mod].clone()
        x[::2] = torch.randn(x[::2].shape) * 50
        tampered["x"][mod] = x
        assert torch.equal(ref, m.predict(without_truth(apply_availability(tampered, avail))))
        x = raw["x"][mod].clone()
        x[1::2] += 3.0  # where present, the modality matters
        tampered["x"][mod] = x
        assert not torch.equal(ref, m.predict(without_truth(apply_availability(tampered, avail))))
