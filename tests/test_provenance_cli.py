"""python -m pipeline.provenance: a timed command's last lines are pasted with their provenance,
and a failing command pastes nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = "intro\n<!-- report:e2e -->\nold figures\n<!-- /report -->\nafter\n"


def _run(page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.provenance", "--docs", str(page), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _block(text: str) -> str:
    return text.split("<!-- report:e2e -->\n")[1].split("<!-- /report -->")[0]


def test_the_last_lines_and_the_provenance_are_pasted(tmp_path):
    page = tmp_path / "perf.md"
    page.write_text(PAGE)
    # the last line is redrawn with \r (a progress counter): the block keeps what was left on screen
    code = "import time; [print(f'line {i}') for i in range(20)]; print('50 %\\r100 %'); time.sleep(0.3)"
    r = _run(page, "--block", "e2e", "--tail", "3", "--", sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    assert "line 0\n" in r.stdout and "line 19\n" in r.stdout  # streamed as usual, every line
    text = page.read_text()
    assert text.startswith("intro\n<!-- report:e2e -->\n") and text.endswith("<!-- /report -->\nafter\n")
    block = _block(text)
    assert block.startswith("```text\nline 18\nline 19\n100 %\n```\n\nProvenance: `"), block
    line = block.strip().splitlines()[-1]
    # the command as run (quoted as a shell would take it), commit, machine, date, wall time
    assert line.startswith(f"Provenance: `{sys.executable} -c ") and "print(f" in line, line
    m = re.fullmatch(r"Provenance: `.+` · commit (\S+).* · (.+ \(\d+ threads.*\)) · (\d{4}-\d\d-\d\d) · (\d+) s", line)
    assert m, line
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit is HEAD's
        assert m.group(1) == head.stdout.strip(), line


def test_a_failing_command_leaves_the_page_unchanged(tmp_path):
    page = tmp_path / "perf.md"
    page.write_text(PAGE)
    r = _run(page, "--block", "e2e", "--", sys.executable, "-c", "print('partial'); raise SystemExit(3)")
    assert r.returncode == 3
    assert "partial" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("pipeline.provenance: `") and "exited with 3" in r.stderr
    assert page.read_text() == PAGE


def test_bad_arguments_are_refused_before_the_command_runs(tmp_path):
    page = tmp_path / "perf.md"
    page.write_text(PAGE)
    marker = tmp_path / "ran"
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    r = _run(page, "--block", "nosuch", "--", *touch)
    assert r.returncode == 2 and "no '<!-- report:nosuch -->'" in r.stderr
    r = _run(tmp_path / "missing.md", "--block", "e2e", "--", *touch)
    assert r.returncode == 2 and "missing.md" in r.stderr
    r = _run(page, "--block", "e2e")
    assert r.returncode == 2 and "no command" in r.stderr
    assert not marker.exists() and page.read_text() == PAGE


def test_it_pastes_without_the_venv_packages(tmp_path):
    """On a fresh clone `python -m pipeline.provenance ... -- make demo` starts before `make setup`
    has installed numpy, yaml or torch: running and pasting must not need them."""
    page = tmp_path / "perf.md"
    page.write_text(PAGE)
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('numpy', 'yaml', 'torch')]; "
    run = "import runpy; runpy.run_module('pipeline.provenance', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", blocked + run, "--docs", str(page), "--block", "e2e", "--",
                        sys.executable, "-c", "print('done')"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    block = _block(page.read_text())
    assert block.startswith("```text\ndone\n```\n\nProvenance: `") and " threads) · " in block  # no kernels without torch
