"""Build a dataset's manifest and fold files from its raw layout, and print its counts.

Writes $IMER_CACHE/manifests/<dataset>/manifest.jsonl and folds-<protocol>.json, then prints the
counts per label, speaker and fold. Examples:

  imer manifest --dataset iemocap --data-root /data/IEMOCAP_full_release
  imer manifest --dataset msp-improv --data-root /data/MSP-IMPROV
  imer manifest --dataset mosi --data-root /data/CMU-MOSI            (the folder holding Raw/)
  imer manifest --dataset mosei --data-root /data/CMU-MOSEI --labels sentiment.csv
  imer manifest --dataset own --manifest my_corpus.csv --folds-k 5
  imer manifest --dataset iemocap --show                             (counts of the cached one)
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="iemocap, msp-improv, mosi, mosei, own, demo, or an imported dataset")
    p.add_argument("--data-root", help="the corpus folder (see the dataset's layout in README)")
    p.add_argument("--manifest", help="own: your CSV/JSONL listing the utterances (id required; "
                                      "audio, video, text, label, value, speaker optional)")
    add_own_options(p)
    p.add_argument("--seed", type=int, help="seed of random fold assignments (default 0; own: the last conversion's)")
    p.add_argument("--splits", help="mosi/mosei: JSON {train, valid, test: [video ids]} instead of the CMU SDK's standard lists")
    p.add_argument("--labels", help="mosei: label CSV start,end,video_id,segment_no,label instead of Labels/*.csd")
    p.add_argument("--accept-counts", action="store_true",
                   help="build even though a complete-looking corpus has counts that differ from the documented ones")
    p.add_argument("--show", action="store_true", help="print the counts of the cached manifest without rebuilding")


def add_own_options(p) -> None:
    """The options of an own-corpus conversion: every command that may convert accepts them."""
    p.add_argument("--folds-k", type=int, help="own: number of folds (default 5, or the last conversion's)")
    p.add_argument("--folds-seed", type=int, help="own: seed of the fold assignment (default 0, or the last conversion's)")
    p.add_argument("--classes", help="own: the class list, comma-separated (e.g. hap,neu,ang,sad); a label "
                                     "outside it is an error naming the row")


def own_options(args) -> dict:
    """Given own-conversion options as build() keywords (those not given are left to the recipe)."""
    out = {"k": getattr(args, "folds_k", None), "seed": getattr(args, "folds_seed", None),
           "classes": getattr(args, "classes", None)}
    return {k: v for k, v in out.items() if v is not None}


def main(args) -> int:
    from manifests._common import summary
    from manifests.datasets import build_manifest, load_folds, manifest_dir, protocols, recipes
    from manifests.schema import ManifestError, read_manifest

    imported = args.dataset not in recipes() and (manifest_dir(args.dataset) / "manifest.jsonl").is_file()
    try:
        if args.show or imported:  # an imported dataset has no raw layout to rebuild from
            path = manifest_dir(args.dataset) / "manifest.jsonl"
        else:
            options = {"accept_counts": args.accept_counts, **own_options(args)}
            if args.seed is not None:
                options["seed"] = args.seed
            if args.manifest:
                options["source"] = args.manifest
            if args.splits:
                options["splits"] = args.splits
            if args.labels:
                options["labels"] = args.labels
            path = build_manifest(args.dataset, args.data_root, **options)
        m = read_manifest(path)
        folds = {}
        for proto in protocols(args.dataset):
            try:
                folds[proto] = load_folds(args.dataset, proto)[1]
            except ManifestError:
                pass
    except ManifestError as e:
        print(f"imer manifest: {e}", file=sys.stderr)
        return 2
    print(f"{args.dataset}: {path}")
    print(summary(m.utterances, folds))
    return 0
