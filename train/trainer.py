"""The shared trainer: one fold x seed of one method.

Per epoch: shuffle the training rows and draw each sample's missing modalities (``train.missing``,
see ``train.protocols``) from a generator seeded by (seed, epoch) — so an interrupted run that
resumes draws exactly what an uninterrupted one would — then optimise (clipping; mixed precision
as ``train.amp`` and the device say, ``pipeline.device.autocast_dtype``: bf16 on a GPU that has it,
fp16 + GradScaler on an older one, float32 on CPU), evaluate the validation split under the
selection columns (every ``train.val_every`` epochs and at the last), step the LR schedule, keep
``best.pt`` when the validation score improves (or the validation loss falls, with
``select.metric: loss``), stop early after ``patience`` validations without improvement, and write
``last.pt`` (model, optimiser, schedule, scaler, torch RNG state, history) so a rerun resumes after
the last finished epoch. The trainer only ever sees the training and validation rows: model
selection cannot read the test split. Evaluation under test columns (``evaluate``) and the
validation quantities live in :mod:`train.evaluation`.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.device import autocast, autocast_dtype
from pipeline.fsutil import atomic_torch_save, atomic_write_json, safe_torch_load
from train import metrics
from train import protocols
from train.clipping import clip_gradients
from train.conditions import apply_availability
from train.data import DataError, DataSpec, MultimodalData, Normalizer, batch_to
# the evaluation functions stay importable from train.trainer (callers and tests use them from here)
from train.evaluation import evaluate, output_loss, pooled, select_metric, shares_encoders  # noqa: F401


# ---- optimiser and schedules ---------------------------------------------------------------------

def total_epochs(tcfg: dict) -> int:
    if tcfg.get("epochs"):
        return int(tcfg["epochs"])
    s = tcfg.get("schedule") or {}
    if s.get("kind") == "linear_decay":
        return int(s["constant"]) + int(s["decay"])
    raise ValueError("train.epochs is not set (and the schedule is not linear_decay with constant + decay)")


def fused_supported(params) -> bool:
    """True when torch has a fused optimiser kernel for every one of ``params`` (tensors or
    param-group dicts): floating point, on a device with fused kernels (CPU and CUDA among them)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    ps = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(ps) and all(p.device.type in devices and torch.is_floating_point(p) for p in ps)


