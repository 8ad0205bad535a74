"""`imer` command line: subcommands are discovered from ``pipeline/commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    p = build_parser(first if first in _commands() else None)
    args = p.parse_args(argv)
    if not getattr(args, "_main", None):
        p.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:
        print("imer: interrupted; finished batches are kept, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
