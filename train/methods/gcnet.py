"""GCNet — Graph Completion Network for incomplete multimodal learning in conversation (Lian, Chen,
Sun, Liu, Tao; IEEE TPAMI 2023; code zeroQiaoba/GCNet, gcnet/).

Each utterance is one vector: its modalities' utterance-level features (mean over valid frames,
the authors' "UTT" features) concatenated, a missing modality all zeros. Over a whole
conversation (``batching = "conversation"``, train.conversations):

1. a 2-layer bidirectional LSTM gives each turn its sequential context h (2 D_e);
2. two graph branches read h: the *temporal* graph (relations past / now / future) and the
   *speaker* graph (relation = (speaker of the receiving turn, speaker of the sending turn),
   S^2 types). Both join turns within a window: turn j sends to turns j - past .. j + future
   (self included), never across conversations. A branch = relational graph convolution
   (RGCN: per relation, the mean of W_r h_j over the senders, plus W_root h_i + b), then a
   graph convolution (W_rel sum_j g_j + b + W_root g_i), concatenated with h, a 2-layer
   bidirectional LSTM over the turns and Linear + ReLU back to D_h = 2 D_e + D_g;
3. hidden = temporal + speaker branch (an ablation keeps one); a linear classifier reads it, and
   a linear completion head maps it back to the input features (the completed utterance).

    L = ce * CE(logits, y) + recon * (1/N) sum_i sum_{m missing in i} mean_d (x^_{i,m,d} - x_{i,m,d})^2

(the reconstruction term counts only the modalities the protocol removed, each averaged over its
dimensions, summed, then averaged over the batch's utterances: the authors' MaskedReconLoss). For
regression (CMU-MOSI/MOSEI) the task term is MSE, as their MaskedMSELoss.

Hyperparameters from the authors' released run.sh / train_gcnet.py (IEMOCAP, the setting at most
missing rates): LSTM base model, D_e (``--hidden``) 200, graph hidden D_g = D_e // 2 = 100,
windows past 2 / future 2, dropout 0.5 (inside the LSTMs only), reconstruction loss on with
weight 1, Adam lr 1e-3 with weight decay 1e-5 (``--l2``), batch 32 conversations, 100 epochs,
two speakers (one on MOSI/MOSEI), no nodal attention (``--time-attn`` is off in every released
command). Departures, each a choice imer makes for every method:
- the authors train one model per missing rate, drawing CPM-Net masks with that rate on every
  split, and pick the epoch by the *test* set's weighted F1 on IEMOCAP (their IEMOCAP loaders
  return the test loader as validation); imer trains one model, each batch drawing one rate of
  0 ... 0.7 (train.protocols), and selects on validation UA pooled over those rates;
- their LSTMs run over zero-padded conversations (a turn's backward state reads the padding of
  shorter batch-mates); imer packs the sequences, so a prediction depends on its conversation only;
- a conversation's speakers are numbered by first turn (IEMOCAP: F = 0, M = 1 in the code), and
  only the utterances of one split form a conversation (train.conversations);
- the modality order of the input vector is imer's (a, v, t), not (a, t, v): a permutation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from train.conditions import MODALITIES
from train.conversations import from_conversations, speakers_grid, to_conversations, utterance_view
from train.methods import Method, register


def run_lstm(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``lstm`` (batch_first) over (C, L, D) conversations of ``lengths`` turns, padding unread."""
    packed = pack_padded_sequence(x, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class GraphEdges(nn.Module):
    """The edges of both graphs over (C, L) conversations: ``forward(mask, speakers)`` gives
    (temporal (C, 3, L, L), speaker (C, S^2, L, L)) 0/1 adjacency, entry [c, r, i, j] = turn j
    sends to turn i with relation r. Temporal r: 0 past (j before i), 1 now (j = i), 2 future;
    speaker r = S * speaker(i) + speaker(j). A window of -1 is unbounded."""

    def __init__(self, past: int, future: int, speakers: int):
        super().__init__()
        self.past, self.future, self.speakers = int(past), int(future), int(speakers)

    def forward(self, mask: torch.Tensor, speakers: torch.Tensor):
        L = mask.shape[1]
        t = torch.arange(L, device=mask.device)
        d = t[:, None] - t[None, :]  # [i, j] = i - j
        within = torch.ones_like(d, dtype=torch.bool)
        if self.past >= 0:
            within &= d >= -self.past  # j sends to i >= j - past
        if self.future >= 0:
            within &= d <= self.future  # ... and i <= j + future
        ok = (within[None] & mask[:, :, None] & mask[:, None, :]).float()
        order = torch.where(d > 0, 0, torch.where(d == 0, 1, 2))
        temporal = nn.functional.one_hot(order, 3).permute(2, 0, 1).float()[None] * ok[:, None]
        S = self.speakers
        rel = speakers[:, :, None] * S + speakers[:, None, :]
        speaker = nn.functional.one_hot(rel, S * S).permute(0, 3, 1, 2).float() * ok[:, None]
        return temporal, speaker


class RelationalConv(nn.Module):
    """RGCN layer (PyTorch Geometric's RGCNConv, mean aggregation): out_i = W_root h_i + b +
    sum_r mean_{j -> i in r} W_r h_j."""

    def __init__(self, d_in: int, d_out: int, relations: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(relations, d_in, d_out))
        nn.init.xavier_uniform_(self.weight)
        self.root = nn.Linear(d_in, d_out)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        norm = adj / adj.sum(-1, keepdim=True).clamp(min=1.0)  # mean over each relation's senders
        msg = torch.einsum("crij,cjd->crid", norm, h)
        return torch.einsum("crid,rde->cie", msg, self.weight) + self.root(h)


class GraphConv(nn.Module):
    """Graph convolution (PyTorch Geometric's GraphConv, sum aggregation): W_rel sum_{j -> i} g_j + b + W_root g_i."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.rel = nn.Linear(d_in, d_out)
        self.root = nn.Linear(d_in, d_out, bias=False)

    def forward(self, g: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.rel(adj @ g) + self.root(g)


class GraphBranch(nn.Module):
    """One graph of GCNet: RGCN -> GraphConv, concatenated with the input, BiLSTM, Linear + ReLU."""

    def __init__(self, d: int, relations: int, hidden: int, dropout: float):
        super().__init__()
        self.rgcn = RelationalConv(d, hidden, relations)
        self.gconv = GraphConv(hidden, hidden)
        d_h = d + hidden
        self.lstm = nn.LSTM(d_h, d_h, num_layers=2, bidirectional=True, dropout=dropout, batch_first=True)
        self.out = nn.Linear(2 * d_h, d_h)

    def forward(self, h: torch.Tensor, adj: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        g = self.gconv(self.rgcn(h, adj), adj.amax(1))  # GraphConv: every edge, whatever its relation
        z = run_lstm(self.lstm, torch.cat([h, g], -1), lengths)
        return torch.relu(self.out(z))


@register
class GCNet(Method):
    name = "gcnet"
    batching = "conversation"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.w_ce = self.loss_weight("ce", 1.0)
        self.w_recon = self.loss_weight("recon", 1.0)
        d_e = int(m.get("hidden", 200))
        d_g = int(m.get("graph_hidden") or d_e // 2)
        dropout = float(m.get("dropout", 0.5))
        self.dims = [spec.dims[k] for k in MODALITIES]
        d_in = sum(self.dims)
        graphs = m.get("graphs", {"temporal": True, "speaker": True})
        if not (graphs.get("temporal") or graphs.get("speaker")):
            raise ValueError("gcnet: model.graphs switches off both the temporal and the speaker graph; keep one")
        self.n_speakers = int(m.get("speakers", 2))
        w = m.get("window", {})
        self.edges = GraphEdges(w.get("past", 2), w.get("future", 2), self.n_speakers)
        self.context = nn.LSTM(d_in, d_e, num_layers=2, bidirectional=True, dropout=dropout, batch_first=True)
        self.temporal = GraphBranch(2 * d_e, 3, d_g, dropout) if graphs.get("temporal") else None
        self.speaker = GraphBranch(2 * d_e, self.n_speakers ** 2, d_g, dropout) if graphs.get("speaker") else None
        d_h = 2 * d_e + d_g
        self.classifier = nn.Linear(d_h, spec.out_dim)
        self.reconstruct = nn.Linear(d_h, d_in)  # the completion head: hidden -> all input features

    def inputs(self, batch) -> torch.Tensor:
        """(B, D_a + D_v + D_t): the utterance-level features, a missing modality zero."""
        u = utterance_view(batch)
        return torch.cat([u[m] for m in MODALITIES], -1)

    def forward_parts(self, batch) -> dict:
        x, mask = to_conversations(self.inputs(batch), batch)
        spk = speakers_grid(batch)
        if spk.numel() and int(spk.max()) >= self.n_speakers:
            raise ValueError(f"gcnet: a conversation has {int(spk.max()) + 1} speakers, the model "
                             f"{self.n_speakers} (model.speakers); raise it for this corpus")
        lengths = mask.sum(1)
        h = run_lstm(self.context, x, lengths)
        temporal_adj, speaker_adj = self.edges(mask, spk)
        hidden = 0
        if self.temporal is not None:
            hidden = hidden + self.temporal(h, temporal_adj, lengths)
        if self.speaker is not None:
            hidden = hidden + self.speaker(h, speaker_adj, lengths)
        hidden = from_conversations(hidden, batch)
        return {"hidden": hidden, "logits": self.classifier(hidden), "recon": self.reconstruct(hidden)}

    def predict(self, batch):
        return self.forward_parts(batch)["logits"]

    def represent(self, batch):
        """The graph hidden state the classifier reads (temporal + speaker branch)."""
        return self.forward_parts(batch)["hidden"]

    def recon_loss(self, recon: torch.Tensor, batch) -> torch.Tensor:
        """Mean over utterances of the summed, per-dimension-averaged squared error of the modalities
        the protocol removed (present in the data, absent from the input)."""
        truth = utterance_view(batch, full=True)
        missing = (batch["natural"] & ~batch["present"]).float()
        parts = torch.split(recon.float(), self.dims, dim=-1)
        per = [((p - truth[m].float()) ** 2).mean(-1) * missing[:, k]
               for k, (m, p) in enumerate(zip(MODALITIES, parts))]
        return torch.stack(per, -1).sum(-1).mean()

    def loss(self, batch):
        p = self.forward_parts(batch)
        parts = {"ce": self.w_ce * self.task_loss(p["logits"], batch["y"])}
        if self.w_recon > 0:
            parts["recon"] = self.w_recon * self.recon_loss(p["recon"], batch)
        return sum(parts.values()), parts
