"""The extractor interface and registry (s3prl-style upstreams, timm-style registry).

An extractor turns one modality of a batch of utterances into frame-level features::

    @register
    class LogMel(Extractor):
        name = "logmel"; version = "1"; modality = "audio"
        defaults = {"n_mels": 40, "hop_ms": 10}
        @property
        def dim(self): return self.params["n_mels"]
        @property
        def frame_rate(self): return 1000 / self.params["hop_ms"]
        def extract_one(self, utt): return Output(features)

Heavy imports (torch, transformers, cv2, opensmile, librosa) go inside methods so that listing
the registry stays fast. Models load lazily in ``load()``, once per process.
"""

from __future__ import annotations

import hashlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from manifests.schema import Utterance
from pipeline import fsutil
from pipeline.cache import config_hash
from pipeline.registry import Registry

MODALITIES = ("audio", "video", "text")


@dataclass
class Output:
    """Features of one utterance: ``features`` (T, dim) float32; ``mask`` (T,) bool, False = frame
    not valid (e.g. no face); ``info`` small JSON-able notes (e.g. {"truncated": true})."""

    features: np.ndarray
    mask: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Failure:
    """An utterance that could not be extracted; recorded in the store, the run goes on."""

    reason: str


class ExtractorUnavailable(RuntimeError):
    """The extractor cannot run here (e.g. no weights); the message says how to get them."""


