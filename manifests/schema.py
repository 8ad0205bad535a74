"""The manifest: one JSON object per utterance (JSONL), and fold files of id lists.

A record (all keys but ``id`` optional)::

    {"id": "Ses01F_impro01_F000", "dataset": "iemocap", "speaker": "Ses01F", "session": "1",
     "label": "neu", "label_index": 2, "value": null,
     "audio": {"path": "Session1/sentences/wav/.../x.wav", "start": null, "end": null},
     "video": {"path": "Session1/dialog/avi/DivX/x.avi", "start": 6.29, "end": 8.24, "side": "left"},
     "text": "Excuse me.", "conversation": "Ses01F_impro01", "turn": 0}

Relative media paths are resolved against ``root`` (stored in the manifest's first line as a
header record ``{"_manifest": 1, "root": ..., "dataset": ..., "labels": [...]}``) or, failing that,
the manifest file's directory. ``start``/``end`` are seconds within the file (null = whole file).
``conversation`` (optional) names the dialogue an utterance belongs to and ``turn`` its position
in it (0, 1, ...): what a conversation-level method (GCNet) reads; records without them are
written as before.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable


class ManifestError(ValueError):
    """Bad manifest or fold file; the message names the file and line."""


@dataclass
class Media:
    path: str
    start: float | None = None
    end: float | None = None
    side: str | None = None  # video only: "left" | "right" | None (most confident face)


@dataclass
class Utterance:
    id: str
    dataset: str = ""
    speaker: str | None = None
    session: str | None = None
    label: str | None = None
    label_index: int | None = None
    value: float | None = None  # regression target (MOSI/MOSEI sentiment in [-3, 3])
    audio: Media | None = None
    video: Media | None = None
    text: str | None = None
    extra: dict = field(default_factory=dict)
    conversation: str | None = None  # dialogue id (IEMOCAP dialogue, MOSI video, ...)
    turn: int | None = None          # position in that conversation, from 0

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("conversation", "turn"):  # absent, not null: manifests without them stay byte-identical
            if d[k] is None:
                d.pop(k)
        for k in ("audio", "video"):
            if d[k] is not None and d[k].get("side") is None:
                d[k].pop("side", None)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict, root: Path | None = None) -> "Utterance":
        d = dict(d)
        if not isinstance(d.get("id"), str) or not d["id"]:
            raise KeyError("id")
        for k in ("audio", "video"):
            m = d.get(k)
            if isinstance(m, str):
                m = {"path": m}
            if m is not None:
                m = Media(**m)
                if root is not None and not Path(m.path).is_absolute():
                    m.path = str(root / m.path)
            d[k] = m
        known = set(cls.__dataclass_fields__)
        extra = {k: v for k, v in d.items() if k not in known}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("extra", {}).update(extra)
        if d.get("turn") is not None and (isinstance(d["turn"], bool) or not isinstance(d["turn"], int)):
            raise TypeError(f"turn must be an integer position, got {d['turn']!r}")
        if d.get("conversation") is not None:
            d["conversation"] = str(d["conversation"])
        return cls(**d)


@dataclass
class Manifest:
    utterances: list[Utterance]
    dataset: str
    labels: list[str] | None = None  # class names in label_index order; None for regression
    root: Path | None = None
    path: Path | None = None

    def __iter__(self):
        return iter(self.utterances)

    def __len__(self):
        return len(self.utterances)

    def by_id(self) -> dict[str, Utterance]:
        return {u.id: u for u in self.utterances}


def write_manifest(path: Path | str, utts: Iterable[Utterance], dataset: str,
                   labels: list[str] | None = None, root: Path | str | None = None) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"_manifest": 1, "dataset": dataset, "labels": labels,
            "root": str(root) if root is not None else None}
    from pipeline.fsutil import atomic_write_lines

    def lines():
        seen: set[str] = set()
        yield json.dumps(head)
        for u in utts:
            if u.id in seen:
                raise ManifestError(f"{path}: duplicate utterance id {u.id!r}")
            seen.add(u.id)
            yield json.dumps(u.to_json(), ensure_ascii=False)

    return atomic_write_lines(path, lines())


def read_manifest(path: Path | str) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; build it with `imer manifest --dataset D --data-root PATH`")
    utts: list[Utterance] = []
    head: dict = {}
    seen: set[str] = set()
    for no, line in enumerate(read_utf8(path).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{no}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if no == 1 and "_manifest" in d:
            head = d
            continue
        root = Path(head["root"]) if head.get("root") else path.parent
        try:
            u = Utterance.from_json(d, root)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{path}:{no}: bad utterance record ({e}); 'id' is required, "
                                "audio/video are {{path, start, end[, side]}}") from None
        if u.id in seen:
            raise ManifestError(f"{path}:{no}: duplicate utterance id {u.id!r}")
        seen.add(u.id)
        utts.append(u)
    dataset = head.get("dataset") or (utts[0].dataset if utts else path.parent.name)
    return Manifest(utts, dataset, head.get("labels"), Path(head["root"]) if head.get("root") else path.parent, path)


# ---- folds -------------------------------------------------------------------------------------

@dataclass
class Fold:
    name: str
    train: list[str]
    val: list[str]
    test: list[str]


def number_turns(utts: Iterable[Utterance], key) -> None:
    """Set each utterance's ``turn`` to its rank, by ``key(u)``, among the utterances of its
    ``conversation`` (those without a conversation are left alone)."""
    groups: dict[str, list[Utterance]] = {}
    for u in utts:
        if u.conversation is not None:
            groups.setdefault(u.conversation, []).append(u)
    for members in groups.values():
        for k, u in enumerate(sorted(members, key=lambda u: (key(u), u.id))):
            u.turn = k


def check_speaker_disjoint(folds: list[Fold], speakers: dict[str, str | None], where: str = "folds") -> None:
    """No speaker of a fold's test split may appear in its training split (speaker-independent protocols)."""
    for f in folds:
        tr = {speakers.get(i) for i in f.train} - {None}
        te = {speakers.get(i) for i in f.test} - {None}
        both = tr & te
        if both:
            raise ManifestError(f"{where}: fold {f.name}: speakers {sorted(both)} are in both train and test")


