"""pytest plugin for the baseline run of ``make mutate``: which test executes which line of the
mutated file, how long each test takes, and where the file was imported from.

Loaded with ``-p coverage_map`` (tools/mutate on PYTHONPATH) so coverage starts before any test
module imports the target. Reads MUTATE_TARGET (absolute path of the file) and MUTATE_OUT (the
JSON it writes): {"lines": {line: [node ids]}, "import_lines": [...], "durations": {node id: s},
"imported_from": path or null}. Lines run while no test runs (module import, collection) are
``import_lines``: every test depends on them.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import coverage
import pytest

_TARGET = os.path.realpath(os.environ["MUTATE_TARGET"])
_cov = coverage.Coverage(data_file=None, include=[_TARGET], config_file=False)
_cov.start()
_durations: dict[str, float] = defaultdict(float)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _cov.switch_context(item.nodeid)
    yield
    _cov.switch_context("")


def pytest_runtest_logreport(report):
    _durations[report.nodeid] += report.duration


def _imported_from():
    """Where the target module (MUTATE_MODULE) was imported from; None when no test imported it."""
    mod = sys.modules.get(os.environ.get("MUTATE_MODULE", ""))
    f = getattr(mod, "__file__", None)
    return os.path.realpath(f) if f else None


def pytest_sessionfinish(session, exitstatus):
    _cov.stop()
    data = _cov.get_data()
    lines: dict[int, set] = defaultdict(set)
    imports: set[int] = set()
    for f in data.measured_files():
        if os.path.realpath(f) != _TARGET:
            continue
        for line, contexts in data.contexts_by_lineno(f).items():
            for c in contexts:
                (lines[line].add(c) if c else imports.add(line))
    out = {"lines": {str(k): sorted(v) for k, v in sorted(lines.items())}, "import_lines": sorted(imports),
           "durations": dict(_durations), "imported_from": _imported_from()}
    with open(os.environ["MUTATE_OUT"], "w") as fh:
        json.dump(out, fh)
