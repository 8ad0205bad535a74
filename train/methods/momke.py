"""MoMKE — Mixture of Modality Knowledge Experts (Xu, Jiang, Liang; ACM MM 2024; code wxxv/MoMKE).

Each utterance enters as its modalities' utterance-level features (mean over valid frames, the
GCNet "UTT" features the authors use: ``train.conversations.utterance_view``), a missing modality
carrying nothing. MoMKE works over whole conversations (``batching = "conversation"``): its
experts attend across the turns of a dialogue, as the authors' GCNet-style loaders feed them.

Per modality m: p_m = Dropout(Linear(x_m)) (D_e). An *expert* E_e (one per modality e) is a stack
of ``depth`` layers, each ``y <- y + layer(y)`` with layer(y) = o + MLP(o), o = multi-head
self-attention over the turns (q, k, v linear, no output projection, no norm), keys limited to the
turns where the modality being read is present; MLP = Linear, GELU, Dropout, Linear, Dropout.

Two stages, each a registered method with its own config (``requires:`` links them):

``momke-experts`` (stage 1, unimodal expert training): expert E_m reads modality m only, a linear
head per modality classifies its output h_m = E_m(p_m):

    L1 = ce * sum_m CE(head_m(h_m), y)   (each CE the mean over the utterances that have m)

``momke`` (stage 2, experts mixing training) starts its projections and experts from stage 1.
Every expert reads every modality; the Soft Router of modality m (MLP D_e -> D_e -> 3, softmax)
weighs them per utterance:

    r_m = sum_e w_{m,e} E_e(p_m),  w_m = softmax(Router_m(p_m))
    z = [r_a; r_v; r_t] (r_m = 0 where m is missing),  hidden = z + Dropout(ReLU(W z)),
    logits = head(hidden),   L2 = ce * CE(logits, y)

Ablation ``momke-norouter`` (``model.router: false``): no router is built; every expert weighs
1/3 (the mixture without the Soft Router). The paper's text was not at hand when this was
written, so this reading of its router ablation is not checked against its table;
the architecture and values here come from the authors' released code and the paper's abstract.

Hyperparameters (the authors' run_MoMKE_iemocap4.sh, model_expert_softmoe.py, train_MoMKE.py):
D_e (``--hidden``) 256, depth 4, 2 heads, MLP ratio 1, dropout 0.5 everywhere the code uses
``--drop_rate`` (input projections, expert and router MLPs, the fusion), attention dropout 0,
Adam lr 1e-4 with L2 1e-5 (``--l2``), batch 16 conversations, 100 + 100 epochs (``--epochs 200
--stage_epoch 100``); CMU-MOSI 32 conversations and 150 + 150, CMU-MOSEI 32 and 50 + 50, with
MSE for regression. PyTorch's default initialisation. Stage 1 sees complete data. On the demo
(about 8 training conversations per fold) each stage runs 30 epochs of one conversation per batch.

Selection. The authors' released scripts report, per fold, the epoch with the best *test*
accuracy (``best_index_test = np.argmax(test_accs)`` in train_MoMKE.py, weighted F1 on CMU-MOSI
and CMU-MOSEI): the published numbers are selected on the test set. imer does not: each stage
keeps the epoch with the best validation score (stage 1: UA pooled over a, v, t, i.e. each
expert on its own modality; stage 2: pooled over the seven conditions it trains on).

Departures, and why:
- stage 2's training masks: the authors train one model per test condition, masking every
  training utterance with that very condition; imer trains one model, each utterance drawing one
  of a, v, t, av, at, vt, avt uniformly, and tests it under every condition (fixed masks, seeded);
- expert hand-over: the code meant to load each expert from its best stage-1 epoch by *training*
  accuracy, but ``model.state_dict().update(...)`` changes a copy and every stored "model" is the
  same object, so stage 2 continues from the last stage-1 epoch; imer starts stage 2 from the
  stage-1 epoch selected on validation (projections and experts; heads, routers and fusion fresh);
- one Adam runs through both stages in the code; imer starts stage 2 with a fresh optimiser
  (same settings), as every prerequisite in imer does;
- a modality a sample lacks counts in no loss of its expert and no attention key (the code trains
  on GCNet's zero vectors for a missing face as on any utterance); acoustic features are
  normalised with training-fold statistics like every method's (the code reads them raw);
- the modality order of z is imer's (a, v, t), not (a, t, v): a permutation;
- only one split's utterances form a conversation (train.conversations), as in GCNet's
  leave-one-session-out protocol the authors use.
"""