def ids_digest(ids) -> str:
    """A short hash of a set of utterance ids: what a fold file records of its manifest."""
    import hashlib

    return hashlib.blake2b("\n".join(sorted(ids)).encode("utf-8"), digest_size=12).hexdigest()


def write_folds(path: Path | str, folds: list[Fold], protocol: str, manifest_ids=None) -> Path:
    """``manifest_ids``: the ids of the manifest written with these folds; their digest is stored so
    a later check can tell folds that belong to another version of the manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": protocol, "folds": [asdict(f) for f in folds]}
    if manifest_ids is not None:
        doc["manifest_ids"] = ids_digest(manifest_ids)
    from pipeline.fsutil import atomic_write_json

    return atomic_write_json(path, doc)


def check_folds(manifest: Manifest, folds: list[Fold], path: Path | str, rebuild: str) -> None:
    """Folds must belong to ``manifest``: every id they name is in it, and (fold files that record
    it) the manifest's id set is the one they were written with. ``rebuild``: the command that
    writes both again, for the message."""
    ids = {u.id for u in manifest}
    for f in folds:
        unknown = (set(f.train) | set(f.val) | set(f.test)) - ids
        if unknown:
            raise ManifestError(f"{path}: fold {f.name} names {len(unknown)} utterance(s) not in the manifest "
                                f"{manifest.path} (e.g. {sorted(unknown)[0]!r}): the folds and the manifest are "
                                f"out of step; rebuild both with `{rebuild}`")
    try:
        want = json.loads(Path(path).read_text()).get("manifest_ids")
    except (OSError, ValueError, AttributeError):
        want = None
    if want is not None and want != ids_digest(ids):
        raise ManifestError(f"{path}: these folds were written for another version of the manifest "
                            f"{manifest.path} (its utterance ids changed since); rebuild both with `{rebuild}`")


def read_utf8(path: Path | str, encoding: str = "utf-8") -> str:
    """The file's text; a file that is not UTF-8 is a ManifestError naming the file, line and byte."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_folds(path: Path | str) -> tuple[str, list[Fold]]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return doc["protocol"], [Fold(**f) for f in doc["folds"]]
    except FileNotFoundError:
        raise ManifestError(f"{path}: fold file not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: bad fold file ({e}); expected {{protocol, folds: [{{name, train, val, test}}]}}") from None
