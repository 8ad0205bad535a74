"""Run every bench/bench_*.py in turn (or only those named: `python bench/run.py store train`); each
prints its figures and writes bench/results/<name>.json.

`--docs FILE` also pastes what each bench printed into the block `<!-- report:bench-NAME -->` ...
`<!-- /report -->` of the Markdown file FILE, with its provenance line (command, commit, machine,
date, wall time), so the performance page's figures are the benches' own output, never retyped:

    python bench/run.py train store --docs docs/performance.md
"""

from __future__ import annotations

import argparse
import io
import runpy
import shlex
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

here = Path(__file__).parent
sys.path.insert(0, str(here))  # so benches can `from common import write_result`
sys.path.insert(0, str(here.parent))


class _Tee(io.TextIOBase):
    """Prints as usual and keeps a copy (progress bars go to stderr, so only the figures stay)."""

    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, s):
        self.kept.write(s)
        return self.out.write(s)

    def flush(self):
        self.out.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benches", nargs="*", help="bench names (bench_NAME.py); default: all")
    p.add_argument("--docs", metavar="FILE", help="paste each bench's output into block bench-NAME of FILE")
    p.add_argument("--bench-args", default="", metavar="ARGS",
                   help="arguments for the benches run (e.g. '--batches 0'); default: each bench's own defaults")
    args = p.parse_args(argv)
    if args.docs and not Path(args.docs).is_file():
        print(f"bench/run.py: --docs {args.docs}: no such Markdown file", file=sys.stderr)
        return 2
    scripts = [s for s in sorted(here.glob("bench_*.py"))
               if not args.benches or s.stem.removeprefix("bench_") in args.benches]
    unknown = set(args.benches) - {s.stem.removeprefix("bench_") for s in scripts}
    if unknown:
        print(f"bench/run.py: no bench named {', '.join(sorted(unknown))} in {here}", file=sys.stderr)
        return 2
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        print(f"== bench {name}", flush=True)
        t = time.perf_counter()
        sys.argv = [str(script), *shlex.split(args.bench_args)]  # not the selection: the bench's own
        tee = _Tee(sys.stdout)
        with redirect_stdout(tee):
            runpy.run_path(str(script), run_name="__main__")
        wall = time.perf_counter() - t
        print(f"== bench {name} done in {wall:.1f} s", flush=True)
        if args.docs:
            from pipeline.provenance import paste_block

            text = "```text\n" + tee.kept.getvalue().strip() + "\n```"
            cmd = f"python bench/run.py {name}" + (f" --bench-args {shlex.quote(args.bench_args)}" if args.bench_args else "")
            paste_block(args.docs, f"bench-{name}", text, cmd, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
