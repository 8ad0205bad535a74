"""`imer` command line: subcommands are discovered from ``pipeline/commands``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import re
import sys

from pipeline import __version__


def _commands() -> dict[str, str]:
    import pipeline.commands as pkg

    return {m.name.replace("_", "-"): f"pipeline.commands.{m.name}"
            for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand's (importing one command module
    keeps a no-op `imer features` rerun fast)."""
    p = argparse.ArgumentParser(prog="imer", description="incomplete multimodal emotion recognition toolkit")
    p.add_argument("--version", action="version", version=f"imer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in sorted(_commands().items()):
        if only is not None and name != only:
            continue
        mod = importlib.import_module(modname)
        doc = (mod.__doc__ or "").strip().splitlines()
        sp = sub.add_parser(name, help=doc[0] if doc else None, description=(mod.__doc__ or "").strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_main=mod.main)
    return p


def _check_env() -> str | None:
    """Why IMER_CACHE or IMER_RESULTS cannot be used (they must name directories), or None."""
    from pathlib import Path

    from pipeline.cache import check_dir_env

    for var in ("IMER_CACHE", "IMER_RESULTS"):
        if os.environ.get(var):
            try:
                check_dir_env(var, Path(os.environ[var]).expanduser(), ValueError)
            except ValueError as e:
                return str(e)
    return None


def _target(name) -> str:
    """The file a failed write was for: an atomic write's temp file (``.NAME.<pid>-<tid>.tmp``,
    pipeline.fsutil) stands for NAME."""
    m = re.fullmatch(r"(.*/)?\.(.+)\.\d+-\d+\.tmp", str(name))
    return f"{m.group(1) or ''}{m.group(2)}" if m else str(name)


def _under_cache(name) -> str | None:
    """The feature cache root when ``name`` lies in it, else None."""
    from pathlib import Path

    from pipeline.cache import CacheError, cache_root

    if not name:
        return None
    try:
        root = cache_root().resolve()
        Path(name).resolve().relative_to(root)
    except (CacheError, OSError, ValueError):
        return None
    return str(root)


def write_error(e: OSError) -> tuple[str, int] | None:
    """(one line, exit status) for an OS error the user can act on (a full disk, the file size
    limit, a read-only or forbidden place), naming the file and what to do; None for others."""
    where = f" writing {_target(e.filename)}" if e.filename else ""
    rerun = "then rerun the same command: finished work is kept and the run resumes"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"{what}{where}: free some space there, or point IMER_CACHE (feature stores) / IMER_RESULTS "
                f"(runs) at a disk with room; {rerun}"), 1
    if e.errno == errno.EFBIG:
        return (f"file too large{where}: it passes this process's file size limit (ulimit -f); raise the limit "
                f"(ulimit -f unlimited); {rerun}"), 1
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        at = f" at {_target(e.filename)}" if e.filename else ""
        cache = _under_cache(e.filename)
        if cache:
            return (f"the feature cache {cache} is read-only ({why}{at}); commands that only read it work, "
                    f"this one must write: point IMER_CACHE at a writable directory "
                    f"(IMER_CACHE=/path/to/cache imer ...)"), 2
        if e.filename:
            return (f"{why}: {_target(e.filename)}; check its permissions, or choose another place "
                    f"(IMER_RESULTS or --results for run outputs, IMER_CACHE for feature stores)"), 2
    return None


def main(argv: list[str] | None = None) -> int:
    from pipeline.cache import CacheError
    from pipeline.cluster import ClusterError

    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    try:
        p = build_parser(first if first in _commands() else None)
        try:
            args = p.parse_args(argv)
        except SystemExit:  # --help, --version or a usage error: their text may meet a closed pipe too
            sys.stdout.flush()
            raise
        if not getattr(args, "_main", None):
            p.print_help()
            return 2
        bad = _check_env()
        if bad:
            print(f"imer: {bad}", file=sys.stderr)
            return 2
        status = int(args._main(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below
        return status
    except KeyboardInterrupt:
        print("imer: interrupted; finished batches are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except (CacheError, ClusterError) as e:
        print(f"imer: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`imer store ls | head -1`): stop quietly as Unix tools do; stdout
        # goes to /dev/null so the interpreter's final flush does not complain again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (captured in tests)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except OSError as e:  # a full disk, `ulimit -f`, a read-only cache: whatever command was writing
        said = write_error(e)
        if said is None:
            raise
        print(f"imer: {said[0]}", file=sys.stderr)
        return said[1]


if __name__ == "__main__":
    sys.exit(main())
