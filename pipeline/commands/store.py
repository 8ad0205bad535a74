"""Inspect and maintain the feature stores in the cache (ls, verify, repair, gc).

  imer store ls [--dataset D]              one line per store: utterances, failures, dim, size
  imer store verify [PATH | --dataset D]   reads every chunk: checksums, index/data consistency, shapes,
                                           NaN/Inf; names the damaged utterances; exit 1 on problems
  imer store repair [PATH | --dataset D]   recompute only the damaged utterances from their sources (and
                                           compact what gc would); when it cannot (a damaged index, bad
                                           notes), one line says why and what to do
  imer store gc [PATH | --dataset D]       drop superseded entries, remove leftovers of crashed runs
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="store_cmd", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list stores")
    ls.add_argument("--dataset", help="only this dataset")
    for name, what in (("verify", "check stores"), ("repair", "recompute damaged utterances"),
                       ("gc", "compact stores and remove leftovers")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("path", nargs="?", help="one store directory")
        sp.add_argument("--dataset", help="every store of this dataset (default: all)")
        if name == "verify":
            sp.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan of the data")
        if name == "repair":
            sp.add_argument("--data-root", help="raw corpus directory, when the cached manifest cannot be used")
            sp.add_argument("--manifest", help="the manifest (own: your CSV/JSONL) the store was extracted from")
            sp.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _targets(args) -> list[Path]:
    from pipeline.store import list_stores

    return [Path(args.path)] if getattr(args, "path", None) else list_stores(args.dataset)


def main(args) -> int:
    from extract.base import ExtractorUnavailable
    from manifests.schema import ManifestError
    from pipeline.cache import CacheError
    from pipeline.store import FeatureStore, StoreError, stale_dirs

    try:
        targets = _targets(args)
    except CacheError as e:
        print(f"imer store: {e}", file=sys.stderr)
        return 2
    if args.store_cmd == "ls":
        if not targets and args.dataset:
            return _no_dataset(args.dataset)
        rows = []
        for p in targets:
            try:
                s = FeatureStore.open(p)
            except StoreError as e:
                rows.append((p.parent.name, p.name, "?", "?", "?", "?", "?", f"unreadable: {e}"))
                continue
            rows.append((s.attrs.get("dataset") or p.parent.name, p.name, str(len(s)), str(len(s.failures())),
                         str(s.dim), str(s.n_frames), s.dtype, _size(s.size_bytes())))
        if not rows:
            print("no feature stores yet; extract some with `imer features --dataset demo`", file=sys.stderr)
            return 0
        head = ("dataset", "store", "utterances", "failed", "dim", "frames", "dtype", "size")
        w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            print("  ".join(c.ljust(w[i]) if i < 2 or i == 6 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip())
        return 0

    if args.path and not (Path(args.path) / "zarr.json").is_file():
        print(f"imer store: {args.path}: no feature store here (see `imer store ls`)", file=sys.stderr)
        return 2
    if not targets:
        from pipeline.cache import cache_root

        if args.dataset:
            return _no_dataset(args.dataset)
        print(f"imer store: no feature stores in {cache_root() / 'stores'} yet", file=sys.stderr)
        return 0
    status = 0
    for p in targets:
        try:
            if args.store_cmd == "repair":
                status |= _repair(p, args)
                continue
            s = FeatureStore.open(p)
            if args.store_cmd == "verify":
                problems = s.verify(check_values=not args.no_values)
                print(f"{p}: " + ("ok" if not problems else "; ".join(problems)))
                status |= bool(problems)
            else:
                before, after = s.compact()
                print(f"{p}: {before} -> {after} index entries" + ("" if before != after else " (nothing to compact)"))
        except (StoreError, ManifestError, ExtractorUnavailable, ValueError) as e:
            print(f"imer store: {e}", file=sys.stderr)
            status = 1
    if args.store_cmd == "gc" and not args.path:
        for d in stale_dirs(args.dataset):
            shutil.rmtree(d, ignore_errors=True)
            print(f"removed leftover {d}")
    return int(status)


def _no_dataset(dataset: str) -> int:
    from pipeline.cache import cache_root
    from pipeline.store import list_stores

    known = sorted({p.parent.name for p in list_stores(None)})
    print(f"imer store: no feature stores for dataset {dataset!r} in {cache_root() / 'stores'}"
          f" (datasets with stores: {', '.join(known) or 'none'})", file=sys.stderr)
    return 2


def _repair(path: Path, args) -> int:
    """Recompute the damaged utterances of one store from the sources its manifest names."""
    from manifests.datasets import load_manifest
    from pipeline.runner import make_extractor, run_features
    from pipeline.store import FeatureStore, StoreError

    s = FeatureStore.open(path)  # a damaged index raises here, saying to extract the store again
    damaged = s.damaged()
    if not damaged:
        return _repair_layout(s)
    a = s.attrs
    if not a.get("extractor") or not a.get("dataset"):
        raise StoreError(f"{path}: the store does not say which extractor and dataset made it (imported "
                         "features?); import or extract it again")
    ext = make_extractor({"name": a["extractor"], "params": a.get("params") or {}}, args.device)
    if ext.key != a.get("key"):
        raise StoreError(f"{path}: this imer's {a['extractor']} has store key {ext.key}, the store {a.get('key')} "
                         "(extractor or model changed); extract it again instead")
    from pipeline.store import store_path

    if store_path(a["dataset"], ext.key, s.dtype).resolve() != Path(path).resolve():
        raise StoreError(f"{path}: not where imer keeps this store ({store_path(a['dataset'], ext.key, s.dtype)}); "
                         "point IMER_CACHE at the cache it belongs to")
    man = load_manifest(a["dataset"], args.data_root, args.manifest)
    man.dataset = a["dataset"]
    ext.check_available()  # before anything leaves the store
    print(f"{path}: repairing {len(damaged)} damaged utterance(s)")
    # the damaged frames leave the store first: appending next to a damaged chunk would have to read it
    s.compact(drop=damaged)
    summaries = run_features(man, [ext], required=True, dtype=s.dtype, repair=True, progress=False)
    live = FeatureStore.open(path).state()
    for summ in summaries:
        if summ.key == ext.key:
            summ.repaired = sum(u in live for u in damaged)
        print(summ.line())
    return 0


def _repair_layout(s) -> int:
    """No damaged utterance: fix what verify reports that a rewrite fixes (frames no entry owns), or
    say in one line why repair cannot help."""
    problems = s.verify()
    if problems and s.needs_rewrite():
        s.compact()
        problems = s.verify()
    if not problems:
        print(f"{s.path}: ok, nothing to repair")
        return 0
    a = s.attrs
    again = f"imer features --dataset {a['dataset']} --extractors {a['extractor']}" if a.get("dataset") and a.get(
        "extractor") else "imer features"
    print(f"imer store: {s.path}: cannot repair: {'; '.join(problems)} (no utterance is damaged, so there is nothing "
          f"to recompute): remove the store (rm -r {s.path}) and run `{again}` again", file=sys.stderr)
    return 1
