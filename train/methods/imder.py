"""IMDer — Incomplete Multimodality-Diffused emotion recognition (Wang, Li, Cui; NeurIPS 2023).

Each modality is projected to a common width d by a Conv1d (``proj``). For every modality a sample
misses, a conditional score network (1-D U-Net, ``imder_nets.ScoreUNet``) recovers its projected
sequence by sampling the reverse VE SDE (sigma 25, ``train.diffusion``), conditioned on the
available ones: Conv1d(2d -> d, kernel 1) over the two available, or the single available one
(perturbed to the same t with independent noise, the paper's x_obs(t)); a refinement decoder of
residual channel-attention blocks (``Refiner``) refines the sample; the MulT backbone fuses the
completed set and predicts. Available modalities pass through unchanged.

    L = task + mmd * (sum over missing modalities of the score-matching loss + MSE(refined, truth))

with the truth the projection of the real (unmasked) features; task = L1 for regression (CE for
classification), mmd = 0.1. The score loss of modality m is summed over a sample's elements and
averaged over the batch (a sample that keeps m adds 0), so a batch with mixed missing patterns is
the per-sample version of the paper's per-batch Eq. 18.

Stages (SPEC.md §3): ``imder-pretrain`` trains projections + backbone on complete data (the
authors loaded such weights but released no script); ``imder`` starts from them, keeps the
projections fixed (``Method.freeze``: the recovery target must not move) and trains the rest.

Choices where the released code differs or the paper is silent, all in the config:
missingness is drawn per sample (the code: per batch, from lookup tables); the condition's noise
is independent of the target's (the code reused the target's z during training, a shortcut the
sampler never sees); samplers stop at t_end (see ``train.diffusion``); ``model.sampler`` gives
one sampler per phase (train / val / test: the training-time draw feeds the refinement decoder,
as in the paper, and costs ``steps`` score evaluations per missing modality and batch). Ablations
(Table 3): ``model.recovery.score: false`` (the refinement decoder recovers from the condition
alone), ``refine: false`` (the sample is used as it is), both false (missing stays zero).

Steps and validity. The condition fuses modalities frame by frame, so every modality must share
one step axis: an aligned source (MMSA aligned_50, whose steps ``train.data`` keeps in place) or
``data.resample_to``; other batches are refused. The backbone's validity comes from the masked
``frame_mask`` (a missing modality has no valid frame); a recovered modality is fed to MulT as a
complete sequence on that axis (as in the paper), valid wherever its condition is (some available
modality has a valid frame there: every step when audio or video is available). So nothing of a
missing modality's own frames, length or frame mask reaches a prediction; ``x_full`` /
``frame_mask_full`` are read only for the training target.

Precision (``train.amp``): float32 for the VE SDE's std(t) and g(t) (``train.diffusion``), the score
scaling net / std(t) (std from 3e-3 to 9.8, the samplers multiply the score by up to 625 dt), the
perturbations x0 + std(t) z and x_obs(t), the score-matching loss, the sampler's state and the
other losses; the U-Net, refiner, projections and MulT run in the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from train.conditions import MODALITIES
from train.diffusion import VESDE, dsm_loss, sample
from train.methods import Method, register
from train.methods.imder_nets import MulTBackbone, Projections, Refiner, ScoreUNet


@register
class IMDerPretrain(Method):
    """Projections + MulT backbone on complete data: IMDer's complete-data prerequisite."""

    name = "imder-pretrain"
    exports = ("proj", "backbone")

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        p = dict(m.get("proj") or {})
        self.d = int(p.get("d", 32))
        self.proj = Projections(spec.dims, self.d, int(p.get("kernel", 3)))
        self.backbone = MulTBackbone(self.d, spec.out_dim, **(m.get("backbone") or {}))

    def features(self, x: dict, batch: dict) -> tuple[dict, dict]:
        return self.proj(x, {m: batch["frame_mask"][m] for m in MODALITIES})

    def predict(self, batch):
        feats, valid = self.features(batch["x"], batch)
        return self.backbone(feats, valid)

    def loss(self, batch):
        task = self.task_loss(self.predict(batch), batch["y"])
        return task, {"task": task}


