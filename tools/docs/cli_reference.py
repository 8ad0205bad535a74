"""The CLI reference page, generated from imer's argparse parsers when the site is built.

An mkdocs hook (mkdocs.yml ``hooks:``): ``on_page_markdown`` replaces the marker line
``<!-- cli-reference -->`` of docs/cli.md with one section per subcommand (and per sub-action,
as in ``imer store verify``), so the page cannot disagree with ``imer COMMAND --help``.
"""

from __future__ import annotations

import argparse
import html
import re

MARKER = "<!-- cli-reference -->"


def _text(s: str) -> str:
    """Help text safe inside Markdown (and a table cell): no HTML, emphasis or cell breaks."""
    s = html.escape(" ".join(s.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", s)


def _description(doc: str) -> list[str]:
    """A command's docstring: prose lines as paragraphs, indented lines (examples) as code."""
    out, code = [], []
    for line in doc.strip().splitlines() + [""]:
        if line.startswith(" ") and line.strip():
            code.append(line[2:] if line.startswith("  ") else line.lstrip())
            continue
        if code:
            out += ["```text", *code, "```", ""]
            code = []
        out.append(_text(line) if line.strip() else "")
    return out


def _default(a: argparse.Action) -> str:
    if a.default in (None, argparse.SUPPRESS) or isinstance(a, (argparse._StoreTrueAction,
                                                                  argparse._StoreFalseAction)):
        return ""
    if a.default == [] and isinstance(a, argparse._AppendAction):
        return ""
    return f"`{a.default}`"


def _option_rows(p: argparse.ArgumentParser) -> list[str]:
    fmt = p._get_formatter()
    rows = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(a.option_strings) or a.dest
        if a.option_strings and a.nargs != 0:
            name += " " + (a.metavar or a.dest.upper())
        helptext = _text(fmt._expand_help(a)) if a.help else ""
        if a.choices:
            helptext += (" " if helptext else "") + "One of " + ", ".join(f"`{c}`" for c in a.choices) + "."
        if a.required:
            helptext = "**Required.** " + helptext
        rows.append(f"| `{name}` | {helptext} | {_default(a)} |")
    return (["| option | what it does | default |", "|---|---|---|", *rows]) if rows else []


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _section(prog: str, p: argparse.ArgumentParser, level: int) -> list[str]:
    out = [f"{'#' * level} {prog}", ""]
    if p.description:
        out += _description(p.description) + [""]
    out += ["```text", p.format_usage().strip(), "```", ""]
    rows = _option_rows(p)
    out += rows + ([""] if rows else [])
    for name, sp in _subparsers(p).items():
        out += _section(f"{prog} {name}", sp, level + 1)
    return out


def render() -> str:
    """Markdown for every subcommand of ``imer``, in the order ``imer --help`` lists them."""
    from pipeline.cli import build_parser

    top = build_parser()
    out = ["Every subcommand accepts `-h` / `--help`, which prints the same text. "
           "`imer --version` prints the version.", ""]
    subs = _subparsers(top)
    out += ["| command | what it does |", "|---|---|"]
    for a in top._actions:
        if isinstance(a, argparse._SubParsersAction):
            out += [f"| [`imer {c.dest}`](#imer-{c.dest}) | {_text(c.help or '')} |" for c in a._choices_actions]
    out.append("")
    for name, sp in subs.items():
        out += _section(f"imer {name}", sp, 2)
    return "\n".join(out).rstrip() + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
