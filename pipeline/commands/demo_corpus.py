"""Generate the demo corpus: real 16 kHz WAV speech (espeak-ng), 25 fps MP4 face video, transcripts.

Deterministic: the same --seed and --size give identical manifests and audio samples. A complete
corpus already in --out is reused. Sizes: tiny (4 speakers, 32 utterances of ~1 s, for tests),
small (6 speakers, 192 utterances of ~2.7 s, what `make demo` uses), medium (8 speakers, 800).
Examples:

  imer demo-corpus --out /tmp/demo
  imer demo-corpus --out /tmp/demo-m --size medium --seed 1 --separability

--separability also measures how much emotion each modality carries, with simple scikit-learn
classifiers on hand-made features (leave-one-speaker-out; independent of imer's extractors).
`imer manifest --dataset demo --data-root DIR` then makes the corpus the `demo` dataset.
"""

from __future__ import annotations

import sys
import time


def add_arguments(p) -> None:
    from manifests.demo import SIZES

    p.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier demo corpus)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", default="small", choices=list(SIZES), help="corpus size (default small)")
    p.add_argument("--separability", action="store_true",
                   help="then print per-modality and fusion accuracy of simple classifiers")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from manifests._demo_tts import TTSUnavailable
    from manifests.demo import DemoError, corpus_info, generate

    t0 = time.perf_counter()
    try:
        manifest = generate(args.out, seed=args.seed, size=args.size, progress=not args.quiet)
    except (DemoError, TTSUnavailable) as e:
        print(f"imer demo-corpus: {e}", file=sys.stderr)
        return 2
    info = corpus_info(manifest.parent)
    print(f"{manifest.parent}: {info['n_utterances']} utterances, {len(info['speakers'])} speakers, "
          f"{info['seconds'] / 60:.1f} min of speech, {info['occluded_videos']} videos with occlusions "
          f"(seed {info['seed']}, size {info['size']}; {time.perf_counter() - t0:.0f} s)")
    print(f"manifest: {manifest}")
    if args.separability:
        from manifests._demo_separability import measure

        r = measure(manifest, progress=not args.quiet)
        print("unweighted accuracy, leave-one-speaker-out (sklearn on MFCC / face-pixel / bag-of-words features):")
        for k in ("text", "audio", "video", "fusion", "chance"):
            print(f"  {k:<7} {r[k]:.3f}")
    return 0