@register
class IMDer(IMDerPretrain):
    name = "imder"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.freeze(self.proj)  # the authors' projections run under no_grad: the recovery target stays put
        self.sde = VESDE(float(m.get("sigma", 25.0)))
        rec = m.get("recovery") or {}
        self.use_score = bool(rec.get("score", True))
        self.use_refine = bool(rec.get("refine", True))
        self.condition_noise = bool(m.get("condition_noise", True))
        self.samplers = {"train": {"kind": "em", "steps": 100}, "val": {"kind": "em", "steps": 100},
                         "test": {"kind": "em", "steps": 100}, **(m.get("sampler") or {})}
        self.w_mmd = self.loss_weight("mmd", 0.1)
        d = self.d
        self.cond_fuse = nn.ModuleDict({k: nn.Conv1d(2 * d, d, 1) for k in MODALITIES})
        self.score = (nn.ModuleDict({k: ScoreUNet(d, self.sde.marginal_std, **(m.get("score") or {})) for k in MODALITIES})
                      if self.use_score else None)
        self.refine = (nn.ModuleDict({k: Refiner(d, **(m.get("refine") or {})) for k in MODALITIES})
                       if self.use_refine else None)
        self.expects_inheritance()

    def attach(self, prereqs):
        self.inherit(prereqs, "pretrained", ["proj", "backbone"])

    def features(self, x: dict, batch: dict) -> tuple[dict, dict]:
        steps = {m: x[m].shape[1] for m in MODALITIES}
        if len(set(steps.values())) != 1:
            raise ValueError(f"imder recovers a missing modality on the step axis of the available ones: every modality "
                             f"needs the same number of steps (got {steps}); use an aligned source or set data.resample_to")
        return super().features(x, batch)

    # -- recovery ------------------------------------------------------------------------------------
    def condition(self, feats: dict, valid: dict, present: torch.Tensor, m: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) condition for recovering ``m`` (the two others fused, or the one available)
        and its (B, T) validity (a step where an available modality has a valid frame)."""
        i, j = [k for k in MODALITIES if k != m]
        xi, xj = feats[i], feats[j]
        pi, pj = present[:, MODALITIES.index(i)].view(-1, 1), present[:, MODALITIES.index(j)].view(-1, 1)
        fused = self.cond_fuse[m](torch.cat([xi, xj], -1).transpose(1, 2)).transpose(1, 2)
        single = torch.where(pi[..., None], xi, torch.zeros_like(xi)) + torch.where(pj[..., None], xj, torch.zeros_like(xj))
        cond = torch.where((pi & pj)[..., None], fused, single)
        return cond, (valid[i] & pi) | (valid[j] & pj)

    def score_fn(self, m: str, cond: torch.Tensor):
        """s_m(x, t | condition at t), for (n, d, T) inputs; cond (n, T, d)."""
        c = cond.transpose(1, 2)

        def fn(x, t):
            ct = c
            if self.condition_noise:
                # x_obs(t) in float32 whatever the autocast: noise of std(t) down to 3e-3 on the condition
                std = self.sde.marginal_std(t.cpu()).to(c.device)[:, None, None]
                ct = c.float() + torch.randn_like(c, dtype=torch.float32) * std
            return self.score[m](x, t, ct)
        return fn

    def draw(self, m: str, cond: torch.Tensor, phase: str) -> torch.Tensor:
        """Recovered (n, T, d) for modality ``m`` from its condition (n, T, d)."""
        n, T, d = cond.shape
        if self.use_score:
            x = sample(self.score_fn(m, cond.detach()), (n, d, T), self.sde, self.samplers[phase], cond.device)
        elif self.use_refine:
            x = cond.transpose(1, 2)  # refinement only: the decoder maps the condition to the modality
        else:
            return torch.zeros_like(cond)  # neither: the missing modality stays zero
        if self.use_refine:
            x = self.refine[m](x)
        return x.transpose(1, 2)

    def complete(self, feats: dict, valid: dict, present: torch.Tensor, phase: str, gt: dict | None = None):
        """Features and validity with every missing modality recovered (valid where its condition
        is), plus (training, ``gt`` given) the summed score-matching and reconstruction losses."""
        out, ok, b = dict(feats), dict(valid), len(present)
        score_loss = rec_loss = feats[MODALITIES[0]].new_zeros((), dtype=torch.float32)  # losses: float32
        for i, m in enumerate(MODALITIES):
            rows = torch.nonzero(~present[:, i]).view(-1)
            if len(rows) == 0:
                continue
            cond, cond_valid = self.condition(feats, valid, present, m)
            cond = cond[rows]
            rec = self.draw(m, cond, phase)
            out[m] = feats[m].index_put((rows,), rec.to(feats[m].dtype))
            ok[m] = valid[m].index_put((rows,), cond_valid[rows])
            if gt is None:
                continue
            has = gt["natural"][rows, i]  # ground truth exists (not absent from the recording)
            if not bool(has.any()):
                continue
            truth = gt["feats"][m][rows][has]
            if self.use_score:
                # float32 target: x0 + std(t) z and ||std(t) s + z||^2 are computed in its dtype
                per = dsm_loss(self.score_fn(m, cond[has]), truth.transpose(1, 2).float(), self.sde, reduction="none")
                score_loss = score_loss + per.sum() / b
            if self.use_refine:
                rec_loss = rec_loss + F.mse_loss(rec[has].float(), truth.float())
        return out, ok, score_loss, rec_loss

    def represent(self, batch):
        """The MulT backbone's fused representation of the completed set, its output layer's input."""
        feats, valid = self.features(batch["x"], batch)
        feats, valid, _, _ = self.complete(feats, valid, batch["present"], batch.get("phase", "test"))
        return self.backbone.joint(feats, valid)

    def predict(self, batch):
        return self.backbone.out(self.represent(batch))

    def loss(self, batch):
        self.check_inherited()
        feats, valid = self.features(batch["x"], batch)
        with torch.no_grad():  # the unmasked sample: only the recovery target
            truth, _ = self.proj(batch["x_full"], batch["frame_mask_full"])
        feats, valid, score_loss, rec_loss = self.complete(feats, valid, batch["present"], "train",
                                                           {"feats": truth, "natural": batch["natural"]})
        task = self.task_loss(self.backbone(feats, valid), batch["y"])
        parts = {"task": task}
        if self.use_score:
            parts["score"] = self.w_mmd * score_loss
        if self.use_refine:
            parts["rec"] = self.w_mmd * rec_loss
        return sum(parts.values()), parts
