"""Where a pasted table or figure came from: the command, the commit, the machine, the date.

``imer report --docs FILE --block NAME`` and ``imer compare --docs FILE --block NAME`` paste their
output between ``<!-- report:NAME -->`` and ``<!-- /report -->`` of any Markdown file (the README or
a page under docs/) and end the block with one provenance line written here, e.g.

    Provenance: `imer report --dataset demo` · commit 74013ea · AMD EPYC, family 25 (2 threads, AVX512) · 2026-12-07

so no figure in the documentation is typed by hand or loses where it came from. Any other timed
command's outcome is pasted the same way (its last lines, its wall time):

    python -m pipeline.provenance --docs docs/performance.md --block e2e-demo -- make demo
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args],  # read only
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def commit() -> str:
    """The checkout's short commit, '+ local changes' when tracked files differ from it; for an
    installed (non-git) copy, the package version."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        from pipeline import __version__

        return f"imer {__version__} (not a git checkout)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + (" (+ local changes)" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name; on Linux with its family number, because a VM may report only the
    vendor line ('AMD EPYC') and two families of it gave different results."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and info:
                break  # end of the first processor's block
            info.setdefault(key.strip(), " ".join(value.split()))
        if info.get("model name"):
            family = info.get("cpu family")
            return info["model name"] + (f", family {family}" if family else "")
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str | None:
    """The vector kernels torch uses here (AVX2, AVX512, ...): results differ with them
    (docs/reproducibility.md)."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # torch absent or too old: leave the kernels out rather than guess
        return None


def machine() -> str:
    cap = cpu_capability()
    return f"{cpu_model()} ({os.cpu_count()} threads" + (f", {cap})" if cap else ")")


def provenance_line(command: str, wall_s: float | None = None) -> str:
    parts = [f"`{command}`", f"commit {commit()}", machine(), time.strftime("%Y-%m-%d")]
    if wall_s is not None:
        parts.append(f"{wall_s:.0f} s")
    return "Provenance: " + " · ".join(parts)


def command_line(prog: str, args, options: dict[str, str]) -> str:
    """``prog`` and the given options of ``args`` ({dest: flag}), as one could type them again."""
    words = prog.split()
    for dest, flag in options.items():
        value = getattr(args, dest, None)
        if value in (None, False, [], ""):
            continue
        for v in value if isinstance(value, list) else [value]:
            words += [flag] if v is True else [flag, str(v)]
    return shlex.join(words)


def paste_block(path, block: str, text: str, command: str, wall_s: float | None = None) -> None:
    """Replace block ``block`` of the Markdown file ``path`` with ``text`` and its provenance line."""
    from train.results import ReportError

    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{p}: no such Markdown file; --docs names an existing page (README.md or "
                          "docs/<page>.md) holding '<!-- report:" + block + " -->' ... '<!-- /report -->'")
    from train.report import update_block

    update_block(p, block, text.rstrip() + "\n\n" + provenance_line(command, wall_s))


def replace_block(path, block: str, text: str) -> None:
    """Replace the lines between ``<!-- report:<block> -->`` and ``<!-- /report -->`` of the Markdown
    file ``path`` with ``text`` (atomically); ValueError when the block is absent. The one block
    writer: ``imer report/compare --docs`` and ``bench/run.py --docs`` come here through
    train.report.update_block; it imports neither numpy nor yaml, so ``python -m pipeline.provenance
    -- make demo`` runs on a fresh clone before `make setup` has made the venv."""
    from pipeline.fsutil import atomic_write_text

    path = Path(path)
    doc = path.read_text()
    start, end = f"<!-- report:{block} -->", "<!-- /report -->"
    i = doc.find(start)
    j = doc.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"{path}: no '{start}' ... '{end}' block to update; add the two marker lines where "
                         "the output belongs")
    atomic_write_text(path, doc[: i + len(start)] + "\n" + text.rstrip() + "\n" + doc[j:])


def run_and_paste(docs, block: str, cmd: list[str], tail: int = 15) -> int:
    """Run ``cmd``, streaming its stdout (stderr, where progress bars go, passes untouched), and
    paste its last ``tail`` stdout lines and its wall time into block ``block`` of ``docs``.
    Returns the command's exit code; on failure nothing is pasted."""
    doc = Path(docs)
    # both checked before the command runs, so a typo does not cost the run
    if not doc.is_file():
        print(f"pipeline.provenance: --docs {doc}: no such Markdown file", file=sys.stderr)
        return 2
    if f"<!-- report:{block} -->" not in doc.read_text():
        print(f"pipeline.provenance: {doc} has no '<!-- report:{block} -->' ... '<!-- /report -->' block; "
              "add the two marker lines where the output belongs", file=sys.stderr)
        return 2
    command = shlex.join(cmd)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a Python child streams through the pipe as it would to a terminal
    last: deque[str] = deque(maxlen=tail)
    t = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
    except OSError as e:
        print(f"pipeline.provenance: cannot run `{command}`: {e.strerror}; {doc} left unchanged", file=sys.stderr)
        return 127
    try:
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
            line = raw.decode(errors="replace").rstrip("\r\n")
            last.append(line.rsplit("\r", 1)[-1])  # of a line redrawn with \r, what was left on screen
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the command too; wait for it, paste nothing
        rc = proc.wait()
        rc = rc if rc != 0 else -2
    wall = time.perf_counter() - t
    if rc != 0:
        code = rc if rc > 0 else 128 - rc  # killed by signal N: the shell's 128 + N
        print(f"pipeline.provenance: `{command}` exited with {code} after {wall:.0f} s; {doc} block {block} "
              "left unchanged", file=sys.stderr)
        return code
    text = "```text\n" + "\n".join(last).strip("\n") + "\n```"
    replace_block(doc, block, text + "\n\n" + provenance_line(command, wall))
    print(f"pipeline.provenance: pasted the last {len(last)} lines of `{command}` ({wall:.0f} s) into {doc} "
          f"block {block}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m pipeline.provenance",
                                usage="%(prog)s --docs FILE --block NAME [--tail N] -- CMD [ARGS...]",
                                description="Run CMD and paste its last lines, its wall time and the provenance "
                                            "line into block NAME of the Markdown file FILE.")
    p.add_argument("--docs", required=True, metavar="FILE", help="the Markdown page holding the block")
    p.add_argument("--block", required=True, metavar="NAME", help="<!-- report:NAME --> ... <!-- /report -->")
    p.add_argument("--tail", type=int, default=15, metavar="N", help="stdout lines to paste (default 15)")
    i = argv.index("--") if "--" in argv else len(argv)
    args, cmd = p.parse_args(argv[:i]), argv[i + 1:]
    if not cmd:
        p.error("no command: put it after '--', e.g. -- make demo")
    if args.tail < 1:
        p.error(f"--tail {args.tail}: give at least 1 line")
    return run_and_paste(args.docs, args.block, cmd, args.tail)


if __name__ == "__main__":
    sys.exit(main())
