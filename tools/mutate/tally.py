"""Counting a session's outcomes, matching survivors against equivalent.yaml, and the survivors
report a person triages."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import yaml
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome

COLUMNS = ("mutants", "killed", "timeout", "survived", "equivalent", "pending")


def changed_lines(diff: str) -> tuple[str, str]:
    """(removed lines, added lines) of a cosmic-ray diff, each stripped, joined by newlines."""
    rows = [r for r in (diff or "").split("\n") if not r.startswith(("---", "+++", "@@"))]
    before = "\n".join(r[1:].strip() for r in rows if r.startswith("-"))
    after = "\n".join(r[1:].strip() for r in rows if r.startswith("+"))
    return before, after


def load_equivalent(path: Path) -> dict:
    """{(file, function, before, after): why} from equivalent.yaml (function '' = module level)."""
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    entries = (data or {}).get("equivalent") or []
    out = {}
    for e in entries:
        if not str(e.get("why", "")).strip():
            raise SystemExit(f"{path}: the entry for {e.get('file')} '{e.get('before')}' needs a 'why'")
        text = ["\n".join(s.strip() for s in str(e[k]).split("\n")) for k in ("before", "after")]
        out[(e["file"], e.get("function") or "", *text)] = e["why"]
    return out


def tally(db_path: Path, rel: str, equivalent: dict, smap=None) -> tuple[Counter, list[dict]]:
    """Counts per outcome (COLUMNS, plus ``filtered`` and ``error``) and the survivors, each
    {"job_id", "file", "line", "function", "operator", "before", "after", "diff", "equivalent"}."""
    counts, survivors = Counter(), []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        results = dict(db.results)
        items = list(db.work_items)
    for item in items:
        m = item.mutations[0]
        res = results.get(item.job_id)
        if res is not None and res.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
            counts["filtered"] += 1
            counts[("filtered", res.output or "no mutation possible")] += 1
            continue
        counts["mutants"] += 1
        if res is None:
            counts["pending"] += 1
        elif res.worker_outcome != WorkerOutcome.NORMAL or res.test_outcome == TestOutcome.INCOMPETENT:
            counts["error"] += 1
        elif res.test_outcome == TestOutcome.KILLED:
            counts["timeout" if res.output == "timeout" else "killed"] += 1
        else:
            before, after = changed_lines(res.diff)
            fn = smap.function(m.start_pos[0]) if smap else m.definition_name
            why = equivalent.get((rel, fn or "", before, after))
            counts["equivalent" if why else "survived"] += 1
            survivors.append({"job_id": item.job_id, "file": rel, "line": m.start_pos[0],
                              "operator": m.operator_name, "function": fn,
                              "before": before, "after": after, "diff": res.diff, "equivalent": why})
    return counts, sorted(survivors, key=lambda s: (s["line"], s["operator"]))


def ratio(c: Counter) -> str:
    judged = c["killed"] + c["timeout"] + c["survived"]
    if not judged:
        return "-"
    text = f"{100.0 * (c['killed'] + c['timeout']) / judged:.1f} %"
    return text + (" (partial)" if c["pending"] else "")


def table(rows: list[tuple[str, Counter]]) -> str:
    head = ("file",) + COLUMNS + ("kill ratio",)
    body = [(f,) + tuple(str(c[k]) for k in COLUMNS) + (ratio(c),) for f, c in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(row):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in body]
    extra = [f"{f}: {c['filtered']} not run: "
             + ", ".join(f"{n} {k[1]}" for k, n in c.most_common() if isinstance(k, tuple))
             + (f"; {c['error']} failed to run (cr-report on its session shows why)" if c["error"] else "")
             for f, c in rows]
    return "\n".join(lines + [""] + extra)


def write_report(path: Path, rows: list[tuple[str, Counter, list[dict]]]) -> None:
    """Survivors per file (file:line, function, operator, diff) with a ready equivalent.yaml
    entry, then the ones already judged equivalent."""
    out = [f"# Surviving mutants ({time.strftime('%Y-%m-%d %H:%M')})", "",
           "Kill each one with a test, or, when the mutant computes what the original does on every "
           "input the code can get, copy its entry into tools/mutate/equivalent.yaml with the reason.", ""]
    for rel, counts, survivors in rows:
        live = [s for s in survivors if not s["equivalent"]]
        out += [f"## {rel}: {counts['survived']} survived, {counts['equivalent']} equivalent, "
                f"kill ratio {ratio(counts)}", ""]
        for s in live:
            entry = yaml.safe_dump([{"file": s["file"], "function": s["function"] or "", "before": s["before"],
                                     "after": s["after"], "why": ""}],
                                   sort_keys=False, allow_unicode=True, width=1000)
            hunk = "\n".join(r for r in s["diff"].split("\n") if not r.startswith(("--- ", "+++ ")))
            out += [f"### {s['file']}:{s['line']} in {s['function'] or '(module)'}: {s['operator']}", "",
                    "```diff", hunk.strip("\n"), "```", "", "```yaml", entry.rstrip(), "```", ""]
        for s in survivors:
            if s["equivalent"]:
                out.append(f"- equivalent: {s['file']}:{s['line']} `{s['before']}` -> `{s['after']}`: "
                           f"{s['equivalent']}")
        out.append("")
    path.write_text("\n".join(out))
