"""IF-MMIN — invariant-feature MMIN (Zuo, Liu, Zhao, Gao, Li; ICASSP 2023).

Two stages, each a registered method with its own config:

``if-mmin-pretrain`` (§2.1, the authors' ``utt_shared`` model): MMIN's specificity encoders give
h_a, h_v, h_t (128-d each); one invariance encoder shared by the three modalities (2 x [Linear
128->128, LeakyReLU]) maps each to H_a, H_v, H_t; a classifier reads concat(h, H) (384 + 384).
Trained on full data with

    L = CE + cmd * mean over (t,a), (t,v), (a,v) of CMD_K(H_m1, H_m2),  K = 5   (Eq. 1)

``if-mmin`` (§2.2) starts its student specificity and invariance encoders from that checkpoint
and fine-tunes them on masked input (the authors' code optimises them); a frozen copy of both
(the teacher, the locked blocks of Fig. 2a) makes the targets. The invariant feature of the
masked input, H' = concat(Inv(h_a), Inv(h_v), Inv(h_t)) (384-d), enters the imagination module
(IF-IM), five autoencoders as in MMIN's CRA:

    block 1 reads h + H';  block i reads dz_{i-1} + H'  (Eq. 2);  h' = transition(dz_5)

(ablation ``if-mmin-nocascade``, ``model.imagination.cascade: false``: H' enters block 1 only,
block i reads dz_{i-1}). The joint representation is the five block latents (5 x 64) -> FC
128, 128 -> C. Loss, with the paper's RMSE and weights (λ1 = 1, λ2 = 100):

    L = CE + imagination * RMSE(teacher(reversed input), h') + invariance * RMSE(H, H')

where the teacher embeds the reversed input (missing modalities real, present ones zeroed, as
in MMIN) and H = teacher invariant features of the full input. Ablation ``if-mmin-noinv``:
``loss.invariance: 0``. ``loss.distance: mse`` gives the authors' code (MSELoss); ``model.freeze``
lists student parts (``encoders``, ``invariance``) to keep at their pretrained weights.

Choices where the sources differ (SPEC.md §3): the authors' released ResidualAE added H' to the
running block *input* (block i read h + i·H') instead of Eq. 2; we follow the paper's Eq. 2, as
SPEC.md does. Note that RMSE's gradient does not shrink with the error, so 100·RMSE keeps
pulling the student encoders at full strength; on the small demo (8 updates per epoch) this
delays the classifier, hence the demo config's higher learning rate. Schedule 20 + 20 epochs,
Adam lr 2e-4 beta1 0.5, batch 128, each sub-network clipped at 1.0, kaiming init (CAP_IFMMIN.sh;
its --weight_decay=1e-5 never reaches the authors' Adam, so none); pretraining batch 64, beta1
0.9, 10 + 10 epochs, clip 0.5 per sub-network (CAP_utt_shared.sh).

Precision (``train.amp``): CMD (central moments up to the 5th power: they lose every digit or
overflow in half precision), the RMSE terms and the CE run in float32 (``pipeline.device.float32``);
the nets in the autocast dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.device import float32
from train.conditions import MODALITIES, reversed_input
from train.methods import Method, register
from train.nets import CascadeResidualAE, FcClassifier, ModalityEncoders

CMD_PAIRS = (("t", "a"), ("t", "v"), ("a", "v"))  # the paper's Eq. 1 pairs


@float32
def cmd(x1: torch.Tensor, x2: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Central moment discrepancy as in IF-MMIN's Eq. 1 (no interval scaling): the L2 distance
    of the means plus the L2 distances of the 2nd..k-th central moments, over the batch dim."""
    x1, x2 = x1.float(), x2.float()
    m1, m2 = x1.mean(0), x2.mean(0)
    d = torch.linalg.vector_norm(m1 - m2)  # norm's gradient is defined (0) at a zero difference
    c1, c2 = x1 - m1, x2 - m2
    for order in range(2, k + 1):
        d = d + torch.linalg.vector_norm(c1.pow(order).mean(0) - c2.pow(order).mean(0))
    return d


