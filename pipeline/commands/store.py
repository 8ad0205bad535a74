"""Inspect and maintain the feature stores in the cache (ls, verify, gc).

  imer store ls [--dataset D]              one line per store: utterances, failures, dim, size
  imer store verify [PATH | --dataset D]   index/data consistency, shapes, NaN/Inf; exit 1 on problems
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
    for name, what in (("verify", "check stores"), ("gc", "compact stores and remove leftovers")):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("path", nargs="?", help="one store directory")
        sp.add_argument("--dataset", help="every store of this dataset (default: all)")
        if name == "verify":
            sp.add_argument("--no-values", action="store_true", help="skip the NaN/Inf scan of the data")


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
    from pipeline.store import FeatureStore, StoreError, stale_dirs

    if args.store_cmd == "ls":
        rows = []
        for p in _targets(args):
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

    targets = _targets(args)
    if args.path and not (Path(args.path) / "zarr.json").is_file():
        print(f"imer store: {args.path}: no feature store here (see `imer store ls`)", file=sys.stderr)
        return 2
    status = 0
    for p in targets:
        try:
            s = FeatureStore.open(p)
            if args.store_cmd == "verify":
                problems = s.verify(check_values=not args.no_values)
                print(f"{p}: " + ("ok" if not problems else "; ".join(problems)))
                status |= bool(problems)
            else:
                before, after = s.compact()
                print(f"{p}: {before} -> {after} index entries" + ("" if before != after else " (nothing to compact)"))
        except StoreError as e:
            print(f"imer store: {e}", file=sys.stderr)
            status = 1
    if args.store_cmd == "gc" and not args.path:
        for d in stale_dirs(args.dataset):
            shutil.rmtree(d, ignore_errors=True)
            print(f"removed leftover {d}")
    return int(status)
