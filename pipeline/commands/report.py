"""Put every method's latest complete run on a dataset side by side.

Prints Table-5-style tables (one per protocol: conditions {a} ... {a,v,t} and their average, MR or
η columns and theirs; mean ± std over folds x seeds) and writes results/<dataset>/report.md and
report.png. Runs that differ in features, folds, seeds or task never share a table: they are
grouped, and --methods asks for one table, refused in one line when the runs differ. Examples:

  imer report --dataset demo
  imer report --dataset demo --methods baseline,mmin
  imer report --dataset demo --readme README.md     # refresh the README's demo table block
  imer report --dataset demo --methods baseline,imder --run mr-reg   # the runs made with --run-id mr-reg
  imer report --dataset demo --methods if-mmin,if-mmin-noinv --readme README.md --block if-mmin-ablation
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")
    p.add_argument("--methods", help="comma-separated methods for one table (default: all, grouped)")
    p.add_argument("--run", metavar="RUN_ID", help="each method's run of this id (imer train --run-id) "
                                                   "instead of its latest complete run")
    p.add_argument("--readme", metavar="FILE", help="also replace the block between '<!-- report:BLOCK -->' "
                                                    "and '<!-- /report -->' in FILE with this output")
    p.add_argument("--block", help="the block name for --readme (default: the dataset)")


def main(args) -> int:
    import sys

    from train.report import ReportError, latest_runs, report, update_block

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        text = report(args.dataset, args.results, methods=methods, run_id=args.run)
        if args.readme:
            update_block(args.readme, args.block or args.dataset, text)
    except ReportError as e:
        print(f"imer report: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if latest_runs(args.dataset, args.results, args.run) else 1
