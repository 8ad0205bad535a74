"""Hidden states of a self-supervised speech model (wav2vec 2.0, HuBERT, WavLM, data2vec-audio...)
loaded with Hugging Face ``AutoModel`` from a hub id (fetched into the HF cache on first use unless
HF_HUB_OFFLINE is set; see extract.hub) or a local directory. CM-ARR's acoustic feature is
``facebook/wav2vec2-base``'s last layer, 768 dims at 50 frames/s.

Layers: ``layer="last"`` (default), an index into the model's hidden states (0 = the CNN features
after projection and positional embedding, i = transformer layer i, negative from the end), or a
list of indices averaged with ``layer_weights`` (uniform when not given).

Batching. Utterances are cut into chunks (``chunk_s`` long, ``overlap_s`` shared between
neighbours, so audio over 30 s never meets an attention span the model was not trained for), the
chunks sorted by length and forwarded in buckets of at most ``batch_seconds`` of padded audio, with
an attention mask over the padding. Models whose first conv layer uses group norm
(``feat_extract_norm="group"``, e.g. wav2vec2-base) normalise each channel over *time*, so the
zero padding HF recommends for them (no attention_mask) changes every frame's value with the batch's
padding. Here that layer's statistics are taken over each utterance's real samples only; with the
attention mask this makes a batched forward equal to the unpadded per-utterance forward (what HF
gives for batch size 1). Chunks are stitched back by cutting each overlap in its middle; chunk
starts are multiples of the model's total conv stride, so the CNN frames line up exactly.

On CPU each chunk is forwarded alone (``cpu_batch = 1``), unpadded and without a mask, which is
exactly HF's batch-of-one forward. bench/bench_audio.py (one thread) measured the padded buckets
there at 0.36x (4 layers, 256 dims) and 0.62x (wav2vec2-base's shape) the speed of one chunk at a
time; trials with tight buckets (padding under 10-30%) ranged 0.7x-1.1x, no reliable gain. A
one-chunk matmul is already large enough for the CPU's BLAS, the conv stack (most of the time)
gains nothing from a batch, and a batch pays for its padding. The buckets are for the GPU.

Precision (``Extractor.precision``): on CUDA the model runs under fp16 autocast unless ``fp16:
false`` or ``precision=fp32`` (weights stay float32; the masked group norm computes its
statistics in float32); on CPU in float32. A precision other than float32 is part of the store key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np

from extract.audio_io import load_audio
from extract import hub
from extract.base import Extractor, ExtractorUnavailable, Failure, Output, file_digest, plan_buckets, register

SR = 16000
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILES = ("config.json", "preprocessor_config.json")  # architecture; input normalisation


@register
class Wav2Vec2(Extractor):
    name = "wav2vec2"
    local_model_params = ("model",)
    version = "1"
    modality = "audio"
    defaults = {"model": "facebook/wav2vec2-base", "revision": None, "layer": "last", "layer_weights": None,
                "chunk_s": 30.0, "overlap_s": 4.0, "batch_seconds": 160.0, "fp16": True}
    batch_size = 16
    default = True
    half_precision = True  # ``fp16: false`` keeps precision auto at float32 on CUDA too
    # chunks per forward pass on CPU (see the module doc); same output for any value, only speed changes
    cpu_batch: ClassVar[int | None] = 1

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self._layers = _parse_layers(self.params["layer"], self.params["layer_weights"])
        if not 0 <= self.params["overlap_s"] < self.params["chunk_s"] / 2:
            raise ValueError(f"wav2vec2: need 0 <= overlap_s < chunk_s / 2, got overlap_s={self.params['overlap_s']}, "
                             f"chunk_s={self.params['chunk_s']}")
        self._config = None
        self._dir: Path | None = None

    def _model_dir(self) -> Path:
        """The local directory or the Hub id's snapshot in the HF cache (fetched when missing)."""
        if self._dir is None:
            p = Path(self.params["model"]).expanduser()
            if p.is_dir() or hub.looks_like_path(self.params["model"]):
                self._dir = p
            else:
                self._dir = hub.snapshot(self.params["model"], self.params["revision"], CONFIG_FILES,
                                         self._how_to_provide())
        return self._dir

    # -- description -----------------------------------------------------------------------------
    def _model_config(self):
        if self._config is None:
            from transformers import AutoConfig

            try:
                self._config = AutoConfig.from_pretrained(str(self._model_dir()))
            except (OSError, ValueError, ExtractorUnavailable) as e:
                raise ExtractorUnavailable(self._unavailable(e)) from None
        return self._config

    @property
    def dim(self) -> int:
        return int(self._model_config().hidden_size)

    @property
    def frame_rate(self) -> float:
        return SR / math.prod(self._model_config().conv_stride)

    def model_identity(self) -> dict:
        """Hub id + the commit its revision resolved to (None when it cannot be had), or, for a local
        directory, content hashes of its weights and configs (not its path: checkouts sharing a cache
        agree on the store key)."""
        model, rev = self.params["model"], self.params["revision"]
        p = Path(model).expanduser()
        if p.is_dir():
            files = [p / f for f in WEIGHT_FILES if (p / f).is_file()] or sorted(p.glob("*.safetensors"))
            confs = [p / f for f in CONFIG_FILES if (p / f).is_file()]
            return {"source": "local", "weights": {f.name: file_digest(f) for f in files},
                    "configs": {f.name: file_digest(f) for f in confs}}
        try:
            commit = self._model_dir().name
        except ExtractorUnavailable:
            commit = None  # load() refuses with the reason; nothing is stored under this key
        return {"model": model, "revision": rev, "commit": commit}

    def _how_to_provide(self) -> str:
        return (f"to provide them by hand: download once where there is network (`huggingface-cli download "
                f"{self.params['model']}`) into the HF cache (or point HF_HOME at a cache that holds it), or set the "
                "extractor's model parameter to a local directory saved with save_pretrained")

    def _unavailable(self, err: Exception | str) -> str:
        if isinstance(err, ExtractorUnavailable):
            return f"wav2vec2: no weights for {self.params['model']!r} here: {err}"
        return (f"wav2vec2: no weights for {self.params['model']!r} here. Provide them: download "
                f"once where there is network (`huggingface-cli download {self.params['model']}`) into the HF cache "
                f"(or point HF_HOME at a cache that holds it), or set the extractor's model parameter to a local "
                f"directory saved with save_pretrained. [{self._why(err)}]")

    def _why(self, err: Exception | str) -> str:
        return str(err).splitlines()[0] if str(err) else type(err).__name__

    def half_ok(self) -> bool:
        return bool(self.params["fp16"])

    # -- running ---------------------------------------------------------------------------------
    def check_available(self) -> None:
        try:
            model = self._model_dir()  # a Hub id is fetched here, on first use
        except ExtractorUnavailable as e:
            raise ExtractorUnavailable(self._unavailable(e)) from None
        found = model.is_dir() and (any((model / f).is_file() for f in WEIGHT_FILES)
                                    or any(model.glob("*.safetensors")))
        if not found:
            raise ExtractorUnavailable(self._unavailable("no model.safetensors / pytorch_model.bin"))

    def load(self) -> None:
        from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor

        from pipeline.device import precision_dtype, resolve_device

        cfg = self._model_config()
        src = str(self._model_dir())
        try:
            model = AutoModel.from_pretrained(src)
        except (OSError, ValueError) as e:
            raise ExtractorUnavailable(self._unavailable(e)) from None
        if not hasattr(model, "feature_extractor") or not hasattr(model, "_get_feat_extract_output_lengths"):
            raise ExtractorUnavailable(f"wav2vec2: {self.params['model']!r} is a {type(model).__name__}, not a "
                                       "wav2vec2-style speech model (wav2vec2, HuBERT, WavLM, data2vec-audio)")
        try:
            self._fe = AutoFeatureExtractor.from_pretrained(src)
        except (OSError, ValueError):  # no preprocessor_config.json: the wav2vec2 defaults (per-utterance z-norm)
            self._fe = Wav2Vec2FeatureExtractor(sampling_rate=SR, do_normalize=True)
        n_hidden = cfg.num_hidden_layers + 1
        for i in self._layers[0]:
            if i != "last" and not -n_hidden <= i < n_hidden:
                raise ValueError(f"wav2vec2: layer {i} out of range; {self.params['model']!r} has hidden states 0..{n_hidden - 1}")
        self._device = resolve_device(self.device)
        self._model = model.to(self._device).eval()
        self._hop = math.prod(cfg.conv_stride)
        self._receptive = _receptive_field(cfg.conv_kernel, cfg.conv_stride)
        self._masked_norm = _install_masked_group_norm(model)
        self._dtype = precision_dtype(self.precision)  # None: float32; else autocast (weights stay float32)

    def extract(self, utts):
        self.ensure_loaded()
        out: list = [None] * len(utts)
        waves: dict[int, np.ndarray] = {}
        for i, u in enumerate(utts):
            try:
                if u.audio is None:
                    raise ValueError(f"utterance {u.id} has no audio")
                w = load_audio(u.audio, SR)
                if len(w) < self._receptive:
                    raise ValueError(f"{u.audio.path}: {len(w)} samples, shorter than the model's "
                                     f"{self._receptive}-sample receptive field")
                # the processor's normalisation (z-norm for wav2vec2) over the whole utterance, before chunking
                waves[i] = self._fe(w, sampling_rate=SR, return_tensors="np")["input_values"][0].astype(np.float32)
            except ValueError as e:
                out[i] = Failure(f"ValueError: {e}")
        # Chunks of every utterance, forwarded in length-sorted buckets.
        chunks = [(i, s, w[s:s + n]) for i, w in waves.items() for s, n in self._chunk_spans(len(w))]
        feats: dict[tuple[int, int], np.ndarray] = {}
        order = sorted(range(len(chunks)), key=lambda k: len(chunks[k][2]), reverse=True)
        for bucket in self._buckets(order, [len(c[2]) for c in chunks]):
            try:
                res = self._forward([chunks[k][2] for k in bucket])
            except RuntimeError:  # e.g. CUDA out of memory: retry one chunk at a time
                self._free_memory()
                res = []
                for k in bucket:
                    try:
                        res.append(self._forward([chunks[k][2]])[0])
                    except RuntimeError as e1:
                        res.append(None)
                        out[chunks[k][0]] = Failure(f"{type(e1).__name__}: {e1}".splitlines()[0])
            for k, r in zip(bucket, res):
                feats[chunks[k][0], chunks[k][1]] = r
        for i, w in waves.items():
            if out[i] is not None:
                continue
            spans = self._chunk_spans(len(w))
            out[i] = Output(self._stitch([(s, feats[i, s]) for s, _ in spans], len(w)),
                            info={"chunks": len(spans)} if len(spans) > 1 else {})
        return out

    # -- helpers ---------------------------------------------------------------------------------
    def _chunk_spans(self, n: int) -> list[tuple[int, int]]:
        """(start, length) of each chunk; starts are multiples of the conv hop."""
        hop = self._hop
        size = max(hop, int(self.params["chunk_s"] * SR) // hop * hop)
        step = max(hop, size - int(self.params["overlap_s"] * SR) // hop * hop)
        spans, s = [], 0
        while s + size < n:
            spans.append((s, size))
            s += step
        spans.append((s, n - s))
        return spans

    def _n_frames(self, n: int) -> int:
        return (n - self._receptive) // self._hop + 1

    def _stitch(self, parts: list[tuple[int, np.ndarray]], n: int) -> np.ndarray:
        """Join chunk features; each overlap is cut in its middle so every frame keeps context."""
        if len(parts) == 1:
            return parts[0][1]
        pieces, frame = [], 0
        for k, (s, f) in enumerate(parts):
            first = s // self._hop
            if k + 1 < len(parts):
                nxt = parts[k + 1][0] // self._hop
                cut = (nxt + first + len(f)) // 2
            else:
                cut = first + len(f)
            pieces.append(f[frame - first:cut - first])
            frame = cut
        out = np.concatenate(pieces)
        assert len(out) == self._n_frames(n), (len(out), self._n_frames(n))
        return out

    def _buckets(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        limit = self.cpu_batch if self._device == "cpu" else None
        return plan_buckets(order, lengths, budget=self.params["batch_seconds"] * SR, limit=limit)

    def _forward(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """Selected hidden states of each (normalised) waveform, zero-padded into one batch."""
        import torch

        from pipeline.device import autocast

        lengths = [len(w) for w in waves]
        x = np.zeros((len(waves), max(lengths)), np.float32)
        mask = np.zeros(x.shape, np.int64)
        for b, w in enumerate(waves):
            x[b, :len(w)] = w
            mask[b, :len(w)] = 1
        x_t = torch.from_numpy(x).to(self._device)
        # one chunk has no padding: no mask and the model's own group norm, i.e. HF's batch-of-one forward
        padded = len(waves) > 1
        m_t = torch.from_numpy(mask).to(self._device) if padded else None
        if self._masked_norm is not None and padded:
            self._masked_norm.lengths = torch.as_tensor(lengths, device=self._device)
        try:
            with torch.inference_mode(), autocast(self._device, self._dtype):
                o = self._model(x_t, attention_mask=m_t, output_hidden_states=self._layers[0] != ["last"])
        finally:
            if self._masked_norm is not None:
                self._masked_norm.lengths = None
        h = _select(o, *self._layers).float().cpu().numpy()
        return [h[b, :self._n_frames(n)] for b, n in enumerate(lengths)]

    def _free_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _parse_layers(layer, weights) -> tuple[list, np.ndarray | None]:
    if layer == "last":
        idx = ["last"]
    elif isinstance(layer, int) and not isinstance(layer, bool):
        idx = [layer]
    elif isinstance(layer, (list, tuple)) and layer and all(isinstance(i, int) and not isinstance(i, bool) for i in layer):
        idx = list(layer)
    else:
        raise ValueError(f"wav2vec2: layer must be 'last', an integer or a list of integers, got {layer!r}")
    if weights is None:
        return idx, None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(idx),) or not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError(f"wav2vec2: layer_weights must be {len(idx)} non-negative numbers (one per layer), got {weights!r}")
    return idx, w / w.sum()


def _select(out, idx: list, weights):
    if idx == ["last"]:
        return out.last_hidden_state
    hs = [out.hidden_states[i] for i in idx]
    if len(hs) == 1:
        return hs[0]
    w = weights if weights is not None else np.full(len(hs), 1.0 / len(hs))
    return sum(float(wi) * h.float() for wi, h in zip(w, hs))


def _receptive_field(kernels, strides) -> int:
    r = 1
    for k, s in zip(reversed(kernels), reversed(strides)):
        r = (r - 1) * s + k
    return r


def _install_masked_group_norm(model):
    """Swap the first conv layer's GroupNorm for one that ignores padded samples (see module doc)."""
    import torch
    from torch import nn

    layer0 = model.feature_extractor.conv_layers[0]
    gn = getattr(layer0, "layer_norm", None)
    if not isinstance(gn, nn.GroupNorm):
        return None  # layer-norm conv layers normalise each frame alone: padding cannot leak in
    conv = layer0.conv

    class MaskedGroupNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn = gn
            self.lengths = None  # set per batch: samples of each input

        def forward(self, h):
            if self.lengths is None:
                return self.gn(h)
            B, C, T = h.shape
            G = self.gn.num_groups
            n = (self.lengths - conv.kernel_size[0]) // conv.stride[0] + 1  # valid frames of this layer
            valid = (torch.arange(T, device=h.device)[None] < n[:, None]).to(torch.float32)  # (B, T)
            hf = h.float().reshape(B, G, C // G, T)
            m = valid[:, None, None, :]
            cnt = m.sum(dim=(2, 3), keepdim=True) * (C // G)
            mean = (hf * m).sum(dim=(2, 3), keepdim=True) / cnt
            var = (((hf - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / cnt
            y = ((hf - mean) / torch.sqrt(var + self.gn.eps)).reshape(B, C, T)
            y = y * self.gn.weight.float()[None, :, None] + self.gn.bias.float()[None, :, None]
            return y.to(h.dtype)

    layer0.layer_norm = MaskedGroupNorm()
    return layer0.layer_norm