from __future__ import annotations

import torch
from torch import nn

from train.conditions import MODALITIES
from train.conversations import from_conversations, to_conversations, utterance_view
from train.methods import Method, register


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout (the authors' Mlp, used in experts and routers)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        self.act, self.drop = nn.GELU(), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ExpertLayer(nn.Module):
    """Self-attention over a conversation's turns (keys: the turns where the modality read is
    present) without output projection, then ``o + MLP(o)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"momke: model.experts.hidden ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, dropout)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        C, L, D = x.shape
        split = lambda t: t.view(C, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q.float() * (D // self.heads) ** -0.5) @ k.float().transpose(-2, -1)  # float32 softmax
        scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        any_key = keys.any(-1)[:, None, None, None]
        # a conversation with no key for this modality attends to nothing (the code's NaN -> 0)
        attn = torch.softmax(torch.where(any_key, scores, torch.zeros_like(scores)), -1) * any_key
        o = (self.attn_drop(attn).to(v.dtype) @ v).transpose(1, 2).reshape(C, L, D)
        return o + self.mlp(o)


class Expert(nn.Module):
    """One modality's knowledge expert: ``depth`` residual ExpertLayers."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(dim, heads, mlp_ratio, dropout, attn_dropout) for _ in range(depth))

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, keys)
        return x


class _MoMKEBase(Method):
    """What both stages share: input projections, the three experts, running one over a modality."""

    batching = "conversation"
    exports = ("projections", "experts")

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        e = m.get("experts", {})
        self.dim = int(e.get("hidden", 256))
        self.dropout = float(m.get("dropout", 0.5))
        self.mlp_ratio = float(e.get("mlp_ratio", 1.0))
        self.w_ce = self.loss_weight("ce", 1.0)
        self.projections = nn.ModuleDict({k: nn.Linear(spec.dims[k], self.dim) for k in MODALITIES})
        self.in_drop = nn.Dropout(self.dropout)
        self.experts = nn.ModuleDict({k: Expert(self.dim, int(e.get("depth", 4)), int(e.get("heads", 2)), self.mlp_ratio,
                                                self.dropout, float(e.get("attn_dropout", 0.0))) for k in MODALITIES})

    def inputs(self, batch) -> tuple[dict, dict]:
        """({m: p_m (B, D_e)}, {m: (B,) bool present}) of the masked batch."""
        u = utterance_view(batch)
        present = {k: batch["frame_mask"][k].any(1) for k in MODALITIES}
        return {k: self.in_drop(self.projections[k](u[k])) for k in MODALITIES}, present

    def run_expert(self, expert: str, p: dict, present: dict, batch) -> dict:
        """Expert ``expert`` over each modality of ``p`` ({m: rows (B, D_e)}) laid out as
        conversations, keys where that modality is ``present``; {m: rows (B, D_e)}. The
        modalities go through in one call, stacked as separate conversations."""
        ks = list(p)
        grids = [to_conversations(p[k], batch) for k in ks]
        keys = torch.cat([to_conversations(present[k], batch)[0] & turns for k, (_, turns) in zip(ks, grids)])
        out = self.experts[expert](torch.cat([g for g, _ in grids]), keys).chunk(len(ks))
        return {k: from_conversations(o, batch) for k, o in zip(ks, out)}


