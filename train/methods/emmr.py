"""EMMR — Ensemble-based Missing Modality Reconstruction (Zeng, Zhou, Liu; EMNLP 2022).

The paper's design (SPEC.md §3), not the released TensorFlow code's: by our reading that code
never runs its recovery or ensemble (a graph-mode ``tensor == 0`` test is object identity, always
False, so it is in effect the paper's "TF" row), and it picks checkpoints on the *test* set.
imer selects on the validation split only, like every method here.

Two registered methods, each with its config:

``emmr-teacher`` (§3.4, Eq. 3): the encoder — per modality a dense layer to d = 300 and 4-head
self-attention (Eq. 1) — then the modalities' outputs concatenated along time,
E_pre = [E_v; E_a; E_t], and a classifier, trained with CE on complete data.

``emmr`` (``requires: {teacher: emmr-teacher}``): a student encoder of the same shape reads the
masked sample, X = [E_v; E_a; E_t]. Three encoder-decoders (§3.5): the Transformer on X
(E_TF = FFN(MHA(X)), D_TF = FFN(MHA(E_TF)); F = E_TF is the backbone's encoder output), the
300-256-128-64 autoencoder and MMIN's 5-block cascade residual AE (the framework's
``CascadeResidualAE``, D = input + sum of block outputs). For each decoder, the recovered input
I = X with the missing modality's slice replaced by the decoder's (§3.6). Per sample, the
key-missing check compares L_vat = Judge(I_TF) with L_avail = Judge(the available slices): when
their argmaxes differ, every pair's logits L_k = Judge(I_m, I_n) are weighted by
alpha = softmax_k(max softmax(L_k)) into E_key = [alpha_va L_va; alpha_vt L_vt; alpha_at L_at]
(Eqs. 10-11) for each decoder, and the three E_key are fused by attention (Eq. 12) into r;
otherwise R = F (Eq. 13). Loss (Eqs. 14-16), the ½ factors included, plus the Judge's own term:

    L = CE + forward * ½(KL(F || E_pre) + KL(E_pre || F)) + backward * ½(KL(X' || X~) + KL(X~ || X'))
        + judge * L_judge

where E_pre is the frozen teacher's encoding of the *full* sample, X' each decoder's output
(averaged over the decoders) and KL is taken between per-frame softmaxes over the feature dim.

L_judge: Eqs. 8-9 call the Judge's outputs sentiment labels, and the check compares their argmaxes,
so each is a sentiment prediction trained with the label (CE); Eq. 14 names no such term and the
released code never runs the check, so the weight is imer's (``loss.judge``, default 1, as the CE).
Supervised: on *every* sample of the batch, the Judge's seven predictions on the backbone's
recovered input I_TF (I_TF = X on a complete sample): L_vat (Eq. 8), the three pairs L_va, L_vt,
L_at (Eq. 9) and the three single modalities; L_judge is their mean CE over samples x 7, each
prediction weighted alike. Why these: the check reads L_vat and L_avail, and L_avail *is* one of
them (the available pair, or with two missing the available single modality: its slots of I_TF
are X's); the ensemble reads the pairs. Every sample, so the Judge learns on every batch, also when
the check fires nowhere (with CE alone it would learn only through the fired rows' ensemble
output). The singles because the eta protocol never drops two modalities, yet the fixed
conditions a, v, t check against one. Pairs and singles that contain a missing modality read its
reconstruction, as the ensemble's pairs do. The Judge's pairs on the AE's and the CRA's
recoveries are not supervised on their own: they run on the fired rows only and learn through
the ensemble's CE there. The term's gradient reaches the decoder and the student encoder through
I_TF (end to end, like the CE).

Choices where the paper is silent or its equations do not fit together (also in the config):
- Utterance vectors (for the classifiers and Judge) are a mean over modalities of each
  modality's mean over its frames ("balanced pooling"), so 150 audio frames do not outweigh 25
  text tokens. Missing modalities' positions count as frames of their reconstruction.
- One Judge (attention + FC) computes L_vat, L_avail and every pair, so their predictions are on
  one scale; for each subset it reads only the selected modalities' slots. With two modalities
  missing (the fixed conditions a, v, t) the check compares with the one available modality.
- Eq. 17 feeds "R" to one FC, but r (3C) and F (d) differ in size: R = F goes through the
  classifier d -> C, r through a linear layer 3C -> C.
- The AE and the CRA are per-frame maps (Eqs. 5-6). On X they could only output one constant
  for a missing modality (its positions hold the encoding of a zero sequence, the same for every
  sample), so they read the backbone's recovered input I_TF and each re-estimates the missing
  slice from it (``model.ensemble_input: x`` gives the literal reading). They run on the samples
  that miss a modality, the only ones they serve, and their reconstruction loss is taken there.
- The Transformer's and the Judge's attention have no dropout (``model.tf.attention_dropout``);
  the 0.2 of SPEC.md §3 is Eq. 1's (``model.encoder.dropout``), 0.3 the FFNs' and classifiers'.
- The reconstruction target X~ (Eq. 16's "processed input"): the masked X itself would teach the
  decoders to reproduce the encoding of a zero sequence where a modality is missing, which makes
  recovery pointless; imer's target is the student encoder's encoding of the complete sample: X
  on the available slices and the real modality's encoding on the missing ones, computed without
  gradient (a stop-gradient target as in MMIN's cycle loss) and without dropout (the encoder in
  eval mode for that pass, so the target is not a draw of Eq. 1's dropout noise).
  ``loss.backward_target: masked`` gives the literal reading (X as the decoder read it).
- The student encoder starts from random weights (the paper does not say it is initialised from
  the teacher); ``model.student_init: teacher`` copies the teacher's weights into it.
- The authors' IEMOCAP code used T 50 text tokens; the paper's table says 25 (used here).
Ablations (Table 3): ``model.ensemble: false`` (TF: R = F always), ``model.reconstructors``
([tf, ae] / [tf, cra]), ``model.fusion: max | average``.

Precision (``train.amp``): the symmetric KL terms (per-frame softmaxes over 300 dims, the
forward / backward targets), Eq. 10's pair weights (softmax of max-softmax) and the CE terms run
in float32 (``pipeline.device.float32``); encoders, TF, AE / CRA and the Judge in the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from train.conditions import MODALITIES
from train.methods import Method, register
from train.methods.emmr_nets import (AVT, FULL, ORDER, PAIR_SUBSETS, Fusion, FrameAE, Judge, Layout, ModalityEncoder,
                                     TransformerED, balanced_pool, cat_frames, key_representation, subset_index,
                                     sym_kl)
from train.nets import CascadeResidualAE, FcClassifier, modality_valid

RECONSTRUCTORS = ("tf", "ae", "cra")


def _encoder(spec, mcfg) -> ModalityEncoder:
    e = mcfg.get("encoder", {})
    return ModalityEncoder(spec.dims, int(e.get("dim", 300)), int(e.get("heads", 4)), float(e.get("dropout", 0.2)))


def _check_task(name, spec):
    if spec.task != "classification":
        raise ValueError(f"{name} classifies (its key-missing check compares predicted classes); this data is "
                         "a regression task: set data.target, e.g. {kind: sign, classes: 3} for CMU-MOSI")


def _valid(batch, natural: bool = False) -> dict:
    """Per-modality valid frames: of the masked sample, or (``natural``) of the complete one."""
    if natural:
        return {m: batch["frame_mask_full"][m] & batch["natural"][:, MODALITIES.index(m)][:, None] for m in ORDER}
    return {m: modality_valid(batch, m) for m in ORDER}


@register
class EMMRTeacher(Method):
    """The pre-trained network of §3.4: encoder + classifier on complete data (Eq. 3)."""

    name = "emmr-teacher"
    exports = ("encoder",)

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        _check_task(self.name, spec)
        m = cfg["model"]
        self.encoder = _encoder(spec, m)
        self.dropout = nn.Dropout(float(m.get("dropout", 0.3)))
        self.classifier = FcClassifier(self.encoder.dim, m.get("classifier", []), spec.out_dim, float(m.get("dropout", 0.3)))

    def predict(self, batch):
        valid = _valid(batch)
        e = cat_frames(self.encoder(batch["x"], valid))
        layout = Layout({m: batch["x"][m].shape[1] for m in ORDER})
        return self.classifier(self.dropout(balanced_pool(e, cat_frames(valid), layout)))

    def loss(self, batch):
        ce = self.task_loss(self.predict(batch), batch["y"])
        return ce, {"ce": ce}


@register
class EMMR(Method):
    name = "emmr"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        _check_task(self.name, spec)
        m = cfg["model"]
        self.w_forward = self.loss_weight("forward", 0.1)
        self.w_backward = self.loss_weight("backward", 0.1)
        self.w_judge = self.loss_weight("judge", 1.0)
        self.backward_kind = cfg.get("loss", {}).get("backward_target", "full")
        if self.backward_kind not in ("full", "masked"):
            raise ValueError(f"emmr: loss.backward_target must be full or masked, got {self.backward_kind!r}")
        self.ensemble_input = m.get("ensemble_input", "recovered")
        if self.ensemble_input not in ("recovered", "x"):
            raise ValueError(f"emmr: model.ensemble_input must be recovered or x, got {self.ensemble_input!r}")
        self.student_init = m.get("student_init", "random")
        if self.student_init not in ("random", "teacher"):
            raise ValueError(f"emmr: model.student_init must be random or teacher, got {self.student_init!r}")
        self.recon = list(m.get("reconstructors", RECONSTRUCTORS))
        if self.recon[:1] != ["tf"] or set(self.recon) - set(RECONSTRUCTORS) or len(set(self.recon)) != len(self.recon):
            raise ValueError(f"emmr: model.reconstructors must start with tf (the backbone) and name each of "
                             f"{', '.join(RECONSTRUCTORS)} at most once; got {self.recon}")
        self.ensemble = bool(m.get("ensemble", True))

        self.encoder = _encoder(spec, m)  # the student
        self.teacher = self.freeze(_encoder(spec, m))  # filled from the emmr-teacher prerequisite
        self.expects_inheritance()
        d, heads = self.encoder.dim, int(m.get("encoder", {}).get("heads", 4))
        drop = float(m.get("dropout", 0.3))
        t = m.get("tf", {})
        attn_drop = float(t.get("attention_dropout", 0.0))  # for the TF and the Judge; Eq. 1's is model.encoder.dropout
        self.tf = TransformerED(d, heads, int(t.get("ffn", d)), float(t.get("dropout", drop)), attn_drop)
        self.ae = FrameAE(d, m.get("ae", {}).get("layers", (256, 128, 64))) if "ae" in self.recon else None
        c = m.get("cra", {})
        self.cra = (CascadeResidualAE(d, c.get("layers", (256, 128, 64)), int(c.get("blocks", 5)), transition=False)
                    if "cra" in self.recon else None)
        self.dropout = nn.Dropout(drop)
        self.classifier = FcClassifier(d, m.get("classifier", []), spec.out_dim, drop)  # R = F
        if self.ensemble:
            n_key = 3 * spec.out_dim
            self.judge = Judge(d, heads, spec.out_dim, attn_drop)
            self.fusion = Fusion(n_key, m.get("fusion", "attention"))
            self.key_classifier = nn.Linear(n_key, spec.out_dim)  # R = r

    def attach(self, prereqs):
        parts = ["encoder"] if self.student_init == "teacher" else []
        self.inherit(prereqs, "teacher", parts, teachers={"teacher": "encoder"})

    # -- the forward pass ---------------------------------------------------------------------------
    def forward_parts(self, batch, judge_all: bool = False) -> dict:
        """Every intermediate of one forward. ``judge_all`` (the loss): the Judge scores every sample,
        not only those the check runs on, for its own loss."""
        layout = Layout({m: batch["x"][m].shape[1] for m in ORDER})
        present = batch["present"][:, AVT]  # (B, 3) in (v, a, t) order
        valid = cat_frames(_valid(batch))
        x = cat_frames(self.encoder(batch["x"], _valid(batch)))
        missing = layout.expand(~present)  # every position of a missing modality
        slots = valid | missing
        f = self.tf.encode(x, valid)
        d_tf = self.tf.decode(f, slots)
        rep = balanced_pool(f, slots, layout)  # R = F, pooled: the classifier's input
        out_f = self.classifier(self.dropout(rep))
        p = {"layout": layout, "present": present, "valid": valid, "slots": slots, "missing": missing,
             "x": x, "f": f, "dec": {"tf": d_tf}, "recovered": {"tf": torch.where(missing[..., None], d_tf, x)},
             "rep": rep, "out_f": out_f, "out": out_f}
        if self.ensemble:
            p.update(self.key_missing(p, judge_all))
        return p

    def key_missing(self, p, judge_all: bool = False) -> dict:
        """Eqs. 8-13, vectorised over the samples that need them: the AE / CRA recoveries and the
        check on every sample that misses one or two modalities, the ensemble where it fires."""
        present, slots, layout, x = p["present"], p["slots"], p["layout"], p["x"]
        B, C = present.shape[0], p["out_f"].shape[1]
        n_avail = present.sum(1)
        check = ((n_avail >= 1) & (n_avail < 3)).nonzero().squeeze(1)
        out = {"check": check, "fire": torch.zeros(B, dtype=torch.bool, device=present.device),
               "l_full": p["out_f"].new_zeros(B, C), "l_avail": p["out_f"].new_zeros(B, C)}
        # the Judge on I_TF: every subset's logits (B or len(check), 7, C)
        rows = torch.arange(B, device=x.device) if judge_all else check
        if len(rows):
            judged = self.judge(p["recovered"]["tf"][rows], slots[rows], layout)
            out["judge_logits"] = judged
        if not len(check):
            return out
        jc = judged[check] if judge_all else judged
        miss, sl = p["missing"][check], slots[check]
        # the other reconstructors read the backbone's recovery (module docstring)
        src = p["recovered"]["tf"][check] if self.ensemble_input == "recovered" else x[check]
        dec = {"tf": p["dec"]["tf"][check]}
        if self.ae is not None:
            dec["ae"] = self.ae(src)
        if self.cra is not None:
            dec["cra"] = self.cra(src)[0]
        rec = {j: torch.where(miss[..., None], d, x[check]) for j, d in dec.items()}
        out.update(check_dec=dec, check_recovered=rec)

        lf = jc[:, FULL]  # L_vat
        la = jc[torch.arange(len(check), device=x.device), subset_index(present[check])]  # L_avail
        out["l_full"] = out["l_full"].index_copy(0, check, lf.to(out["l_full"].dtype))
        out["l_avail"] = out["l_avail"].index_copy(0, check, la.to(out["l_avail"].dtype))
        fired = lf.argmax(-1) != la.argmax(-1)
        out["fire"][check] = fired
        k = fired.nonzero().squeeze(1)  # positions within ``check``
        if not len(k):
            return out
        pairs = list(PAIR_SUBSETS)
        # the backbone's pair logits are there already; the others' are made for the fired rows only
        judged_k = {j: jc[k] if j == "tf" else self.judge(rec[j][k], sl[k], layout) for j in self.recon}
        pair_logits = torch.stack([judged_k[j][:, pairs] for j in self.recon], 1)  # (fired, J, 3 pairs, C)
        e_key = key_representation(pair_logits)  # (fired, J, 3C)
        r = self.fusion(e_key)
        idx = check[k]
        out.update(idx=idx, pair_logits=pair_logits, e_key=e_key, r=r,
                   out=p["out_f"].index_copy(0, idx, self.key_classifier(r).to(p["out_f"].dtype)))
        return out

    def predict(self, batch):
        return self.forward_parts(batch)["out"]

    def represent(self, batch):
        """The backbone's encoding F of the masked sample, pooled (R = F, Eq. 13: what the main
        classifier reads). Where the key-missing check fires the ensemble's r (3C weighted pair
        logits) replaces it; that is a vector of logits, not a representation, so it is not shown."""
        return self.forward_parts(batch)["rep"]

    # -- training -----------------------------------------------------------------------------------
    def teacher_encoding(self, batch) -> torch.Tensor:
        """E_pre: the frozen teacher's encoding of the complete sample."""
        with torch.no_grad():
            return cat_frames(self.teacher(batch["x_full"], _valid(batch, natural=True)))

    def backward_target(self, batch, p) -> torch.Tensor:
        """X~ of Eq. 16: the student encoder's encoding of the complete sample, computed without
        gradient and without dropout (eval mode for this pass, its mode restored after): X on the
        available slices, the real modality's encoding on the missing ones; ``backward_target:
        masked``: X itself."""
        if self.backward_kind == "masked":
            return p["x"].detach()
        was = self.encoder.training
        self.encoder.eval()  # a target, not a sample of the dropout noise
        try:
            with torch.no_grad():
                return cat_frames(self.encoder(batch["x_full"], _valid(batch, natural=True)))
        finally:
            self.encoder.train(was)

    def loss(self, batch):
        self.check_inherited()
        p = self.forward_parts(batch, judge_all=True)
        frames = cat_frames(_valid(batch, natural=True))  # frames the complete sample has
        parts = {"ce": self.task_loss(p["out"], batch["y"]),
                 "forward": self.w_forward * sym_kl(p["f"], self.teacher_encoding(batch), frames)}
        if self.w_backward:
            target = self.backward_target(batch, p)
            terms = [sym_kl(p["dec"]["tf"], target, frames)]
            extra = {j: d for j, d in p.get("check_dec", {}).items() if j != "tf"}
            if extra:  # AE / CRA ran on the samples that miss a modality
                rows = p["check"]
                terms += [sym_kl(d, target[rows], frames[rows]) for d in extra.values()]
            parts["backward"] = self.w_backward * torch.stack(terms).mean()
        if self.ensemble and self.w_judge:
            # Eqs. 8-9: each of the Judge's seven predictions on I_TF is a sentiment prediction
            logits = p["judge_logits"]  # (B, 7, C): every sample
            y = batch["y"].repeat_interleave(logits.shape[1])
            parts["judge"] = self.w_judge * nn.functional.cross_entropy(logits.flatten(0, 1).float(), y)
        return sum(parts.values()), parts
