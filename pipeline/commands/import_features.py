"""Import features you already have (MMIN's h5 release, MMSA's pickles) as an imer dataset.

Writes feature stores ($IMER_CACHE/stores/<name>/<key>), the manifest and fold files
($IMER_CACHE/manifests/<name>/) and features.json there (modality -> store), so that
`imer train --dataset <name>` needs no raw media. Examples:

  imer import-features --format mmin --source /data/IEMOCAP_features_2021        (-> iemocap-mmin)
  imer import-features --format mmin --source /data/MSP_features --corpus msp-improv
  imer import-features --format mmsa --source /data/MOSI/Processed/aligned_50.pkl (-> mosi-aligned50)
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, choices=["mmin", "mmsa"], help="mmin: feature root with A/ V/ L/ target/; "
                   "mmsa: an aligned_50.pkl / unaligned_50.pkl file")
    p.add_argument("--source", required=True, help="MMIN feature root folder, or MMSA pickle file")
    p.add_argument("--corpus", help="iemocap | msp-improv (mmin), mosi | mosei (mmsa); guessed when left out")
    p.add_argument("--name", help="dataset name to import as (default: <corpus>-mmin, <corpus>-<pickle name>)")
    p.add_argument("--audio", help="mmin: acoustic feature file in A/ (default comparE; MSP-IMPROV comparE_raw)")
    p.add_argument("--video", default="denseface", help="mmin: visual feature file in V/ (default denseface)")
    p.add_argument("--text", default="bert_large", help="mmin: lexical feature file in L/ (default bert_large)")


def main(args) -> int:
    import json

    from manifests.datasets import manifest_dir
    from manifests.schema import ManifestError
    from pipeline.store import StoreError

    try:
        if args.format == "mmin":
            from manifests.importers.mmin import import_mmin

            dataset, mapping = import_mmin(args.source, args.corpus, args.name, args.audio, args.video, args.text)
        else:
            from manifests.importers.mmsa import import_mmsa

            dataset, mapping = import_mmsa(args.source, args.corpus, args.name)
    except (ManifestError, StoreError) as e:
        print(f"imer import-features: {e}", file=sys.stderr)
        return 2
    out = manifest_dir(dataset)
    print(f"imported as dataset {dataset!r}: manifest and folds in {out}")
    for m, e in mapping.items():
        print(f"  {m:<6} {e['key']}: {e['utterances']} utterances, dim {e['dim']}"
              + (f", {e['failed']} failed" if e["failed"] else ""))
    doc = json.loads((out / "dataset.json").read_text())
    print(f"folds: {', '.join(doc['protocols'])}; train with: imer train --dataset {dataset} --method METHOD")
    return 0
