"""Predict the emotion of one recording with a trained run, from any subset of the three modalities.

Features are extracted on the fly with the run's extractor configs; modalities not given count as
missing. Prints the label and class probabilities (averaged over the run's fold x seed models).
Examples:

  imer predict --run results/demo/mmin --audio clip.wav --text "I can't believe it!"
  imer predict --run results/demo/mmin/20261125-170000-ab12cd --video clip.mp4 --json
"""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="a run folder results/<dataset>/<method>/<run-id>, or a method "
                                                "folder results/<dataset>/<method> (its newest complete run)")
    p.add_argument("--audio", help="speech file (wav, flac, mp3, or a video's sound track)")
    p.add_argument("--video", help="face video file (mp4, avi, ...)")
    p.add_argument("--text", help="the transcript")
    p.add_argument("--fold", help="use only this fold's models (default: average over every fold x seed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--results", help="results root for a relative --run (default $IMER_RESULTS or ./results)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def main(args) -> int:
    from extract.base import ExtractorUnavailable
    from pipeline.fsutil import UnsafeCheckpoint
    from train.predict import PredictError, predict

    try:
        res = predict(args.run, audio=args.audio, video=args.video, text=args.text, fold=args.fold,
                      device=args.device, results_dir=args.results)
    except (PredictError, ExtractorUnavailable, UnsafeCheckpoint) as e:
        print(f"imer predict: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"input: {{{','.join(res['condition'])}}} (run {res['run']}, {res['models']} model(s))")
    if "label" in res:
        print(f"label: {res['label']}")
        for k, v in sorted(res["probabilities"].items(), key=lambda kv: -kv[1]):
            print(f"  {k:>10s}  {v:.3f}")
    else:
        print(f"value: {res['value']:.3f}")
    return 0
