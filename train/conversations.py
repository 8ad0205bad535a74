"""Conversations in the data module: whole dialogues as batch items, and the utterance-level view.

A manifest record may name its ``conversation`` and ``turn`` (manifests.schema). ``from_manifest``
turns them into a ``ConversationIndex`` over the data rows, which ``MultimodalData.from_stores``
keeps as ``data.conversations`` (outside ``data.signature``: runs of every other method are
unchanged). A method that reads conversations says so with ``batching = "conversation"``
(train.methods.Method); the trainer and the evaluator then call ``MultimodalData.batches`` with
``unit="conversation"``: each batch is ``batch_size`` whole conversations, their utterances in
turn order, and the batch carries, per utterance (row)::

    conversation: (B,) int64  which conversation of the batch (0 .. C-1)
    turn:         (B,) int64  its position in that conversation (0 .. L_c-1, consecutive)
    speaker:      (B,) int64  its speaker within that conversation (0, 1, ... in order of first turn)

Everything else is the ordinary utterance batch, so the missing-modality masks of every protocol
are drawn and applied per utterance exactly as for any other method.

Graph context across splits. A conversation can span splits (MMIN's IEMOCAP folds put a
session's two speakers in validation and test; the demo's speaker folds pair a test speaker with
a validation or a training speaker). GCNet's own protocol keeps whole sessions in one split
(leave-one-session-out), so its graphs only ever join utterances of the split being evaluated.
imer follows that stricter rule everywhere: a conversation item holds only the utterances of the
rows asked for (one split), renumbered from turn 0 in their original order; the other split's
utterances are neither context nor labels. In training, only training utterances are joined.

``utterance_view(batch)`` is GCNet's "UTT" input: each modality's mean over its valid frames,
(B, D_m), zero where a modality is missing (masked or naturally absent: no valid frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.conditions import MODALITIES
from train.data import DataError


@dataclass
class ConversationIndex:
    """Per data row: ``conv`` code (-1 = in no conversation: a conversation of its own), ``turn``
    (its position in the whole conversation), ``speaker`` code (-1 = unknown)."""

    conv: np.ndarray
    turn: np.ndarray
    speaker: np.ndarray

    @classmethod
    def from_lists(cls, conversations, turns, speakers) -> "ConversationIndex":
        """From per-row conversation names (None = none), turns and speaker names."""
        def codes(names):
            table: dict = {}
            return np.array([-1 if n is None else table.setdefault(n, len(table)) for n in names], np.int64)

        turn = np.array([-1 if t is None else int(t) for t in turns], np.int64)
        conv = codes(conversations)
        if ((conv >= 0) & (turn < 0)).any():
            i = int(np.flatnonzero((conv >= 0) & (turn < 0))[0])
            raise DataError(f"row {i}: in conversation {list(conversations)[i]!r} but without a turn; "
                            "rebuild the manifest (imer manifest) so every conversation numbers its turns")
        return cls(conv, turn, codes(speakers))


def from_manifest(manifest, ids) -> ConversationIndex | None:
    """The conversations of the data rows ``ids`` (manifest order of records does not matter);
    None when no record names one. A manifest written before conversations existed gets them
    from its recipe's ``conversations(utts)`` where the recipe can derive them from the records
    (the demo's come from its ids and speakers), in memory only."""
    by_id = {u.id: u for u in manifest}
    utts = [by_id[u] for u in ids]
    if not any(getattr(u, "conversation", None) is not None for u in utts):
        utts = _derived(manifest, utts)
        if utts is None:
            return None
    return ConversationIndex.from_lists([u.conversation for u in utts], [u.turn for u in utts],
                                        [u.speaker for u in utts])


def _derived(manifest, utts):
    import copy

    from manifests.datasets import _find

    name = getattr(manifest, "dataset", None)
    try:
        recipe = _find(name) if name else None
    except (ImportError, ValueError):  # an imported feature set's name: no recipe
        recipe = None
    derive = getattr(recipe, "conversations", None)
    if derive is None:
        return None
    utts = [copy.copy(u) for u in utts]
    derive(utts)
    return utts if any(u.conversation is not None for u in utts) else None


# ---- conversation items ---------------------------------------------------------------------------

def groups(data, idx) -> list[np.ndarray]:
    """Rows ``idx`` grouped into conversations (only these rows: one split), each in turn order;
    groups in order of their first row in ``idx``. A row in no conversation is a group of its own;
    without conversations every row is."""
    idx = np.asarray(idx, dtype=np.int64)
    ci = getattr(data, "conversations", None)
    if ci is None:
        return [idx[k:k + 1] for k in range(len(idx))]
    conv = ci.conv[idx]
    key = np.where(conv >= 0, conv, -1 - np.arange(len(idx)))  # a row without one: its own key
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))[inverse]  # group number by first appearance
    order = np.lexsort((np.arange(len(idx)), ci.turn[idx], rank))
    cuts = np.flatnonzero(np.diff(rank[order])) + 1
    return np.split(idx[order], cuts)