def _zero_absent(h: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    return torch.where(present[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))


@register
class MoMKEExperts(_MoMKEBase):
    """Stage 1: each expert trained on its own modality, one classifier head per modality."""

    name = "momke-experts"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.heads = nn.ModuleDict({k: nn.Linear(self.dim, spec.out_dim) for k in MODALITIES})

    def forward_parts(self, batch) -> dict:
        p, present = self.inputs(batch)
        h = {k: _zero_absent(self.run_expert(k, {k: p[k]}, present, batch)[k], present[k]) for k in MODALITIES}
        return {"h": h, "present": present, "logits": {k: self.heads[k](h[k]) for k in MODALITIES}}

    def predict(self, batch):
        """The mean of the heads of the modalities present (under condition a: expert a's head)."""
        parts = self.forward_parts(batch)
        w = torch.stack([parts["present"][k] for k in MODALITIES], -1).float()
        out = torch.stack([parts["logits"][k].float() for k in MODALITIES], -1)
        return (out * w[:, None]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1.0)

    def loss(self, batch):
        parts = self.forward_parts(batch)
        terms = {}
        for k in MODALITIES:
            rows = parts["present"][k]
            if rows.any():
                terms[f"ce_{k}"] = self.w_ce * self.task_loss(parts["logits"][k][rows], batch["y"][rows])
        if not terms:
            raise ValueError("momke-experts: a training batch with no modality present anywhere; check the features")
        return sum(terms.values()), terms


@register
class MoMKE(_MoMKEBase):
    """Stage 2: every expert on every modality, mixed per utterance by each modality's Soft Router."""

    name = "momke"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        use_router = bool(cfg["model"].get("router", True))
        n = len(MODALITIES)
        self.routers = nn.ModuleDict({k: Mlp(self.dim, int(self.dim * self.mlp_ratio), n, self.dropout)
                                      for k in MODALITIES}) if use_router else None
        self.fuse = nn.Linear(n * self.dim, n * self.dim)
        self.out_drop = nn.Dropout(self.dropout)
        self.head = nn.Linear(n * self.dim, spec.out_dim)
        self.expects_inheritance()

    def attach(self, prereqs):
        self.inherit(prereqs, "experts", ["projections", "experts"])

    def router_weights(self, k: str, p: torch.Tensor) -> torch.Tensor:
        """(B, 3) weights of the experts (order a, v, t) for modality ``k``'s utterances."""
        if self.routers is None:
            return p.new_full((p.shape[0], len(MODALITIES)), 1.0 / len(MODALITIES))
        return torch.softmax(self.routers[k](p).float(), -1)

    def forward_parts(self, batch) -> dict:
        p, present = self.inputs(batch)
        expert_out = {e: self.run_expert(e, p, present, batch) for e in MODALITIES}  # [e][m]: E_e(p_m)
        mixed, weights = {}, {}
        for k in MODALITIES:
            w = weights[k] = self.router_weights(k, p[k])
            outs = torch.stack([expert_out[e][k] for e in MODALITIES], 1)  # (B, 3, D)
            mixed[k] = _zero_absent((w[..., None].to(outs.dtype) * outs).sum(1), present[k])
        z = torch.cat([mixed[k] for k in MODALITIES], -1)
        hidden = z + self.out_drop(torch.relu(self.fuse(z)))
        return {"weights": weights, "hidden": hidden, "logits": self.head(hidden)}

    def predict(self, batch):
        return self.forward_parts(batch)["logits"]

    def represent(self, batch):
        """hidden = z + Dropout(ReLU(W z)), the representation the head reads."""
        return self.forward_parts(batch)["hidden"]

    def loss(self, batch):
        self.check_inherited()
        ce = self.w_ce * self.task_loss(self.forward_parts(batch)["logits"], batch["y"])
        return ce, {"ce": ce}
