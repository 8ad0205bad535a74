"""Where a pasted table or figure came from: the command, the commit, the machine, the date.

``imer report --docs FILE --block NAME`` and ``imer compare --docs FILE --block NAME`` paste their
output between ``<!-- report:NAME -->`` and ``<!-- /report -->`` of any Markdown file (the README or
a page under docs/) and end the block with one provenance line written here, e.g.

    Provenance: `imer report --dataset demo` · commit 74013ea · AMD EPYC, family 25 (2 threads, AVX512) · 2026-12-07

so no figure in the documentation is typed by hand or loses where it came from.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
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