def order(data, idx) -> np.ndarray:
    """Positions into ``idx`` that put each conversation's rows together in turn order (what
    ``batch_rows`` yields for ``idx[order(...)]`` without shuffling, so the evaluator can map
    outputs back to rows)."""
    idx = np.asarray(idx, dtype=np.int64)
    pos = {int(r): k for k, r in enumerate(idx)}
    return np.array([pos[int(r)] for g in groups(data, idx) for r in g], dtype=np.int64)


def batch_rows(data, idx, n_conversations: int, rng: np.random.Generator | None = None) -> list[list[np.ndarray]]:
    """Batches of ``n_conversations`` whole conversations (each a row array in turn order) over
    rows ``idx``; the conversations shuffled when ``rng`` is given."""
    g = groups(data, idx)
    if rng is not None:
        g = [g[k] for k in rng.permutation(len(g))]
    return [g[s:s + n_conversations] for s in range(0, len(g), max(1, int(n_conversations)))]


def layout_fields(data, convs: list[np.ndarray]) -> dict:
    """The batch keys ``conversation``, ``turn``, ``speaker`` (see the module docstring) for the
    concatenated rows of ``convs``."""
    import torch

    ci = getattr(data, "conversations", None)
    conv, turn, spk = [], [], []
    for c, rows in enumerate(convs):
        conv.append(np.full(len(rows), c))
        turn.append(np.arange(len(rows)))
        codes = ci.speaker[rows] if ci is not None else np.full(len(rows), -1)
        # unknown speakers (-1) are each their own; known ones numbered by first turn
        keys = np.where(codes >= 0, codes, -2 - np.arange(len(rows)))
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        spk.append(np.argsort(np.argsort(first))[inverse])
    def cat(parts):
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros(0, dtype=torch.int64)

    return {"conversation": cat(conv), "turn": cat(turn), "speaker": cat(spk)}


def batches(data, idx, n_conversations: int, normalizer=None, rng=None):
    """Collated batches of whole conversations (``MultimodalData.batches(unit="conversation")``)."""
    from train.streaming import collated  # the utterance batches' path: a streamed store reads ahead

    groups = list(batch_rows(data, idx, n_conversations, rng))
    for convs, batch in zip(groups, collated(data, [np.concatenate(c) for c in groups], normalizer)):
        batch.update(layout_fields(data, convs))
        yield batch


# ---- what a method reads ----------------------------------------------------------------------------

def layout(batch: dict):
    """(conversation, turn, speaker) tensors of a batch; a batch without them (one built by
    ``collate`` alone) is one-utterance conversations."""
    import torch

    n = len(batch["natural"])
    if "conversation" in batch:
        return batch["conversation"], batch["turn"], batch["speaker"]
    dev = batch["natural"].device
    zero = torch.zeros(n, dtype=torch.long, device=dev)
    return torch.arange(n, device=dev), zero, zero


def utterance_view(batch: dict, full: bool = False) -> dict:
    """{m: (B, D_m)}: each modality's mean over its valid frames (``frame_mask``), zero where it
    has none (a masked or naturally absent modality). ``full=True`` reads the unmasked truth
    (``x_full``, ``frame_mask_full``), for reconstruction targets in a loss."""
    x = batch["x_full" if full else "x"]
    fm = batch["frame_mask_full" if full else "frame_mask"]
    out = {}
    for m in MODALITIES:
        w = fm[m].to(x[m].dtype)[..., None]
        out[m] = (x[m] * w).sum(1) / w.sum(1).clamp(min=1.0)
    return out


def to_conversations(values, batch: dict):
    """Rows (B, ...) laid out as (C, L, ...) conversations (zero padded) and the (C, L) bool mask
    of real turns."""
    import torch

    conv, turn, _ = layout(batch)
    C = int(conv.max()) + 1 if len(conv) else 0
    L = int(turn.max()) + 1 if len(turn) else 0
    out = values.new_zeros((C, L, *values.shape[1:]))
    out[conv, turn] = values
    mask = torch.zeros((C, L), dtype=torch.bool, device=values.device)
    mask[conv, turn] = True
    return out, mask


def from_conversations(values, batch: dict):
    """The inverse of ``to_conversations``: (C, L, ...) back to the batch's rows (B, ...)."""
    conv, turn, _ = layout(batch)
    return values[conv, turn]


def speakers_grid(batch: dict):
    """(C, L) int64 speaker of each turn (0 on padding), laid out as ``to_conversations``."""
    _, _, spk = layout(batch)
    grid, _ = to_conversations(spk, batch)
    return grid