@float32
def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean squared error over all elements (gradient defined at zero error)."""
    diff = (a.float() - b.float()).reshape(-1)
    return torch.linalg.vector_norm(diff) / math.sqrt(max(diff.numel(), 1))


class InvarianceEncoder(nn.Module):
    """Enc': one MLP shared by every modality (Linear -> LeakyReLU [-> Dropout] per layer)."""

    def __init__(self, in_dim: int, layers=(128, 128), dropout: float = 0.0):
        super().__init__()
        mods, d = [], in_dim
        for h in layers:
            mods += [nn.Linear(d, int(h)), nn.LeakyReLU()]
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
            d = int(h)
        self.net = nn.Sequential(*mods)
        self.out_dim = d

    def forward(self, h: dict) -> dict:
        """{m: (B, E)} -> {m: (B, out_dim)}."""
        return {m: self.net(h[m]) for m in MODALITIES}


def invariance_encoder(encoders: ModalityEncoders, model_cfg: dict) -> "InvarianceEncoder":
    """The shared invariance encoder over ``encoders``' per-modality embeddings (config
    ``model.invariance``: layers, dropout); both IF-MMIN stages build it the same way."""
    inv = model_cfg.get("invariance", {})
    return InvarianceEncoder(_embed_dim(encoders), inv.get("layers", [128, 128]), float(inv.get("dropout", 0.0)))


def _embed_dim(encoders: ModalityEncoders) -> int:
    dims = set(encoders.out_dims.values())
    if len(dims) != 1:
        raise ValueError(f"IF-MMIN's invariance encoder is shared by all modalities, so their embeddings "
                         f"must have one size; the config gives {encoders.out_dims} (set model.encoders.*)")
    return dims.pop()


class InvariantAwareCRA(CascadeResidualAE):
    """IF-IM (Eq. 2): MMIN's cascade of autoencoders, every block also reading the invariant
    feature H' (only block 1 when ``cascade`` is false). Returns (h', concatenated latents)."""

    def __init__(self, in_dim: int, layers=(256, 128, 64), blocks: int = 5, cascade: bool = True):
        super().__init__(in_dim, layers, blocks)
        self.cascade = bool(cascade)

    def forward(self, h: torch.Tensor, inv: torch.Tensor):
        latents, x = [], h
        for i, (enc, dec) in enumerate(zip(self.encoders, self.decoders)):
            x_in = x + inv if (i == 0 or self.cascade) else x
            z = enc(x_in)
            x = dec(z)
            latents.append(z)
        return self.transition(x), torch.cat(latents, dim=-1)


@register
class IFMMINPretrain(Method):
    """Stage 1: specificity + invariance encoders and a classifier on [h; H], CE + CMD."""

    name = "if-mmin-pretrain"
    exports = ("encoders", "invariance")

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.w_ce = self.loss_weight("ce", 1.0)
        self.w_cmd = self.loss_weight("cmd", 1.0)
        self.k = int(cfg.get("loss", {}).get("cmd_moments", 5))
        self.encoders = ModalityEncoders(spec.dims, m["encoders"])
        self.invariance = invariance_encoder(self.encoders, m)
        d = self.encoders.out_dim + len(MODALITIES) * self.invariance.out_dim
        self.classifier = FcClassifier(d, m["classifier"], spec.out_dim, m.get("dropout", 0.3))

    def encode_each(self, batch):
        return self.encoders(batch["x"], batch["lengths"])

    def predict_from(self, h, batch):
        return self._parts(h)["logits"]

    def forward_parts(self, x, lengths) -> dict:
        return self._parts(self.encoders(x, lengths))

    def _parts(self, h: dict) -> dict:
        H = self.invariance(h)
        feat = torch.cat([self.encoders.fuse(h), self.encoders.fuse(H)], dim=-1)
        return {"h": h, "H": H, "logits": self.classifier(feat)}

    def predict(self, batch):
        return self.forward_parts(batch["x"], batch["lengths"])["logits"]

    def cmd_loss(self, H: dict) -> torch.Tensor:
        return sum(cmd(H[a], H[b], self.k) for a, b in CMD_PAIRS) / len(CMD_PAIRS)

    def loss(self, batch):
        p = self.forward_parts(batch["x"], batch["lengths"])
        parts = {"ce": self.w_ce * self.task_loss(p["logits"], batch["y"])}
        if self.w_cmd > 0:
            parts["cmd"] = self.w_cmd * self.cmd_loss(p["H"])
        return sum(parts.values()), parts


