"""CM-ARR — cross-modal alignment, reconstruction and refinement (Sun et al., ACL Findings 2024).

No public code exists; this is built from the paper (/shared/papers, SPEC.md §3). Per modality
n in (a, v, t) (the paper's s, v, t; frames resampled to one common length T, ``data.resample_to``):

1. Alignment. The UMC (``cm_arr_nets.UMC``: Linear to d, self-attention and a GELU MLP with
   LayerNorm) gives a diagonal Gaussian per frame, mean mu_n and standard deviation sigma_n. The
   utterance's Gaussian is the mean of mu_n and of sigma_n over its valid frames. Similarity
   S = a * D_2W + b (Eqs. 1, 5); L_udcl = InfoNCE in both directions (Eqs. 2-4) with a learnable
   temperature, summed over the (a, t), (t, v), (a, v) pairs, on the training batch's unmasked
   inputs, over the utterances that naturally have both modalities.
2. Reconstruction. X_n = Conv1d(d -> d)(mu_n) (Sec. 3.2; the flows read the *aligned* sequence);
   Z_n = F_n(X_n), a Glow-style flow per modality on every frame (``train/flows.py``, zuko). A
   missing modality's latent is the mean of the available latents (Eq. 7; the single one when one
   is available) and X~_m = F_m^-1(Z~_m) (Eq. 8).
3. Refinement. X^_m = stacked RCABs (1-D convs) of X~_m; L_rec = MSE(X^_m, X_m) against the
   projection of the real (unmasked) input, on training batches only (Eq. 9). L_spcl = supervised
   contrastive loss on the utterance means of the completed (available or refined) sequences,
   3 views per utterance, same label = positive. Fusion: cross-attention H_qm = CA(Q = X_q,
   K = V = X_m) for the two other modalities, concatenated, self-attention, mean over time,
   FC classifier (Eqs. 10-13).

Loss (Eq. 14): L = alpha L_udcl + beta L_spcl + lambda L_rec + L_cls (+ nll L_nll, off by default).

Choices the paper leaves open (each is a config key):
- Common length T (``data.resample_to``): the paper pools nowhere and Eq. 7 averages latents of
  different modalities frame by frame, so every modality needs the same length; 50 for the paper
  features (BERT ~25 tokens, Denseface ~50 frames, wav2vec2 ~225 frames on IEMOCAP), 16 on the demo.
- Sigma is the standard deviation, so Eq. 1 is the exact squared 2-Wasserstein distance of the two
  diagonal Gaussians (the paper writes "variance vector"; W2 needs the square roots).
- a, b (``model.align.learn``): learned by default, a kept negative as -softplus; a starts at -1/d.
  In the InfoNCE softmax b cancels exactly and only a / tau matters: kept for fidelity to Eq. 5.
  tau starts at 0.07 (MoCo, the InfoNCE the paper cites), learned (``model.align.learn_tau``).
- Training protocol: each sample draws one of the six missing conditions (MMIN's protocol, which
  the paper's comparison follows); the full-modality ground truth of the missing modalities is
  available to the losses (``x_full``), never to ``predict``.
- L_rec: the target X_m is detached (``loss.rec_detach``) so that the reconstruction loss cannot
  pull the target towards the reconstruction (a collapse of all projections to one point would
  make L_rec 0); the squared Frobenius norm is averaged over elements, so lambda does not depend
  on d * T.
- Flows: the paper names no design; 4 Glow steps (ActNorm, permutation + LU linear, affine
  coupling with a [d, d] MLP) per modality. Eq. 14 has no likelihood term: the flows train
  through L_rec (and the classifier) alone; ``loss.nll`` > 0 adds a DiCMoR-style negative
  log-likelihood of the available modalities' latents under N(0, I).
- Refinement: 4 RCABs per modality, reduction 16 (RCAN's); applied to reconstructed modalities
  only (Sec. 3.2: "the text-specific reconstruction module is used to recover the text features").
- Fusion: the equations are written for missing text, with text as the query; imer completes
  every sample to three sequences and always uses ``model.fusion.query`` (default t, the text
  modality, as in Eqs. 10-13) as the query, so one network serves all seven conditions. The
  text's "three cross-attention blocks" disagrees with its two equations; imer follows the
  equations. ``model.fusion.kind: concat`` is the "w/o attention" ablation.
- L_spcl temperature 0.07 (Khosla et al.'s); a sample with no modality at all (possible only when
  natural absence meets the condition) gets the zero latent (the base distribution's mean).
- Sizes: d = 128, 4 heads, dropout 0.1; classifier one hidden FC layer of d units (dropout 0.3).

Precision (``train.amp``): float32 for the flows and their log-determinants (``train.flows``: exact
inverses, triangular solves), the latents and Eq. 7's mean, the W2 / cosine similarity, InfoNCE
with its learnt temperature and SupCon (logits / 0.07: a bf16 matmul errs by ~1e-2 there), L_rec,
the NLL and the CE; the UMC, refinement and fusion run in the autocast dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from train.conditions import MODALITIES
from train.flows import GlowFlow, gaussian_nll
from train.methods import Method, register
from train.methods.cm_arr_nets import (UMC, AttentionFusion, ConcatFusion, Refiner, Similarity, info_nce,
                                       masked_mean, missing_latents, supcon)
from train.nets import FcClassifier, modality_valid

PAIRS = (("a", "t"), ("t", "v"), ("a", "v"))  # speech-text, text-video, speech-video


@register
class CMARR(Method):
    name = "cm-arr"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        d, heads, drop = int(m["dim"]), int(m.get("heads", 4)), float(m.get("dropout", 0.1))
        self.w_udcl = self.loss_weight("udcl", 1.0)
        self.w_spcl = self.loss_weight("spcl", 0.1)
        self.w_rec = self.loss_weight("rec", 10.0)
        self.w_nll = self.loss_weight("nll", 0.0)
        self.spcl_tau = float(cfg.get("loss", {}).get("spcl_tau", 0.07))
        self.rec_detach = bool(cfg.get("loss", {}).get("rec_detach", True))
        if self.w_spcl > 0 and spec.task != "classification":
            raise ValueError("cm-arr: L_spcl needs class labels; set loss.spcl: 0 for a regression task")
        k = int(m.get("projection", {}).get("kernel", 3))
        fl, rf, al = m.get("flow", {}), m.get("refine", {}), m.get("align", {})
        self.umc = nn.ModuleDict({n: UMC(spec.dims[n], d, heads, drop) for n in MODALITIES})
        self.proj = nn.ModuleDict({n: nn.Conv1d(d, d, k, padding=k // 2) for n in MODALITIES})
        self.flows = nn.ModuleDict({n: GlowFlow(d, int(fl.get("steps", 4)), fl.get("hidden", [d, d]))
                                    for n in MODALITIES})
        self.refine = nn.ModuleDict({n: Refiner(d, int(rf.get("blocks", 4)), int(rf.get("reduction", 16)))
                                     for n in MODALITIES})
        self.sim = Similarity(d, al.get("similarity", "w2"), bool(al.get("learn", True)))
        log_tau = torch.tensor(math.log(float(al.get("tau_init", 0.07))))
        if al.get("learn_tau", True):
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        fu = m.get("fusion", {})
        kind = fu.get("kind", "attention")
        if kind == "attention":
            self.fusion = AttentionFusion(d, fu.get("query", "t"), MODALITIES, heads, drop)
        elif kind == "concat":
            self.fusion = ConcatFusion(d, MODALITIES)
        else:
            raise ValueError(f"model.fusion.kind {kind!r} unknown; use attention or concat")
        self.classifier = FcClassifier(self.fusion.out_dim, m.get("classifier", [d]), spec.out_dim,
                                       float(m.get("classifier_dropout", 0.3)))

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(min=math.log(0.01)).exp()

    # -- the three phases ------------------------------------------------------------------------
    def encode(self, x: dict, valid: dict) -> dict:
        """Per modality: h0 (input projection), mu, sigma (UMC) and X = Conv1d(mu), (B, T, d) each."""
        T = {x[n].shape[1] for n in MODALITIES}
        if len(T) != 1:
            raise ValueError(f"cm-arr needs one sequence length for every modality (got {sorted(T)}); "
                             "set data.resample_to in the config")
        out = {}
        for n in MODALITIES:
            h0, mu, sigma = self.umc[n](x[n], valid[n])
            mu_in = torch.where(valid[n].unsqueeze(-1), mu, torch.zeros((), dtype=mu.dtype, device=mu.device))
            X = self.proj[n](mu_in.transpose(1, 2)).transpose(1, 2)
            out[n] = {"h0": h0, "mu": mu, "sigma": sigma, "X": X}
        return out

    def complete(self, X: dict, valid: dict, present: torch.Tensor) -> dict:
        """Flows of the available modalities, Eq. 7-8 latents for the missing ones, refinement;
        ``xc`` = the completed sequences (available X, or refined reconstruction X^)."""
        z, ladj = {}, {}
        for i, n in enumerate(MODALITIES):
            rows = present[:, i].nonzero().squeeze(1)
            z[n] = X[n].new_zeros(X[n].shape, dtype=torch.float32)  # the flows run in float32 (AMP too)
            ladj[n] = X[n].new_zeros(X[n].shape[:2], dtype=torch.float32)
            if len(rows):  # only the available rows go through the flow (zuko refuses empty batches)
                zn, ln = self.flows[n](X[n][rows], valid[n][rows])
                z[n], ladj[n] = z[n].index_put((rows,), zn), ladj[n].index_put((rows,), ln)
        z_tilde = missing_latents(z, present, MODALITIES)
        xhat, xc, valid_c = {}, {}, {}
        for i, n in enumerate(MODALITIES):
            miss = (~present[:, i]).nonzero().squeeze(1)
            xhat[n] = torch.zeros_like(X[n])
            if len(miss):
                rec = self.refine[n](self.flows[n].inverse(z_tilde[miss]))
                xhat[n] = xhat[n].index_put((miss,), rec.to(xhat[n].dtype))
            keep = present[:, i].view(-1, 1, 1)
            xc[n] = torch.where(keep, X[n], xhat[n])
            valid_c[n] = torch.where(present[:, i].view(-1, 1), valid[n], torch.ones_like(valid[n]))
        return {"z": z, "ladj": ladj, "z_tilde": z_tilde, "xhat": xhat, "xc": xc, "valid_c": valid_c}

    def classify(self, xc: dict, valid_c: dict) -> torch.Tensor:
        return self.classifier(self.fusion(xc, valid_c))

    def represent(self, batch):
        """The fusion's output (Eq. 13, mean over time) of the completed set, the classifier's input."""
        valid = {n: modality_valid(batch, n) for n in MODALITIES}
        enc = self.encode(batch["x"], valid)
        c = self.complete({n: enc[n]["X"] for n in MODALITIES}, valid, batch["present"])
        return self.fusion(c["xc"], c["valid_c"])

    def predict(self, batch):
        return self.classifier(self.represent(batch))  # = classify(xc, valid_c)

    # -- training ---------------------------------------------------------------------------------
    def training_parts(self, batch) -> dict:
        """Everything the loss needs. The UMC reads the *unmasked* inputs once: an available
        modality's rows are the same as in ``predict``; a missing modality's rows serve only as
        the alignment pairs and the reconstruction target, never as an input of the completion."""
        natural = batch["natural"]
        valid_full = {n: batch["frame_mask_full"][n] & natural[:, i].view(-1, 1) for i, n in enumerate(MODALITIES)}
        enc = self.encode(batch["x_full"], valid_full)
        present = batch["present"]
        c = self.complete({n: enc[n]["X"] for n in MODALITIES}, valid_full, present)
        return {"enc": enc, "valid_full": valid_full, **c, "logits": self.classify(c["xc"], c["valid_c"])}

    def alignment_loss(self, enc: dict, valid: dict, natural: torch.Tensor) -> torch.Tensor:
        """L_udcl summed over the three modality pairs (utterances having both modalities)."""
        pooled = {n: (masked_mean(enc[n]["mu"], valid[n]), masked_mean(enc[n]["sigma"], valid[n])) for n in MODALITIES}
        total = enc["a"]["mu"].new_zeros(())
        for p, q in PAIRS:
            both = natural[:, MODALITIES.index(p)] & natural[:, MODALITIES.index(q)]
            if int(both.sum()) < 2:
                continue
            (mu1, s1), (mu2, s2) = pooled[p], pooled[q]
            total = total + info_nce(self.sim(mu1[both], s1[both], mu2[both], s2[both]), self.tau)
        return total

    def reconstruction_loss(self, xhat: dict, target: dict, valid: dict, present: torch.Tensor,
                            natural: torch.Tensor) -> torch.Tensor:
        """Eq. 9 as a mean squared error over the (utterance, missing modality) pairs that have a
        real target; training batches only (``loss`` is the only caller)."""
        errs = []
        for i, n in enumerate(MODALITIES):
            rows = ~present[:, i] & natural[:, i]
            if rows.any():
                tgt = target[n].detach() if self.rec_detach else target[n]
                w = valid[n][rows].unsqueeze(-1).to(tgt.dtype)
                se = ((xhat[n][rows].float() - tgt[rows].float()) ** 2 * w).sum()
                errs.append((se, w.sum() * tgt.shape[-1]))
        if not errs:
            return xhat["a"].new_zeros(()).float()
        return sum(e for e, _ in errs) / sum(k for _, k in errs).clamp(min=1)

    def loss(self, batch):
        if batch.get("phase", "train") != "train":
            raise RuntimeError(f"cm-arr: loss() on a {batch['phase']} batch; L_rec is for training batches only")
        p = self.training_parts(batch)
        natural, present = batch["natural"], batch["present"]
        parts = {"ce": self.task_loss(p["logits"], batch["y"])}
        if self.w_udcl > 0:
            parts["udcl"] = self.w_udcl * self.alignment_loss(p["enc"], p["valid_full"], natural)
        if self.w_rec > 0:
            target = {n: p["enc"][n]["X"] for n in MODALITIES}
            parts["rec"] = self.w_rec * self.reconstruction_loss(p["xhat"], target, p["valid_full"], present, natural)
        if self.w_spcl > 0:
            views = torch.cat([masked_mean(p["xc"][n], p["valid_c"][n]) for n in MODALITIES])
            parts["spcl"] = self.w_spcl * supcon(views, batch["y"].repeat(len(MODALITIES)), self.spcl_tau)
        if self.w_nll > 0:
            nll = [gaussian_nll(p["z"][n][present[:, i]], p["ladj"][n][present[:, i]], p["valid_full"][n][present[:, i]])
                   for i, n in enumerate(MODALITIES) if present[:, i].any()]
            parts["nll"] = self.w_nll * torch.stack(nll).mean()
        return sum(parts.values()), parts

    # -- figures ----------------------------------------------------------------------------------
    @torch.no_grad()
    def figures(self, out_dir, data, idx, normalizer=None, device: str = "cpu", max_utterances: int = 1000) -> list:
        """t-SNE (scikit-learn) of the utterance representations before alignment (the UMC's input
        projection h0) and after it (the UMC mean mu), each modality of each utterance one point,
        coloured by modality and by label: ``tsne.png`` in ``out_dir``."""
        from sklearn.manifold import TSNE

        from pipeline.fsutil import atomic_savefig
        from train.data import batch_to

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        idx = np.asarray(idx)[:max_utterances]
        was = self.training
        self.eval()
        feats = {"before": [], "after": []}
        mods, labels = [], []
        for batch in data.batches(idx, 256, normalizer):
            b = batch_to(batch, device)
            valid = {n: b["frame_mask"][n] & b["natural"][:, i].view(-1, 1) for i, n in enumerate(MODALITIES)}
            enc = self.encode(b["x"], valid)
            for i, n in enumerate(MODALITIES):
                has = b["natural"][:, i]
                feats["before"].append(masked_mean(enc[n]["h0"], valid[n])[has].float().cpu().numpy())
                feats["after"].append(masked_mean(enc[n]["mu"], valid[n])[has].float().cpu().numpy())
                mods += [n] * int(has.sum())
                labels += batch["y"][has.cpu()].tolist()
        self.train(was)
        if len(mods) < 5:
            return []
        mods, labels = np.array(mods), np.array(labels)
        names = self.spec.labels or [str(v) for v in sorted(set(labels.tolist()))]
        fig, axes = plt.subplots(2, 2, figsize=(10, 9))
        for r, key in enumerate(("before", "after")):
            pts = TSNE(2, perplexity=min(30.0, (len(mods) - 1) / 3), init="pca", random_state=0).fit_transform(
                np.concatenate(feats[key]))
            for n, name in zip(MODALITIES, ("audio", "video", "text")):
                sel = mods == n
                axes[r, 0].scatter(*pts[sel].T, s=8, label=name)
            for k in sorted(set(labels.tolist())):
                sel = labels == k
                axes[r, 1].scatter(*pts[sel].T, s=8, label=names[k] if k < len(names) else str(k))
            what = "before alignment (UMC input projection)" if key == "before" else "after alignment (UMC mean)"
            axes[r, 0].set_title(f"{what}: by modality", fontsize=9)
            axes[r, 1].set_title(f"{what}: by label", fontsize=9)
            for ax in axes[r]:
                ax.legend(fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.tight_layout()
        path = Path(out_dir) / "tsne.png"
        atomic_savefig(fig, path, dpi=100)
        plt.close(fig)
        return [path]