def make_optimizer(params, ocfg: dict, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimiser of config ``train.optimizer``. ``fused`` (default: wherever torch supports it)
    runs torch's fused kernel, one call per step for all parameters instead of a few ops per
    tensor: the same update up to float rounding, about 4x faster on CPU for MMIN's 150 tensors.
    ``IMER_UNFUSED_OPTIMIZER=1`` turns it off (the bench times both)."""
    import os

    kind = ocfg.get("kind", "adam")
    lr = float(ocfg["lr"])
    wd = float(ocfg.get("weight_decay", 0.0))
    params = list(params)
    if fused is None:
        fused = os.environ.get("IMER_UNFUSED_OPTIMIZER", "") in ("", "0") and fused_supported(params)
    kw = {"fused": True} if fused else {}
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(float(b) for b in ocfg.get("betas", (0.9, 0.999))), weight_decay=wd, **kw)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(ocfg.get("momentum", 0.9)), weight_decay=wd, **kw)
    raise ValueError(f"train.optimizer.kind {kind!r} unknown; use adam, adamw or sgd")


def make_scheduler(opt, scfg: dict | None, epochs: int):
    """Epoch-level schedules: constant; linear_decay (MMIN: ``constant`` epochs at the base rate,
    then linear decay over ``decay`` epochs, factor 1 - max(0, e + 1 - constant) / (decay + 1));
    step (x gamma every ``step`` epochs); cosine (to 0 over the run); plateau (ReduceLROnPlateau
    on the validation loss: factor, patience)."""
    s = dict(scfg or {"kind": "constant"})
    kind = s.get("kind", "constant")
    sch = torch.optim.lr_scheduler
    if kind == "constant":
        return sch.LambdaLR(opt, lambda e: 1.0)
    if kind == "linear_decay":
        n, d = int(s["constant"]), int(s["decay"])
        return sch.LambdaLR(opt, lambda e: 1.0 - max(0, e + 1 - n) / float(d + 1))
    if kind == "step":
        return sch.StepLR(opt, step_size=int(s["step"]), gamma=float(s.get("gamma", 0.1)))
    if kind == "cosine":
        return sch.CosineAnnealingLR(opt, T_max=max(1, epochs))
    if kind == "plateau":
        return sch.ReduceLROnPlateau(opt, mode="min", factor=float(s.get("factor", 0.1)),
                                     patience=int(s.get("patience", 10)))
    raise ValueError(f"train.schedule.kind {kind!r} unknown; use constant, linear_decay, step, cosine or plateau")


# ---- the trainer ---------------------------------------------------------------------------------

def _save(obj, path: Path) -> None:
    atomic_torch_save(obj, path)  # atomic, and plain values only: loadable with weights_only=True


class Trainer:
    """Trains ``method`` on rows ``train_idx`` of ``data``, selecting on ``val_idx``; writes
    ``best.pt``, ``last.pt`` and ``history.json`` into ``out_dir``. ``callbacks`` are called as
    ``cb(trainer, epoch, record)`` after every epoch (an exception there interrupts the run
    after ``last.pt`` was written, like a kill would)."""

    def __init__(self, method, data: MultimodalData, train_idx, val_idx, cfg: dict, out_dir,
                 seed: int = 0, device: str = "cpu", normalizer: Normalizer | None = None,
                 signature: str = "", progress: bool = True, callbacks=(), desc: str = ""):
        self.method = method.to(device)
        self.data = data
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.val_idx = np.asarray(val_idx, dtype=np.int64)
        if len(self.train_idx) == 0 or len(self.val_idx) == 0:
            raise ValueError(f"{desc or out_dir}: empty training or validation split "
                             f"({len(self.train_idx)} / {len(self.val_idx)} utterances); check the fold file")
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.scfg = cfg.get("select", {})
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.seed = int(seed)
        self.device = device
        self.normalizer = normalizer
        self.signature = signature
        self.progress = progress
        self.callbacks = list(callbacks)
        self.desc = desc
        self.amp = self.tcfg.get("amp", True)  # the config's word; the dtype is the device's choice
        self.amp_dtype = autocast_dtype(device, self.amp)
        self.metric = select_metric(self.scfg.get("metric"), data.task)
        self.select_columns = [protocols.normalise(c) for c in self.scfg.get("conditions", ["avt"])]
        self.val_every = max(1, int(self.tcfg.get("val_every", 1)))

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def _best_payload(self, epoch: int, score: float) -> dict:
        return {"model": self.method.state_dict(), "epoch": epoch, "score": score, "metric": self.metric,
                "normalizer": self.normalizer.to_dict() if self.normalizer else None,
                "spec": self.method.spec.to_json(), "config": self.cfg, "signature": self.signature}

    def optimisation(self):
        """(optimiser, LR schedule, grad scaler, trainable params) as ``fit`` uses them."""
        groups = self.method.param_groups()
        params = [p for g in groups for p in g["params"]]
        opt = make_optimizer(groups, self.tcfg["optimizer"])
        sched = make_scheduler(opt, self.tcfg.get("schedule"), total_epochs(self.tcfg))
        scaler = torch.amp.GradScaler(torch.device(self.device).type, enabled=self.amp_dtype == torch.float16)
        return opt, sched, scaler, params

    def fit(self) -> dict:
        epochs = total_epochs(self.tcfg)
        opt, sched, scaler, params = self.optimisation()
        patience = (self.tcfg.get("early_stop") or {}).get("patience")
        bs = int(self.tcfg["batch_size"])
        state = {"epoch": 0, "best_score": None, "best_epoch": None, "bad_epochs": 0, "history": [], "done": False}

        if self.last_path.is_file():
            ck = safe_torch_load(self.last_path, self.device)
            if ck.get("signature") == self.signature:
                self.method.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                if ck["scaler"] and scaler.is_enabled():  # empty when saved without fp16 (another device)
                    scaler.load_state_dict(ck["scaler"])
                torch.set_rng_state(ck["torch_rng"])
                if ck.get("cuda_rng") is not None and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(ck["cuda_rng"])
                state = ck["state"]
            else:  # a different config or data wrote it: never continue someone else's run
                self.last_path.unlink()
        if state["done"]:
            return self._summary(state)

        bar = tqdm(range(state["epoch"], epochs), desc=self.desc or "train", leave=False,
                   disable=not self.progress, initial=state["epoch"], total=epochs)
        for epoch in bar:
            rec = self.train_epoch(epoch, opt, scaler, params, bs)
            rec["lr"] = opt.param_groups[0]["lr"]
            validate = (epoch + 1) % self.val_every == 0 or epoch + 1 == epochs
            if validate:
                rec.update(self.validate(bs))
            plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if plateau and validate:
                sched.step(rec["val_loss"])
            elif not plateau:
                sched.step()
            self.method.on_epoch_end(epoch, rec)
            if validate and metrics.better(self.metric, rec["val_score"], state["best_score"]):
                state.update(best_score=rec["val_score"], best_epoch=epoch + 1, bad_epochs=0)
                _save(self._best_payload(epoch + 1, rec["val_score"]), self.best_path)
            elif validate:
                state["bad_epochs"] += 1
            state["history"].append(rec)
            state["epoch"] = epoch + 1
            stop = bool(patience) and state["bad_epochs"] >= int(patience)
            state["done"] = stop or state["epoch"] >= epochs
            state["stopped_early"] = stop
            _save({"model": self.method.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                   "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                   "state": state, "signature": self.signature}, self.last_path)
            atomic_write_json(self.out_dir / "history.json", state["history"], default=float)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", **{f"val_{self.metric}": f"{rec.get('val_score', math.nan):.3f}"})
            for cb in self.callbacks:
                cb(self, epoch, rec)
            if stop:
                break
        bar.close()
        if state["best_epoch"] is None:  # every validation score was NaN: keep the last weights
            _save(self._best_payload(state["epoch"], float("nan")), self.best_path)
        return self._summary(state)

    def validate(self, bs: int, share: bool = True) -> dict:
        """Validation loss and score under the selection columns (``share``: see ``evaluate``)."""
        t0 = time.perf_counter()
        val = evaluate(self.method, self.data, self.val_idx, self.select_columns, self.normalizer,
                       max(bs, 256), self.device, self.amp, seed=self.seed, phase="val", share=share)
        y, out = pooled(val)
        vm = metrics.compute(self.data.task, y, out)
        loss = output_loss(self.method, y, out)
        return {"val_score": loss if self.metric == "loss" else vm[self.metric], "val_loss": loss,
                "val": {k: v for k, v in vm.items() if k != "n"}, "val_time_s": time.perf_counter() - t0}

    def train_epoch(self, epoch, opt, scaler, params, bs, max_batches: int | None = None) -> dict:
        """One epoch over the training rows (``max_batches``: stop after that many, for the bench)."""
        rng = np.random.default_rng([self.seed, epoch])
        self.method.train()
        sums: dict[str, float] = defaultdict(float)
        n_seen, t0 = 0, time.perf_counter()
        drop_last = bool(self.tcfg.get("drop_last", False))
        if drop_last and len(self.train_idx) < bs:
            raise DataError(f"{self.desc}: train.drop_last with batch size {bs} leaves no batch of the "
                            f"{len(self.train_idx)} training utterances; lower train.batch_size")
        bucket = bool(self.cfg.get("data", {}).get("bucket", False))
        # where the epoch's time goes (host-side seconds; on CUDA the kernels run asynchronously)
        phases = dict.fromkeys(("collate", "forward", "backward", "step"), 0.0)
        batches = self.data.batches(self.train_idx, bs, self.normalizer, rng=rng, drop_last=drop_last, bucket=bucket,
                                    unit=getattr(self.method, "batching", "utterance"))
        k = 0
        while max_batches is None or k < max_batches:
            t = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            k += 1
            n = len(batch["y"])
            avail = protocols.draw(self.tcfg.get("missing"), n, rng, batch["natural"].numpy())
            b = batch_to(apply_availability(batch, avail), self.device)
            b["phase"] = "train"
            t1 = time.perf_counter()
            with autocast(self.device, self.amp_dtype):
                loss, parts = self.method.loss(b)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.desc}: the training loss became {loss.item()} at epoch {epoch + 1}; "
                                         "lower the learning rate or check the features for inf/NaN")
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            t3 = time.perf_counter()
            clip_gradients(self.method, self.tcfg, params, scaler, opt)
            scaler.step(opt)
            scaler.update()
            sums["loss"] += float(loss.detach()) * n
            for name, v in parts.items():
                sums[name] += float(v.detach()) * n
            n_seen += n
            for ph, dt in zip(phases, (t1 - t, t2 - t1, t3 - t2, time.perf_counter() - t3)):
                phases[ph] += dt
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch + 1, **{k: v / max(n_seen, 1) for k, v in sums.items()},
               "train_time_s": dt, "samples_per_s": n_seen / dt if dt > 0 else math.nan, "phases_s": phases}
        return rec

    def _summary(self, state) -> dict:
        return {"best_epoch": state["best_epoch"], "best_score": state["best_score"], "metric": self.metric,
                "epochs_run": state["epoch"], "stopped_early": state.get("stopped_early", False),
                "history": state["history"]}


def load_checkpoint(path, device: str = "cpu"):
    """(method, normalizer, cfg) from a ``best.pt``: the method rebuilt from the config and data
    spec stored in it, weights loaded, in eval mode."""
    from train.methods import build

    ck = safe_torch_load(path, device)
    spec = DataSpec(**ck["spec"])
    method = build(ck["config"], spec)
    method.load_state_dict(ck["model"])
    method.to(device).eval()
    norm = Normalizer.from_dict(ck["normalizer"]) if ck.get("normalizer") else None
    return method, norm, ck["config"]
