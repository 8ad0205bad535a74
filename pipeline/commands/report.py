"""Put every method's latest complete run on a dataset side by side.

Prints one Table-5-style table (conditions {a} {v} {t} {a,v} {a,t} {v,t}, their average, {a,v,t};
mean ± std over folds x seeds) and writes results/<dataset>/report.md and report.png. Example:

  imer report --dataset demo
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--dataset", required=True, help="dataset name")
    p.add_argument("--results", help="results root (default $IMER_RESULTS or ./results)")


def main(args) -> int:
    from train.report import latest_runs, report

    print(report(args.dataset, args.results))
    return 0 if latest_runs(args.dataset, args.results) else 1
