"""``make mutate``: mutation testing of the mechanism files with cosmic-ray (not part of CI).

Each file of targets.yaml is mutated against the tests listed for it (those present), one
mutant at a time: cosmic-ray writes the mutant into a private copy of the checkout
(.mutate/tree: the checkout itself is never touched, so other work and test runs go on in it),
runs pytest there and puts the file back. Per file, a cosmic-ray session (.mutate/sessions/*.sqlite,
readable with ``cr-report`` and ``cr-html``) holds every mutant and its outcome, so Ctrl-C stops
after putting the file back and the next run resumes with the mutants not yet run. A session
starts over when its file changes; when only its tests change, the survivors are run again; a
changed scope or operator subset (targets.yaml) only re-applies the filters (scope.py).

A baseline run first checks that the tests pass unmutated, that they import the file from the
copy, and records which test executes which line (tools/mutate/coverage_map.py): each mutant
then runs only the tests that reach it, with ``-x``, under a timeout of 3 x the baseline
(``--timeout``). The table gives per file: mutants run, killed, timeout, survived, equivalent
(survivors listed in equivalent.yaml, left out of the ratio), pending, and the kill ratio
(killed + timeout) / (killed + timeout + survived), for every file with a session. Survivors go
to .mutate/survivors.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml
from filelock import FileLock, Timeout

import cosmic_ray.commands
from cosmic_ray.mutating import mutate_and_test
from cosmic_ray.work_db import WorkDB, WorkResultStorage, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

import scope
import tally

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / ".mutate"
TREE = WORK / "tree"
SESSIONS = WORK / "sessions"
COPIED = ("train", "pipeline", "extract", "manifests", "tests", "pyproject.toml")
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _key(rel: str) -> str:
    return rel.replace("/", "__").removesuffix(".py")


def _module(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def fresh_tree() -> None:
    """Copy the checkout's files (tracked and untracked, not ignored) into .mutate/tree, afresh:
    whatever a killed run left mutated there is gone."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard", "--", *COPIED],
                         cwd=ROOT, capture_output=True, check=True).stdout
    os.chdir(WORK)
    shutil.rmtree(TREE, ignore_errors=True)
    for name in filter(None, out.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (TREE / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, TREE / name)


def baseline(rel: str, tests: list[str]) -> dict:
    """Run the tests unmutated with the coverage plugin; the coverage map plus the wall time."""
    out = SESSIONS / f"{_key(rel)}.coverage.json"
    env = dict(os.environ, MUTATE_TARGET=str(TREE / rel), MUTATE_MODULE=_module(rel), MUTATE_OUT=str(out),
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    proc = subprocess.run(PYTEST + ["-p", "coverage_map", *tests], cwd=TREE, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the tests fail unmutated (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    cov = json.loads(out.read_text())
    out.unlink()  # kept in the session's state
    where = cov["imported_from"]
    if where != os.path.realpath(TREE / rel):
        raise RuntimeError(f"the tests imported {_module(rel)} from {where}, not from the copy {TREE / rel}: "
                           "mutants would go unseen")
    cov["wall_s"] = wall
    return cov


def refilter(db_path: Path, smap: scope.SourceMap, cfg: dict, table: dict) -> None:
    """Mark the mutants the filters leave out as skipped, with why, and make pending again the
    ones they no longer leave out: a changed scope or operator subset needs no new session."""
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        results = dict(db.results)
        skip: dict[str, list[str]] = {}
        unskip = []
        for item in db.work_items:
            why = scope.skip_reason(item.mutations[0], smap, cfg.get("functions"), table)
            r = results.get(item.job_id)
            was = r.output if r is not None and r.worker_outcome == WorkerOutcome.SKIPPED else None
            if why and why != was:
                skip.setdefault(why, []).append(item.job_id)
            elif was and not why:
                unskip.append(item.job_id)
        for why, ids in skip.items():
            db.set_multiple_results(ids, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why))
    _forget(db_path, unskip)


def _forget(db_path: Path, job_ids: list[str]) -> None:
    with sqlite3.connect(db_path) as con:
        con.executemany(f"DELETE FROM {WorkResultStorage.__tablename__} WHERE job_id = ?", [(j,) for j in job_ids])


def forget_survivors(db_path: Path, rel: str, equivalent: dict, smap: scope.SourceMap) -> int:
    """Drop the results of survived mutants not judged equivalent, and of failed runs: they run
    again."""
    _, survivors = tally.tally(db_path, rel, equivalent, smap)
    ids = [s["job_id"] for s in survivors if not s["equivalent"]]
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        ids += [j for j, r in db.results if r.worker_outcome in (WorkerOutcome.EXCEPTION, WorkerOutcome.ABNORMAL)]
    _forget(db_path, ids)
    return len(ids)


def prepare(rel: str, cfg: dict, table: dict, equivalent: dict, fresh: bool) -> tuple[dict, list[str]]:
    """The session's state (hashes, coverage map), initialised or brought up to date."""
    missing = [t for t in cfg["tests"] if not (TREE / t).is_file()]
    tests = sorted(t for t in cfg["tests"] if t not in missing)  # the suite's order
    if missing:
        print(f"  tests not present, left out: {' '.join(missing)}")
    if not tests:
        raise RuntimeError("none of its tests is present")
    db_path, state_path = SESSIONS / f"{_key(rel)}.sqlite", SESSIONS / f"{_key(rel)}.json"
    snapshot = SESSIONS / f"{_key(rel)}.source.py"
    source = (TREE / rel).read_bytes()
    state = json.loads(state_path.read_text()) if state_path.is_file() and db_path.is_file() else {}
    want = {"source": _digest(source), "tests": {t: _digest((TREE / t).read_bytes()) for t in tests}}
    if fresh or state.get("source") != want["source"]:
        print("  new session" + (" (the file changed)" if state else ""))
        snapshot.write_bytes(source)
        os.chdir(TREE)
        with use_db(str(db_path), WorkDB.Mode.create) as db:
            cosmic_ray.commands.init([Path(rel)], db, {})
        state = {}
    elif state.get("tests") != want["tests"]:
        n = forget_survivors(db_path, rel, equivalent, scope.SourceMap(snapshot.read_text()))
        print(f"  tests changed: {n} survivors run again")
    refilter(db_path, scope.SourceMap(snapshot.read_text()), cfg, table)
    if state.get("tests") != want["tests"]:
        print(f"  baseline: {' '.join(tests)}")
        state = dict(want, coverage=baseline(rel, tests))
        print(f"  baseline passed in {state['coverage']['wall_s']:.1f} s")
        state_path.write_text(json.dumps(state))
    return state, tests


def run_file(rel: str, cfg: dict, table: dict, equivalent: dict, args) -> None:
    print(f"{rel}:")
    fresh_tree()
    state, tests = prepare(rel, cfg, table, equivalent, args.fresh)
    cov = state["coverage"]
    smap = scope.SourceMap((SESSIONS / f"{_key(rel)}.source.py").read_text())
    timeout = args.timeout or max(30.0, 3 * cov["wall_s"])
    os.chdir(TREE)
    with use_db(str(SESSIONS / f"{_key(rel)}.sqlite"), WorkDB.Mode.open) as db:
        pending = db.pending_work_items
        print(f"  {len(pending)} mutants to run (timeout {timeout:.0f} s each)")
        t0, counts = time.monotonic(), {"killed": 0, "timeout": 0, "survived": 0, "error": 0}
        for i, item in enumerate(pending, 1):
            run = scope.select_tests(item.mutations[0], smap, cov, tests)
            res = mutate_and_test(item.mutations, shlex.join(PYTEST + ["-x", *run]), timeout)
            db.set_result(item.job_id, WorkResult(worker_outcome=res.worker_outcome, test_outcome=res.test_outcome,
                                                  diff=res.diff, output=(res.output or "")[-3000:]))
            kind = ("error" if res.worker_outcome != WorkerOutcome.NORMAL else
                    "survived" if res.test_outcome == TestOutcome.SURVIVED else
                    "timeout" if res.output == "timeout" else "killed")
            counts[kind] += 1
            if i % 10 == 0 or i == len(pending):
                each = (time.monotonic() - t0) / i
                print(f"  {i}/{len(pending)}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                      + f"; {each:.1f} s each, about {each * (len(pending) - i) / 60:.0f} min left")


def _stop_children() -> None:
    """Kill the test run in flight (its own session: Ctrl-C does not reach it), by pid."""
    for p in psutil.Process().children(recursive=True):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def summary(files: list[str], equivalent: dict) -> None:
    rows = []
    for rel in files:
        db_path = SESSIONS / f"{_key(rel)}.sqlite"
        snapshot = SESSIONS / f"{_key(rel)}.source.py"
        if db_path.is_file() and snapshot.is_file():
            counts, survivors = tally.tally(db_path, rel, equivalent, scope.SourceMap(snapshot.read_text()))
            rows.append((rel, counts, survivors))
    if not rows:
        print("no session yet")
        return
    tally.write_report(WORK / "survivors.md", rows)
    print("\n" + tally.table([(r, c) for r, c, _ in rows]))
    print(f"\nsurvivors: {WORK / 'survivors.md'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="*", help="files of targets.yaml to run (default: all)")
    ap.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x the baseline, at least 30)")
    ap.add_argument("--fresh", action="store_true", help="start the sessions over")
    ap.add_argument("--report", action="store_true", help="only print the table and write the report")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it comes, also into a log
    spec = yaml.safe_load((HERE / "targets.yaml").read_text())
    targets, table = spec["files"], spec["operators"]
    files = args.files or list(targets)
    unknown = [f for f in files if f not in targets]
    if unknown:
        ap.error(f"not in tools/mutate/targets.yaml: {' '.join(unknown)}")
    equivalent = tally.load_equivalent(HERE / "equivalent.yaml")
    SESSIONS.mkdir(parents=True, exist_ok=True)
    # the checkout's tests run with as many threads as they set; one worker keeps to one core
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    if args.report:  # reads the sessions only: fine while a run goes on
        summary(list(targets), equivalent)
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 0
    try:
        with FileLock(str(WORK / ".lock"), timeout=0):
            try:
                for rel in files:
                    try:
                        run_file(rel, targets[rel], table, equivalent, args)
                    except RuntimeError as e:
                        print(f"  skipped: {e}")
                        rc = 1
            except KeyboardInterrupt:
                _stop_children()
                print("\ninterrupted: the mutant in flight was put back; `make mutate` resumes from here")
                rc = 130
            finally:
                os.chdir(ROOT)
            summary(list(targets), equivalent)
    except Timeout:
        print(f"another `make mutate` holds {WORK / '.lock'}")
        return 1
    return rc

if __name__ == "__main__":
    sys.exit(main())
