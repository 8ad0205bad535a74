"""Model weights by the Hugging Face conventions (issue 39).

A model named by its Hub id is fetched into the HF cache (``HF_HOME`` / ``HF_HUB_CACHE``) on first
use, with huggingface_hub's progress bars, unless ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is
set: then only the cache is read and a missing model says how to provide it. Only the files an
extractor loads are fetched (configs, tokenizer files, one weight format: safetensors when the repo
has them, else ``pytorch_model*.bin``), never a repo's TF/Flax/ONNX copies.

What the store key records: for a Hub id, the commit the revision resolved to (the snapshot
folder's name), so two checkouts that fetched the same commit share the store and a moved branch
gives a new key. For a local directory the extractors record content digests of its config,
weights and tokenizer files, never its path (see text._dir_digest, Wav2Vec2.model_identity).
"""

from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path

from extract.base import ExtractorUnavailable

_SAFETENSORS = ("*.safetensors", "model.safetensors.index.json")
_PYTORCH = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE asks for no network (read now, not only at
    huggingface_hub's import, so a caller's environment is always honoured)."""
    from huggingface_hub import constants

    env = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(e in ("1", "ON", "YES", "TRUE") for e in env)


def looks_like_path(model: str) -> bool:
    """A name meant as a directory rather than a Hub id ("org/name" or "name")."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def select_files(names: list[str], wanted: tuple[str, ...]) -> list[str]:
    """Top-level files matching ``wanted`` plus one weight format (safetensors first)."""
    top = [n for n in names if "/" not in n]
    pick = {n for n in top if any(fnmatch.fnmatch(n, p) for p in wanted)}
    for fmt in (_SAFETENSORS, _PYTORCH):
        weights = {n for n in top if any(fnmatch.fnmatch(n, p) for p in fmt)}
        if weights:
            return sorted(pick | weights)
    return sorted(pick)


def cached_snapshot(model: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of ``model`` at ``revision`` (its config.json must be there)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(model, "config.json", revision=revision)
    except ValueError as e:  # not a valid repo id
        raise ExtractorUnavailable(f"{model!r}: neither a directory nor a valid hub id ({e})") from None
    return Path(hit).parent if isinstance(hit, str) else None  # <cache>/models--org--name/snapshots/<commit>


def snapshot(model: str, revision: str | None, wanted: tuple[str, ...], how_to_provide: str) -> Path:
    """Folder holding ``model``'s files at ``revision`` in the HF cache: downloaded when missing and
    allowed, else read from the cache. Its name is the resolved commit hash. ``how_to_provide`` is
    the extractor's advice on providing the model by hand. Raises ExtractorUnavailable."""
    if offline():
        snap = cached_snapshot(model, revision)
        if snap is None:
            raise ExtractorUnavailable(f"{model!r} is not in the HF cache and downloads are off (HF_HUB_OFFLINE"
                                       " / TRANSFORMERS_OFFLINE is set; unset it to fetch on first use); "
                                       + how_to_provide)
        return snap
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # config.json by branch/tag name first: its answer carries the commit and writes refs/<rev>,
        # which is what a later offline run looks the snapshot up by.
        config = Path(hf_hub_download(model, "config.json", revision=revision))
        commit = config.parent.name
        need = [f for f in wanted if f != "config.json"]
        files = [f for f in select_files(_repo_files(HfApi(), model, commit), tuple(need)) if f != "config.json"]
        missing = [f for f in files if not (config.parent / f).is_file()]
        if missing:
            print(f"imer: fetching {model} ({commit[:12]}) from {constants.ENDPOINT} into {constants.HF_HUB_CACHE}: "
                  f"{', '.join(missing)}", file=sys.stderr, flush=True)
        for f in missing:
            hf_hub_download(model, f, revision=commit)
        return config.parent
    except RepositoryNotFoundError:
        raise ExtractorUnavailable(f"{model!r}: no such model on {constants.ENDPOINT} (or it is private/gated: "
                                   "log in with `huggingface-cli login`); or pass a local directory as "
                                   "model=/path") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        snap = cached_snapshot(model, revision)  # no network: a complete cached copy still serves
        if snap is not None and has_weights(snap):
            return snap
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExtractorUnavailable(f"{model!r}: could not fetch it from {constants.ENDPOINT} ({why}); "
                                   f"{how_to_provide}") from None


def has_weights(snap: Path) -> bool:
    """False for a snapshot whose first fetch stopped before the weights came."""
    return any(any(snap.glob(p)) for p in (_SAFETENSORS[0], _PYTORCH[0]))


def _repo_files(api, model: str, commit: str) -> list[str]:
    info = api.model_info(model, revision=commit)
    return [s.rfilename for s in (info.siblings or [])]