@register
class IFMMIN(Method):
    """Stage 2: IF-MMIN proper (student encoders + invariance encoder + IF-IM + classifier)."""

    name = "if-mmin"
    FREEZABLE = ("encoders", "invariance")

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        m = cfg["model"]
        self.w_ce = self.loss_weight("ce", 1.0)
        self.w_img = self.loss_weight("imagination", 1.0)
        self.w_inv = self.loss_weight("invariance", 100.0)
        dist = cfg.get("loss", {}).get("distance", "rmse")
        if dist not in ("rmse", "mse"):
            raise ValueError(f"if-mmin: loss.distance must be rmse or mse, got {dist!r}")
        self.distance = rmse if dist == "rmse" else (lambda a, b: nn.functional.mse_loss(a.float(), b.float()))

        def encoders_pair():
            enc = ModalityEncoders(spec.dims, m["encoders"])
            return enc, invariance_encoder(enc, m)

        self.encoders, self.invariance = encoders_pair()  # student, fine-tuned
        self.teacher, self.teacher_inv = encoders_pair()  # frozen copies of the pretrained ones
        self.freeze(self.teacher)
        self.freeze(self.teacher_inv)
        self.expects_inheritance()
        frozen = list(m.get("freeze") or [])
        bad = [f for f in frozen if f not in self.FREEZABLE]
        if bad:
            raise ValueError(f"if-mmin: model.freeze may list {', '.join(self.FREEZABLE)}; got {bad}")
        for part in frozen:
            self.freeze(getattr(self, part))
        d = self.encoders.out_dim
        if len(MODALITIES) * self.invariance.out_dim != d:
            raise ValueError(f"if-mmin: H' ({len(MODALITIES)} x {self.invariance.out_dim}) must have the size of "
                             f"h ({d}) to be added to it; set model.invariance.layers to end in {d // len(MODALITIES)}")
        im = dict(m["imagination"])
        if im.pop("kind", "cra") != "cra":  # H' is defined on the cascade (IF-IM); no other kind takes it
            raise ValueError(f"if-mmin: model.imagination.kind must be cra, got {m['imagination']['kind']!r}")
        self.imagine = InvariantAwareCRA(d, **im)
        self.classifier = FcClassifier(self.imagine.latent_dim, m["classifier"], spec.out_dim, m.get("dropout", 0.5))

    def attach(self, prereqs):
        self.inherit(prereqs, "pretrained", ["encoders", "invariance"],
                     teachers={"teacher": "encoders", "teacher_inv": "invariance"})

    def encode_each(self, batch):
        return self.encoders(batch["x"], batch["lengths"])

    def predict_from(self, h, batch):
        return self.forward_parts(batch, h)["logits"]

    def forward_parts(self, batch, h: dict | None = None) -> dict:
        h = self.encode_each(batch) if h is None else h
        inv = self.encoders.fuse(self.invariance(h))  # H'
        recon, latent = self.imagine(self.encoders.fuse(h), inv)
        return {"h": h, "inv": inv, "recon": recon, "latent": latent, "logits": self.classifier(latent)}

    def predict(self, batch):
        return self.forward_parts(batch)["logits"]

    def represent(self, batch):
        """IF-IM's concatenated block latents, the classifier's input."""
        return self.forward_parts(batch)["latent"]

    def teacher_targets(self, batch) -> dict:
        """h'' = teacher embedding of the reversed input (imagination target) and H = teacher
        invariant features of the full input (invariance target)."""
        with torch.no_grad():
            r = reversed_input(batch)
            rev = self.teacher.fuse(self.teacher(r["x"], r["lengths"]))
            full = self.teacher(batch["x_full"], batch["lengths_full"])
            return {"imagination": rev, "invariance": self.teacher.fuse(self.teacher_inv(full))}

    def loss(self, batch):
        self.check_inherited()
        p = self.forward_parts(batch)
        t = self.teacher_targets(batch)
        parts = {"ce": self.w_ce * self.task_loss(p["logits"], batch["y"]),
                 "imagination": self.w_img * self.distance(p["recon"], t["imagination"])}
        if self.w_inv > 0:
            parts["invariance"] = self.w_inv * self.distance(p["inv"], t["invariance"])
        return sum(parts.values()), parts
