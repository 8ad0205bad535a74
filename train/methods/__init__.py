"""Method registry. A method is one module ``train/methods/<name>.py`` defining a registered
``Method`` subclass, plus one config ``train/configs/<name>.yaml`` with the paper's
hyperparameters (``method: <registered name>`` when the config name differs, as for ablations)::

    @register
    class MyMethod(Method):
        name = "mymethod"

        def __init__(self, cfg, spec):
            super().__init__(cfg, spec)
            self.encoders = ModalityEncoders(spec.dims, cfg["model"]["encoders"])
            self.head = FcClassifier(self.encoders.out_dim, [128], spec.out_dim)

        def predict(self, batch):                    # masked inputs only; never batch["x_full"] or "y"
            h = self.encoders(batch["x"], batch["lengths"])
            return self.head(self.encoders.fuse(h))

        def loss(self, batch):                       # training batch, with x_full and avail
            out = self.predict(batch)
            ce = self.task_loss(out, batch["y"])
            return ce, {"ce": ce}

A method that builds on another trained model (MMIN's encoders come from the full-modality
baseline) names it in its config: ``requires: {encoders: baseline}``. The runner trains (or
reuses) that config for the same fold and seed and hands the loaded model to ``attach``, which
usually calls ``self.inherit(model, parts, teachers)``. A method lists in ``exports`` the parts a
dependent method may load from it; the runner checks that both configs build them alike.

``batch["phase"]`` says what a forward pass serves: "train", "val" (model selection) or "test";
a stochastic method may use fewer sampling steps for "val". Evaluation runs under a seeded RNG.

A method whose modalities are encoded separately before anything mixes them (the baselines,
MMIN, IF-MMIN) returns those embeddings from ``encode_each`` and predicts from them in
``predict_from``: evaluating N missing conditions then costs two encoder passes per batch, not N.

A method that models the dialogue (GCNet) sets ``batching = "conversation"``: the trainer and the
evaluator then give it batches of whole conversations of one split (``train.conversations``:
``batch_size`` counts conversations; ``utterance_view`` gives per-utterance mean features).

A missing modality carries no information into a method: ``predict``, ``represent``,
``encode_each`` and ``loss`` of every subclass receive the batch with each modality the sample
does not have present (``batch["present"]``) reduced to one zero frame (length 1, no valid frame),
whatever the caller put there (``Method.__init_subclass__`` wraps them; registering a method is
enough). Only the ground truth for losses (``x_full``, ``lengths_full``, ``frame_mask_full``)
keeps the real sequences, and the evaluator removes it before ``predict``.

Hooks a method may override: ``param_groups`` (its own optimiser groups, e.g. a smaller learning
rate for pretrained parts), ``on_epoch_end`` (called after each epoch's validation) and
``represent`` (the joint representation its classifier reads, for the comparison's t-SNE). The
trainer owns everything else: missing-modality sampling (config ``train.missing``, see
``train.protocols``), optimiser, schedule, clipping, AMP, checkpoints, early stopping, selection.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import nn

from pipeline.registry import Registry
from train.conditions import is_sealed, masked_view, sealed
from train.data import DataSpec
from train.nets import init_weights

_REGISTRY = Registry("method", "train.methods")
GUARDED = ("predict", "represent", "encode_each", "loss")  # entry points that read the inputs


def only_present(batch):
    """``batch`` with every modality not present reduced to one zero frame (see the module
    docstring); unchanged when it is not a masked batch (no ``present``)."""
    if not isinstance(batch, dict) or "present" not in batch or "x" not in batch:
        return batch
    if is_sealed(batch):  # masked by apply_availability or here, and not changed since
        return dict(batch)
    out = dict(batch)
    out.update(masked_view(batch["x"], batch["lengths"], batch["frame_mask"], batch["present"]))
    return sealed(out)


def _guard(fn):
    @functools.wraps(fn)
    def call(self, batch, *args, **kw):
        return fn(self, only_present(batch), *args, **kw)
    call.guarded = True
    return call


class Method(nn.Module):
    name: ClassVar[str]
    exports: ClassVar[tuple[str, ...]] = ()  # parts (attribute = model.<part> config) others may load
    # "conversation": batches are whole conversations, with per-row conversation, turn and speaker
    # (train.conversations); the masks stay per utterance
    batching: ClassVar[str] = "utterance"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        for name in GUARDED:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "guarded", False):
                setattr(cls, name, _guard(fn))

    def __init__(self, cfg: dict, spec: DataSpec):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self._frozen: list[nn.Module] = []  # plain list: the modules stay registered where assigned

    def freeze(self, module: nn.Module) -> nn.Module:
        """``module`` made untrainable (a frozen teacher, a part kept at pretrained weights): no
        gradients, and in eval mode (dropout off) whatever ``train()`` is called with."""
        module.requires_grad_(False)
        self._frozen.append(module)
        return module

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self

    # -- what a method implements ------------------------------------------------------------------
    def predict(self, batch: dict) -> torch.Tensor:
        """Raw output for the batch's (masked) inputs ``x``: logits (B, C) or values (B, 1)."""
        raise NotImplementedError

    def represent(self, batch: dict) -> torch.Tensor | None:
        """The joint representation the classifier reads, (B, d), from the masked inputs ``x``
        only, as ``predict`` (the comparison report draws its t-SNE under full vs missing input).
        None by default: the method has no joint representation to show."""
        return None

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and its named parts (already weighted, as they enter the sum)."""
        raise NotImplementedError

    def attach(self, prereqs: dict[str, "Method"]) -> None:
        """Receive the trained prerequisite models named in ``cfg["requires"]`` (role -> model)."""
        if prereqs:
            raise ValueError(f"method {self.name!r} takes no prerequisite models, got {sorted(prereqs)}")

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups; a group may set its own ``lr`` or ``weight_decay``."""
        return [{"params": self.trainable_parameters()}]

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        """Called after every epoch's validation with its history record (may add keys to it)."""

    # -- optional: per-modality encoding, so evaluation can share it across conditions -------------
    def encode_each(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """{m: (B, E_m)} embeddings of ``batch["x"]``, each computed from that sample's modality
        ``m`` alone (its frames and length), or None when the method has no such encoders. A
        method that returns them must predict from them through ``predict_from``: the
        evaluator then encodes each batch twice (modalities as given, and all zeroed) and
        assembles every test condition from those, instead of a full forward per condition."""
        return None

    def predict_from(self, h: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """``predict`` from the per-modality embeddings ``encode_each`` gave (``batch`` is the masked
        batch, for anything else the method reads)."""
        raise NotImplementedError(f"{self.name}: encode_each() returns embeddings, so predict_from() is needed")

    def figures(self, out_dir, data, idx, normalizer=None, device: str = "cpu") -> list:
        """Figures of this (selected, tested) model drawn from rows ``idx`` (the test split) of
        ``data``, written into ``out_dir`` (the fold x seed folder); returns their paths. The
        runner calls it after testing; none by default."""
        return []

    # -- shared helpers ------------------------------------------------------------------------------
    def inherit(self, prereqs: dict, role: str, parts, teachers: dict[str, str] | None = None) -> None:
        """Load the weights of ``parts`` (attribute names) from the trained prerequisite of ``role``
        (``requires: {role: config}``) into this method's same-named parts; ``teachers`` maps
        frozen copies to the part they copy ({"teacher": "encoders"}). The prerequisite must
        export every part asked for."""
        prereq = prereqs.get(role)
        if prereq is None:
            want = (self.cfg.get("requires") or {}).get(role, "<config>")
            raise ValueError(f"{self.name} needs a trained prerequisite as {role!r}: "
                             f"config 'requires: {{{role}: {want}}}'")
        teachers = teachers or {}
        offered = getattr(type(prereq), "exports", ())
        missing = [p for p in {*parts, *teachers.values()} if p not in offered or not hasattr(prereq, p)]
        if missing:
            raise ValueError(f"{self.name}: its prerequisite {getattr(prereq, 'name', type(prereq).__name__)!r} "
                             f"exports {list(offered)}, not {missing}; check 'requires' in its config")
        for p in parts:
            getattr(self, p).load_state_dict(getattr(prereq, p).state_dict())
        for copy, p in teachers.items():
            getattr(self, copy).load_state_dict(getattr(prereq, p).state_dict())
        if hasattr(self, "inherited"):
            self.inherited.fill_(True)

    def expects_inheritance(self) -> None:
        """Call in ``__init__`` of a method that must start from a prerequisite: ``check_inherited``
        then refuses to train one that never received it (the flag is saved with the weights)."""
        self.register_buffer("inherited", torch.tensor(False))

    def check_inherited(self) -> None:
        if not bool(self.inherited):
            needs = ", ".join(f"{r}: {n}" for r, n in (self.cfg.get("requires") or {}).items())
            raise RuntimeError(f"{self.name}: the pretrained parts were never loaded; it needs its "
                               f"prerequisite ({needs or 'see its config'}) attached first")


    def task_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for classification; L1 (or MSE with ``loss.regression: mse``) for regression."""
        if self.spec.task == "classification":
            return nn.functional.cross_entropy(out.float(), y)
        if self.cfg.get("loss", {}).get("regression", "l1") == "mse":
            return nn.functional.mse_loss(out.float().view(-1), y.float())
        return nn.functional.l1_loss(out.float().view(-1), y.float())

    def loss_weight(self, term: str, default: float) -> float:
        """The weight of a loss term: the config's ``loss.<term>``, else the paper's ``default``. A
        negative weight would turn a loss into a reward: refused."""
        w = float(self.cfg.get("loss", {}).get(term, default))
        if not w >= 0.0:
            from train.config import ConfigError

            raise ConfigError(f"train/configs/{self.cfg.get('name', self.name)}.yaml: loss.{term} is {w}; "
                              f"a loss weight must be a number >= 0 (0 switches the term off)")
        return w

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


register = _REGISTRY.register
available = _REGISTRY.available
get = _REGISTRY.get


def build(cfg: dict, spec: DataSpec) -> Method:
    """The method a resolved config names (``cfg["method"]``), built for the data ``spec``, its
    Linear/Conv layers initialised as ``model.init`` says. This runs before ``attach``, as the
    authors' ``setup`` (init) ran before their ``post_process`` (pretrained encoders loaded): the
    init never touches the weights a method takes from its prerequisite."""
    method = get(cfg["method"])(cfg, spec)
    init_weights(method, (cfg.get("model") or {}).get("init"))
    return method