class Extractor:
    name: ClassVar[str]
    version: ClassVar[str] = "1"  # bump whenever the output for the same input changes
    modality: ClassVar[str]
    defaults: ClassVar[dict] = {}
    batch_size: ClassVar[int] = 16  # utterances per extract() call
    default: ClassVar[bool] = False  # part of `imer features`' default set (skipped, with its reason, if unavailable)
    # Upstream stages this one reads (e.g. visual extractors read the `faces` track). The runner
    # extracts them first and puts their opened stores in ``self.upstream[name]``.
    requires: ClassVar[tuple[str, ...]] = ()
    # parameters naming a hub id or local model directory (see config)
    local_model_params: ClassVar[tuple[str, ...]] = ()
    # The network may run under fp16 / bf16 autocast (``precision``); False: float32 only (signal
    # processing, face detection geometry, HOG).
    half_precision: ClassVar[bool] = False

    def __init__(self, device: str = "cpu", **params):
        # ``precision`` (every extractor takes it): auto | fp32 | fp16 | bf16, see ``precision``.
        # Kept in params only when given, so default configs, and their store keys, are unchanged.
        precision = params.get("precision", "auto")
        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"extractor {self.name!r}: precision must be auto, fp32, fp16 or bf16, got {precision!r}")
        if precision in ("fp16", "bf16") and not self.half_precision:
            raise ValueError(f"extractor {self.name!r} computes in float32 only; drop precision={precision}")
        unknown = set(params) - set(self.defaults) - {"precision"}
        if unknown:
            raise ValueError(f"extractor {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.device = device
        self._loaded = False
        self.upstream: dict = {}

    # -- description -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def frame_rate(self) -> float | None:
        """Frames per second, or None when frames are not time-based (tokens)."""
        return None

    def model_identity(self) -> dict:
        """Hub id or path plus revision/hash of any model the output depends on."""
        return {}

    @property
    def precision(self) -> str:
        """What the network computes in: the ``precision`` parameter when given, else (``auto``)
        fp16 on CUDA for an extractor whose network allows it (``half_precision`` and ``half_ok``) and float32 on
        CPU. fp16 rather than bf16 on the GPU: 3 more mantissa bits, and these encoders' activations
        stay well inside its range (bench/bench_precision.py measures both against float32).
        ``auto`` resolves the device now (the store key depends on it)."""
        want = self.params.get("precision", "auto")
        if want != "auto":
            return want
        if not (self.half_precision and self.half_ok()):
            return "fp32"
        if self.device == "auto":
            from pipeline.device import concrete_device

            self.device = concrete_device("auto")
        return "fp16" if str(self.device).startswith("cuda") else "fp32"

    def half_ok(self) -> bool:
        """Whether ``precision: auto`` may use half precision on CUDA (e.g. a ``fp16`` parameter)."""
        return True

    def config(self) -> dict:
        """Everything the output depends on; its hash is part of the store key. A precision other
        than float32 is recorded (half-precision features never share a store with float32 ones);
        float32 adds nothing, so float32 keys are those of before precisions existed."""
        params = {k: v for k, v in self.params.items() if k != "precision"}
        for k in self.local_model_params:
            # a local model directory is identified by its content (model_identity), not its path,
            # so checkouts with their own copy of one model share the store
            if params.get(k) and Path(str(params[k])).expanduser().is_dir():
                params[k] = "<local directory>"
        cfg = {"name": self.name, "version": self.version, "params": params,
               "model": self.model_identity()}
        if self.requires:  # a changed upstream stage changes this stage's key too
            cfg["upstream"] = {n: self.create_upstream(n).key for n in self.requires}
        if self.precision != "fp32":
            cfg["precision"] = self.precision
        return cfg

    def upstream_params(self) -> dict[str, dict]:
        """Parameters of the upstream stages this configuration reads ({stage: params}); the
        runner extracts those stages with them (default: the stages' defaults)."""
        return {}

    def create_upstream(self, name: str) -> "Extractor":
        return create(name, device=self.device, **self.upstream_params().get(name, {}))

    @property
    def key(self) -> str:
        return f"{self.name}-{config_hash(self.config())}"

    # -- running ---------------------------------------------------------------------------------
    def load(self) -> None:
        """Load models/weights; called once before the first extract. Raise ExtractorUnavailable."""

    def check_available(self) -> None:
        """A cheap look (no model import) for what ``load`` needs, e.g. weights in the HF cache;
        raise ExtractorUnavailable when it is absent, so a rerun skips the stage in milliseconds."""

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()
            self._loaded = True

    def extract(self, utts: list[Utterance]) -> list[Output | Failure]:
        """Batched extraction; default loops over ``extract_one``. Per-utterance errors become
        Failures; ExtractorUnavailable propagates (it concerns every utterance)."""
        self.ensure_loaded()
        out: list[Output | Failure] = []
        for u in utts:
            try:
                out.append(self.extract_one(u))
            except ExtractorUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
                out.append(Failure(f"{type(e).__name__}: {e}"))
        return out

    def extract_one(self, utt: Utterance) -> Output:
        raise NotImplementedError

    # -- provenance ------------------------------------------------------------------------------
    def source(self, utt: Utterance):
        return {"audio": utt.audio, "video": utt.video, "text": utt.text}[self.modality]

    def fingerprint(self, utt: Utterance) -> str:
        """Hash of exactly what this extractor reads for ``utt``: file content, segment and side,
        or the transcript. A changed source gives a new fingerprint and is recomputed."""
        src = self.source(utt)
        h = hashlib.blake2b(digest_size=16)
        if src is None:
            h.update(b"<none>")
        elif isinstance(src, str):
            h.update(b"text:" + src.encode("utf-8", "surrogatepass"))
        else:
            h.update(file_digest(src.path).encode())
            h.update(repr((src.start, src.end, src.side)).encode())
        return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """Content hash of a file, memoised per (path, size, mtime) within the process. A missing
    file, or one that is not a regular file (a FIFO would block the read, /dev/zero never end it),
    hashes to a marker so the utterance is attempted (and recorded as failed, with the reason)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return "missing:" + str(p)
    if not stat.S_ISREG(st.st_mode):
        return "notfile:" + str(p)
    key = (str(p), st.st_size, st.st_mtime_ns)
    d = _DIGESTS.get(key)
    if d is None:
        d = _DIGESTS[key] = fsutil.file_digest(p, "blake2b", digest_size=16)
    return d


def plan_buckets(order: list[int], lengths: list[int], *, budget: float | None = None, limit: int | None = None,
                 max_padding: float | None = None) -> list[list[int]]:
    """Split ``order`` (item indices sorted by length, either way) into consecutive buckets for
    padded batches: a bucket's padded size (longest length x count) stays within ``budget``, its
    count within ``limit``, and its padding fraction (1 - real / padded size) within
    ``max_padding``; None: no bound. An item that breaks a bound alone still gets its own bucket."""
    buckets: list[list[int]] = []
    bucket: list[int] = []
    longest = total = 0
    for k in order:
        n = lengths[k]
        size = max(longest, n) * (len(bucket) + 1)
        if bucket and ((budget is not None and size > budget) or (limit is not None and len(bucket) >= limit)
                       or (max_padding is not None and 1 - (total + n) / size > max_padding)):
            buckets.append(bucket)
            bucket, longest, total = [], 0, 0
        bucket.append(k)
        longest, total = max(longest, n), total + n
    if bucket:
        buckets.append(bucket)
    return buckets


# ---- registry ----------------------------------------------------------------------------------

_REGISTRY = Registry("extractor", "extract", skip=("base",))
available = _REGISTRY.available
get = _REGISTRY.get


def register(cls: type[Extractor]) -> type[Extractor]:
    if cls.modality not in MODALITIES:
        raise ValueError(f"{cls.__name__}: modality must be one of {MODALITIES}")
    return _REGISTRY.register(cls)


def create(name: str, device: str = "cpu", **params) -> Extractor:
    return get(name)(device=device, **params)
