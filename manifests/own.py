"""Your own corpus, described in a CSV or JSONL file you write (``source``).

One row / JSON object per utterance. ``id`` is required; everything else is optional:
``audio``, ``video`` (file paths, relative to ``data_root`` or else to the file's folder),
``text``, ``label`` (a class name), ``value`` (a regression target), ``speaker``, ``session``,
``conversation`` (the dialogue an utterance belongs to) and ``turn`` (its position there: an
integer; without it, a conversation's rows are numbered in file order);
CSV may add ``audio_start``, ``audio_end``, ``video_start``, ``video_end`` (seconds) and
``video_side`` (left/right); in JSONL ``audio``/``video`` may instead be objects
``{"path", "start", "end", "side"}``. Other columns are kept under ``extra``.

Labels: declare the class list (``--classes hap,neu,ang,sad``) and a label outside it is an error
naming the row; without one, the classes are the labels found (a class with a single utterance
is reported: often a typo). The manifest and its folds are written together (folds first, then
the manifest, then ``source.json``, which marks the pair complete), and the fold options (k,
seed, classes) of a conversion are kept for the next one that does not give them.

Protocol ``kfold`` (k folds, default 5, seeded): speaker-independent when speakers are given
(scikit-learn StratifiedGroupKFold; an utterance without a speaker is its own group), else
stratified by label (StratifiedKFold, or KFold without labels). Fold i tests on part i, validates
on part i+1 and trains on the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from manifests._common import check_fold_invariants
from manifests.schema import Fold, ManifestError, Media, Utterance, read_utf8, write_folds, write_manifest
from pipeline.fsutil import atomic_write_json

DATASET = "own"
PROTOCOLS = ["kfold"]
CONVERTS = True  # load_manifest("own", manifest=FILE) converts FILE through build()
COLUMNS = {"id", "audio", "video", "text", "label", "value", "speaker", "session",
           "audio_start", "audio_end", "video_start", "video_end", "video_side", "conversation", "turn"}


def _rows(source: Path):
    """(line number, dict) per utterance from a CSV/TSV or JSONL file."""
    suffix = source.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with io.StringIO(read_utf8(source, "utf-8-sig"), newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames or "id" not in [c.strip() for c in reader.fieldnames]:
                raise ManifestError(f"{source}:1: header has no 'id' column (found: {reader.fieldnames}); "
                                    "the first line must name the columns, e.g. id,audio,video,text,label,speaker")
            for row in reader:
                if None in row:
                    raise ManifestError(f"{source}:{reader.line_num}: more fields than header columns")
                if None in row.values():  # DictReader's filler for cells the row does not have
                    have = sum(v is not None for v in row.values())
                    raise ManifestError(f"{source}:{reader.line_num}: {have} field(s), the header has "
                                        f"{len(reader.fieldnames)} columns; give every column a cell (empty cells "
                                        "are fine: a,b,,d)")
                yield reader.line_num, {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
    elif suffix in (".jsonl", ".json", ".ndjson"):
        with io.StringIO(read_utf8(source)) as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{source}:{no}: not valid JSON ({e.msg}); one JSON object per line") from None
                if not isinstance(d, dict):
                    raise ManifestError(f"{source}:{no}: expected a JSON object, got {type(d).__name__}")
                if "_manifest" in d:  # an imer manifest's header line
                    continue
                yield no, d
    else:
        raise ManifestError(f"{source}: unsupported file type {suffix!r}; write a .csv, .tsv or .jsonl file")


def _num(v, where: str, what: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {what} must be a number, got {v!r}") from None


def _turn(row: dict, where: str) -> int | None:
    v = row.get("turn")
    if v is None or v == "":
        return None
    if row.get("conversation") in (None, ""):
        raise ManifestError(f"{where}: turn {v!r} given without a conversation; name the conversation "
                            "the turn belongs to, or leave the turn empty")
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = -1.0
    if isinstance(v, bool) or f != int(f) or f < 0:
        raise ManifestError(f"{where}: turn must be a position 0, 1, 2, ... in its conversation, got {v!r}")
    return int(f)


def _number_unturned(recs: list[Utterance], source: Path) -> None:
    """A conversation gives every row a turn or none (then they are numbered in file order);
    two rows of one conversation may not share a turn."""
    by_conv: dict[str, list[Utterance]] = {}
    for u in recs:
        if u.conversation is not None:
            by_conv.setdefault(u.conversation, []).append(u)
    for conv, rows in by_conv.items():
        given = [u for u in rows if u.turn is not None]
        if not given:
            for k, u in enumerate(rows):
                u.turn = k
            continue
        if len(given) != len(rows):
            u = next(u for u in rows if u.turn is None)
            raise ManifestError(f"{source}:{u.extra['_line']}: conversation {conv!r} numbers some rows' turns "
                                "but not this one; give every row of it a turn, or none")
        seen: dict[int, int] = {}
        for u in rows:
            if u.turn in seen:
                raise ManifestError(f"{source}:{u.extra['_line']}: turn {u.turn} of conversation {conv!r} "
                                    f"is also on line {seen[u.turn]}; each turn is one utterance")
            seen[u.turn] = u.extra["_line"]


def _media(row: dict, key: str, base: Path, where: str) -> Media | None:
    v = row.get(key)
    if v is None or v == "":
        return None
    if isinstance(v, dict):
        if not v.get("path"):
            raise ManifestError(f"{where}: {key} object needs a 'path'")
        m = Media(str(v["path"]), _num(v.get("start"), where, f"{key}.start"), _num(v.get("end"), where, f"{key}.end"),
                  v.get("side") or None)
    else:
        m = Media(str(v), _num(row.get(f"{key}_start"), where, f"{key}_start"),
                  _num(row.get(f"{key}_end"), where, f"{key}_end"),
                  (row.get("video_side") or None) if key == "video" else None)
    if m.side not in (None, "left", "right"):
        raise ManifestError(f"{where}: {key} side must be 'left' or 'right', got {m.side!r}")
    if m.start is not None and m.end is not None and m.end <= m.start:
        raise ManifestError(f"{where}: {key} end {m.end} is not after start {m.start}")
    p = Path(m.path).expanduser()
    if p.is_absolute():
        m.path = str(p)
    full = p if p.is_absolute() else base / p
    if not full.is_file():
        # a FIFO, directory or device exists but cannot be read as a media file: say so, not "not found"
        what = "is not a regular file (a directory, FIFO or device)" if full.exists() else "not found"
        raise ManifestError(f"{where}: {key} file {m.path!r} {what} (relative paths are taken from {base}); "
                            "fix the path or leave the cell empty for a missing modality")
    return m


def convert(source: Path, base: Path, classes: list[str] | None = None) -> tuple[list[Utterance], list[str] | None]:
    """Utterances and class names (``classes`` in that order when declared; else the labels found)."""
    recs = []
    for no, row in _rows(source):
        where = f"{source}:{no}"
        uid = row.get("id")
        if uid is None or str(uid).strip() == "":
            raise ManifestError(f"{where}: empty id; every utterance needs a unique id")
        label = row.get("label")
        label = None if label is None or label == "" else str(label)
        if classes and label is not None and label not in classes:
            raise ManifestError(f"{where}: label {label!r} is not one of the declared classes {', '.join(classes)}; "
                                "fix the label, or add the class to --classes")
        text = row.get("text")
        recs.append(Utterance(
            id=str(uid).strip(), dataset=DATASET,
            speaker=(str(row["speaker"]) if row.get("speaker") not in (None, "") else None),
            session=(str(row["session"]) if row.get("session") not in (None, "") else None),
            label=label, value=_num(row.get("value"), where, "value"),
            audio=_media(row, "audio", base, where), video=_media(row, "video", base, where),
            text=(str(text) if text not in (None, "") else None),
            extra={k: v for k, v in row.items() if k not in COLUMNS and v not in (None, "")},
            conversation=(str(row["conversation"]) if row.get("conversation") not in (None, "") else None),
            turn=_turn(row, where)))
        recs[-1].extra["_line"] = no
    seen: dict[str, int] = {}
    for u in recs:
        if u.id in seen:
            raise ManifestError(f"{source}:{u.extra['_line']}: duplicate id {u.id!r} (first on line {seen[u.id]})")
        seen[u.id] = u.extra["_line"]
    _number_unturned(recs, source)
    for u in recs:
        u.extra.pop("_line")
    if not recs:
        raise ManifestError(f"{source}: no utterances")
    names = list(classes) if classes else (sorted({u.label for u in recs if u.label is not None}) or None)
    if not classes and names and len(names) > 1:
        counts = {c: sum(u.label == c for u in recs) for c in names}
        for c, n in counts.items():
            if n == 1:
                uid = next(u.id for u in recs if u.label == c)
                print(f"imer: {source}:{seen[uid]}: class {c!r} has a single utterance ({uid!r}); a typo? "
                      f"declare the classes with --classes {','.join(x for x in names if counts[x] > 1)}",
                      file=sys.stderr)
    for u in recs:
        if names and u.label is not None:
            u.label_index = names.index(u.label)
    return recs, names


def kfold(utts: list[Utterance], k: int, seed: int) -> list[Fold]:
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    if k < 3:
        raise ManifestError(f"own: k={k}; need at least 3 folds (test, validation and training parts)")
    ids = np.array([u.id for u in utts])
    y = np.array([u.label or "" for u in utts])
    has_speakers = any(u.speaker for u in utts)
    if has_speakers:
        groups = np.array([u.speaker or f"\0{u.id}" for u in utts])
        n = len(set(groups))
        if n < k:
            raise ManifestError(f"own: only {n} speakers for {k} speaker-independent folds; use --folds-k {max(3, n)} "
                                "or fewer (at least 3)")
        splitter, args = StratifiedGroupKFold(k, shuffle=True, random_state=seed), (ids, y, groups)
    else:
        if len(utts) < k:
            raise ManifestError(f"own: only {len(utts)} utterances for {k} folds")
        counts = np.unique(y, return_counts=True)[1]
        strat = len(counts) > 1 and counts.min() >= k
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed) if strat else KFold(k, shuffle=True, random_state=seed)
        args = (ids, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than k"
        parts = [ids[test].tolist() for _, test in splitter.split(*args)]
    folds = []
    for i in range(k):
        test, val = parts[i], parts[(i + 1) % k]
        held = set(test) | set(val)
        folds.append(Fold(str(i + 1), [x for x in ids.tolist() if x not in held], val, test))
    return folds


def _digest(source: Path) -> str:
    return hashlib.blake2b(source.read_bytes(), digest_size=16).hexdigest()


def _options(out_dir: Path, k, seed, classes) -> tuple[int, int, list[str] | None]:
    """The fold options: given ones, else those of the previous conversion, else 5 folds, seed 0."""
    try:
        prev = json.loads((out_dir / "source.json").read_text())
    except (OSError, ValueError):
        prev = {}
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if classes is not None and len(set(classes)) != len(classes):
        raise ManifestError(f"own: --classes {','.join(classes)} names a class twice")
    return (int(k if k is not None else prev.get("k", 5)), int(seed if seed is not None else prev.get("seed", 0)),
            classes if classes is not None else prev.get("classes"))


def build(data_root: Path | None, out_dir: Path, source: str | Path | None = None, k: int | None = None,
          seed: int | None = None, classes=None, **_) -> Path:
    if source is None:
        raise ManifestError("own: no utterance list given; pass --manifest FILE (make: MANIFEST=FILE), a CSV or JSONL "
                            "with at least an 'id' column (see `imer manifest --help`)")
    source = Path(source).expanduser().resolve()
    if not source.is_file():
        raise ManifestError(f"{source}: file not found; pass the CSV/JSONL that lists your utterances")
    base = Path(data_root).expanduser().resolve() if data_root else source.parent
    k, seed, classes = _options(out_dir, k, seed, classes)
    stamp = {"source": str(source), "digest": _digest(source), "base": str(base), "k": k, "seed": seed,
             "classes": classes}
    stamp_path = out_dir / "source.json"
    path = out_dir / "manifest.jsonl"
    if path.is_file() and (out_dir / "folds-kfold.json").is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return path  # same file, same options: the cached conversion stands
        except json.JSONDecodeError:
            pass
    # everything that can fail comes before the first write; then folds, manifest, and the stamp
    # last: a run killed in between leaves no stamp, so the next one converts again
    utts, names = convert(source, base, classes)
    folds = kfold(utts, k, seed)
    check_fold_invariants("kfold", folds, utts, DATASET)
    stamp_path.unlink(missing_ok=True)
    write_folds(out_dir / "folds-kfold.json", folds, "kfold", manifest_ids=[u.id for u in utts])
    write_manifest(path, utts, DATASET, names, base)
    atomic_write_json(stamp_path, stamp)
    return path
