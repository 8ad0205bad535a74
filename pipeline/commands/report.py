"""Put every method's latest complete run on a dataset side by side.

Prints Table-5-style tables (one per protocol: conditions {a} ... {a,v,t} and their average, MR or
η columns and theirs; mean ± std over folds x seeds) and writes results/<dataset>/report.md and
report.png. Runs that differ in features, folds, seeds or task never share a table: they are
grouped, and --methods asks for one table, refused in one line when the runs differ. Examples:

  imer report --dataset demo
  imer report --dataset demo --methods baseline,mmin
  imer report --dataset demo --methods baseline,baseline-aug,mmin,if-mmin --docs README.md --block demo
  imer report --dataset demo --methods baseline,imder --run mr-reg   # the runs made with --run-id mr-reg
  imer report --dataset demo --methods if-mmin,if-mmin-noinv --docs docs/methods/if-mmin.md --block if-mmin-ablation

--docs FILE pastes the tables between '<!-- report:BLOCK -->' and '<!-- /report -->' of any Markdown
file (the README or a docs page) and ends them with a provenance line: this command, the commit,
the CPU model, its threads and vector kernels, and the date. --readme is the same option.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")
    p.add_argument("--methods", help="comma-separated methods for one table (default: all, grouped)")
    p.add_argument("--run", metavar="RUN_ID", help="each method's run of this id (imer train --run-id) "
                                                   "instead of its latest complete run")
    p.add_argument("--docs", "--readme", dest="docs", metavar="FILE",
                   help="also replace the block between '<!-- report:BLOCK -->' and '<!-- /report -->' in the "
                        "Markdown file FILE (README.md, docs/*.md) with this output and its provenance line")
    p.add_argument("--block", help="the block name for --docs (default: the dataset)")


def main(args) -> int:
    import sys

    from pipeline.provenance import command_line, paste_block
    from train.report import ReportError, latest_runs, report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        text = report(args.dataset, args.results, methods=methods, run_id=args.run)
        if args.docs:
            cmd = command_line("imer report", args, {"dataset": "--dataset", "results": "--results",
                                                     "methods": "--methods", "run": "--run"})
            paste_block(args.docs, args.block or args.dataset, text, cmd)
    except ReportError as e:
        print(f"imer report: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if latest_runs(args.dataset, args.results, args.run) else 1
