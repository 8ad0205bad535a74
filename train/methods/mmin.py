"""MMIN — Missing Modality Imagination Network (Zhao, Li, Jin; ACL 2021).

Student encoders (initialised from the full-modality baseline, fine-tuned) embed the masked input
into h = concat(h_a, h_v, h_t) (384-d). The forward imagination module (a 5-block cascade residual
autoencoder) maps h to h' and its concatenated block latents (5 x 64 = 320) are the joint
representation fed to the classifier. A frozen copy of the pretrained encoders (the teacher)
embeds the *reversed* input (missing modalities real, available ones zeroed), and h' is pulled
towards it; a backward module maps h' back to h (cycle consistency).

    L = ce * CE + forward * MSE(teacher(reversed input), h') + cycle * MSE(h.detach(), backward(h'))

Weights, schedule and sizes are the authors' released values (SPEC.md §3): ce 1, forward 4,
cycle 2, Adam lr 2e-4 beta1 0.5, batch 128, 30 epochs constant + 30 linear decay, each
sub-network's gradient norm clipped at 1.0, kaiming init, classifier dropout 0.5 (issue 13). Config switches give the paper's ablations: ``model.imagination.kind: ae``
(MMIN-AE: one plain autoencoder of about the same size) and ``loss.cycle: 0`` (MMIN-NoCycle: no
backward module). ``model.share_weights: true`` makes the forward and backward modules one
(the authors' MSP-IMPROV setting).

Precision (``train.amp``): the CE and both MSE terms (forward imagination against the teacher, cycle)
run in float32 on float32 copies of their inputs; the nets in the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from train.conditions import reversed_input
from train.methods import Method, register
from train.nets import FcClassifier, ModalityEncoders, make_imagination


@register
class MMIN(Method):
    name = "mmin"

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.w_ce = self.loss_weight("ce", 1.0)
        self.w_forward = self.loss_weight("forward", 4.0)
        self.w_cycle = self.loss_weight("cycle", 2.0)
        self.encoders = ModalityEncoders(spec.dims, m["encoders"])  # student, fine-tuned
        self.teacher = self.freeze(ModalityEncoders(spec.dims, m["encoders"]))  # copy of the pretrained encoders
        self.expects_inheritance()
        d = self.encoders.out_dim
        self.imagine = make_imagination(d, m["imagination"])
        if self.w_cycle > 0:
            self.imagine_back = self.imagine if m.get("share_weights") else make_imagination(d, m["imagination"])
        else:
            self.imagine_back = None
        self.classifier = FcClassifier(self.imagine.latent_dim, m["classifier"], spec.out_dim, m.get("dropout", 0.5))

    def attach(self, prereqs):
        self.inherit(prereqs, "encoders", ["encoders"], teachers={"teacher": "encoders"})

    def encode_each(self, batch):
        return self.encoders(batch["x"], batch["lengths"])

    def forward_parts(self, batch, h: dict | None = None) -> dict:
        h = self.encoders.fuse(self.encode_each(batch) if h is None else h)
        recon, latent = self.imagine(h)
        return {"h": h, "recon": recon, "latent": latent, "logits": self.classifier(latent)}

    def predict_from(self, h, batch):
        return self.forward_parts(batch, h)["logits"]

    def predict(self, batch):
        return self.forward_parts(batch)["logits"]

    def represent(self, batch):
        """The cascade's concatenated block latents, the classifier's input."""
        return self.forward_parts(batch)["latent"]

    def teacher_target(self, batch) -> torch.Tensor:
        """Teacher embedding of the reversed input: for a modality the sample keeps, the target is
        the teacher's embedding of a zero sequence (not a zero vector); for a missing one, of its
        real features (a zeroed modality is one zero frame, as every masked one)."""
        with torch.no_grad():
            rev = reversed_input(batch)
            return self.teacher.fuse(self.teacher(rev["x"], rev["lengths"]))

    def loss(self, batch):
        self.check_inherited()
        p = self.forward_parts(batch)
        parts = {"ce": self.w_ce * self.task_loss(p["logits"], batch["y"]),
                 "forward": self.w_forward * nn.functional.mse_loss(p["recon"].float(), self.teacher_target(batch).float())}
        if self.imagine_back is not None:
            back, _ = self.imagine_back(p["recon"])
            parts["cycle"] = self.w_cycle * nn.functional.mse_loss(back.float(), p["h"].detach().float())
        return sum(parts.values()), parts

