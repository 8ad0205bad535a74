"""The documentation site builds with --strict (no broken link, anchor or missing page), its CLI
reference is generated from the parsers, and report blocks are pasted with their provenance."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NEEDS_MKDOCS = "mkdocs, mkdocs-material and mkdocstrings are not installed: `make setup` installs them " \
               "(pip install -e '.[docs]')"


def _have_mkdocs() -> bool:
    return all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"))


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # no -q: quiet mode drops the warnings that --strict counts, and a broken link would pass
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools/docs/cli_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not _have_mkdocs(), reason=NEEDS_MKDOCS)
def test_site_builds_strict(tmp_path):
    r = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    cli = (tmp_path / "site/cli/index.html").read_text()
    for name in ("imer-train", "imer-report", "imer-store-verify", "imer-compare"):
        assert f'id="{name}"' in cli, name  # generated sections, one per (sub)command
    assert "<!-- cli-reference -->" not in cli


@pytest.mark.skipif(not _have_mkdocs(), reason=NEEDS_MKDOCS)
def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The build is a real check: one link to a page that does not exist aborts it."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    cfg["docs_dir"] = str(docs)
    cfg["hooks"] = [str(ROOT / h) for h in cfg["hooks"]]
    for plugin in cfg["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))
    page = docs / "store.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    r = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "no-such-page.md" in r.stdout + r.stderr


def _walk(p: argparse.ArgumentParser, prog: str):
    yield prog, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _walk(sp, f"{prog} {name}")


def test_cli_reference_lists_every_command_and_option():
    from pipeline.cli import build_parser

    text = _cli_reference().render()
    for prog, p in _walk(build_parser(), "imer"):
        if prog != "imer":
            assert re.search(rf"^#+ {re.escape(prog)}$", text, re.M), f"no section for {prog}"
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = ", ".join(a.option_strings) or a.dest
            assert f"| `{name}" in text, f"{prog}: {name} missing from the CLI reference"


def test_cli_reference_escapes_markdown():
    ref = _cli_reference()
    assert ref._text("a <!-- b --> | *c* `d`") == r"a &lt;!-- b --&gt; \| \*c\* \`d\`"


PAGE = "intro\n<!-- report:demo -->\nold table\n<!-- /report -->\nafter\n"


def _fake_report(monkeypatch):
    import train.report

    monkeypatch.setattr(train.report, "report", lambda *a, **k: "| Model | UA |\n|---|---|\n| mmin | 0.7 |\n")
    monkeypatch.setattr(train.report, "latest_runs", lambda *a, **k: {"mmin": Path("x")})


@pytest.mark.parametrize("flag", ["--docs", "--readme"])
def test_report_docs_pastes_the_block_with_its_provenance(tmp_path, monkeypatch, capsys, flag):
    from pipeline.cli import main
    from pipeline.provenance import commit, cpu_model

    _fake_report(monkeypatch)
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert main(["report", "--dataset", "demo", "--methods", "mmin", flag, str(page), "--block", "demo"]) == 0
    doc = page.read_text()
    assert doc.startswith("intro\n<!-- report:demo -->\n| Model | UA |") and doc.endswith("<!-- /report -->\nafter\n")
    assert "old table" not in doc
    line = doc.split("\n\n")[-1].splitlines()[0]
    assert line.startswith("Provenance: `imer report --dataset demo --methods mmin` · commit ")
    assert commit() in line and cpu_model() in line and f"({os.cpu_count()} threads" in line
    assert line.endswith(time.strftime("%Y-%m-%d"))


def test_report_docs_refuses_a_missing_page_or_block_in_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    _fake_report(monkeypatch)
    assert main(["report", "--dataset", "demo", "--docs", str(tmp_path / "nope.md")]) == 2
    err = capsys.readouterr().err
    assert "nope.md: no such Markdown file" in err and len(err.strip().splitlines()) == 1
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert main(["report", "--dataset", "demo", "--docs", str(page), "--block", "other"]) == 2
    assert "no '<!-- report:other -->'" in capsys.readouterr().err and page.read_text() == PAGE


def test_compare_docs_pastes_report_and_copies_figures(tmp_path, monkeypatch, capsys):
    import json

    import train.compare
    from pipeline.cli import main

    out = tmp_path / "results/demo/compare/abc"
    out.mkdir(parents=True)
    (out / "report.md").write_text("**Comparison on demo (abc)**\n\n| Method | Average |\n")
    (out / "compare.json").write_text(json.dumps({"wall_s": 7400.4}))
    (out / "curves.png").write_bytes(b"png")
    monkeypatch.setattr(train.compare, "compare", lambda *a, **k: out)
    page, figs = tmp_path / "comparison.md", tmp_path / "figs"
    figs.mkdir()
    page.write_text("x\n<!-- report:compare-demo -->\n<!-- /report -->\n")
    assert main(["compare", "--dataset", "demo", "--seeds", "0", "--docs", str(page), "--figures", str(figs)]) == 0
    doc = page.read_text()
    assert "| Method | Average |" in doc and "Provenance: `imer compare --dataset demo --seeds 0 " in doc
    assert doc.rstrip().splitlines()[-2].endswith(" · 7400 s")
    assert (figs / "compare-demo-curves.png").read_bytes() == b"png"
    # a page or figure folder that is not there is refused before anything is trained
    monkeypatch.setattr(train.compare, "compare", lambda *a, **k: pytest.fail("compare ran"))
    assert main(["compare", "--dataset", "demo", "--docs", str(tmp_path / "nope.md")]) == 2
    assert "--docs " in capsys.readouterr().err
    assert main(["compare", "--dataset", "demo", "--docs", str(page), "--figures", str(tmp_path / "nodir")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_report_blocks_are_well_formed():
    """Every '<!-- report:NAME -->' in the README and the docs closes before the next one opens,
    and no name is used twice in one file (the tool would paste into the first only)."""
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        marks = re.findall(r"<!-- (report:[\w.-]+|/report) -->", f.read_text())
        opens = [m for m in marks[0::2]]
        assert all(m.startswith("report:") for m in marks[0::2]), f
        assert all(m == "/report" for m in marks[1::2]) and len(marks) % 2 == 0, f
        assert len(set(opens)) == len(opens), f"{f}: a block name is used twice"


# Blocks pasted before the provenance line existed (all but EMMR's from code before issue 38's
# fixes); each is regenerated by its command once the 10-seed comparison is (docs/changelog.md).
# The list only shrinks: a new block without its provenance line fails below.
AWAITING_REGENERATION = {
    ("README.md", "compare-demo"), ("docs/comparison.md", "compare-demo"),
    ("docs/methods/cm-arr.md", "cm-arr-demo"), ("docs/methods/if-mmin.md", "if-mmin-ablation"),
    ("docs/methods/imder.md", "imder-demo-cls"), ("docs/methods/imder.md", "imder-demo-reg"),
    ("docs/methods/imder.md", "imder-medium-reg"), ("docs/methods/imder.md", "imder-medium-cls"),
    ("docs/methods/emmr.md", "emmr-compare"), ("docs/methods/emmr.md", "emmr-check"),
    ("docs/methods/emmr.md", "emmr-ablation"),
}
# filled by the commands named beside them at the end of a session (a fresh clone's make demo and
# .ci/run; IMDer's sampler bench after the demo IMDer runs): empty until then
FILLED_LATER = {("docs/performance.md", "e2e-demo"), ("docs/performance.md", "e2e-ci"),
                ("docs/methods/imder.md", "bench-imder")}


def test_every_pasted_block_ends_with_its_provenance():
    """Each block holds what a tool pasted and, last, the provenance line that tool writes
    (pipeline.provenance: command, commit, machine, date): no figure in the docs without them."""
    missing, seen = [], set()
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        rel = f.relative_to(ROOT).as_posix()
        for name, body in re.findall(r"^<!-- report:([\w.-]+) -->\n(.*?)^<!-- /report -->", f.read_text(), re.M | re.S):
            seen.add((rel, name))
            if (rel, name) in AWAITING_REGENERATION or ((rel, name) in FILLED_LATER and not body.strip()):
                continue
            last = body.strip().splitlines()[-1] if body.strip() else ""
            if not re.fullmatch(r"Provenance: `[^`]+` · commit \S+.* · .+ · \d{4}-\d{2}-\d{2}( · \d+ s)?", last):
                missing.append(f"{rel} block {name}")
    assert not missing, f"blocks without a provenance line last: {missing}"
    stale = (AWAITING_REGENERATION | FILLED_LATER) - seen
    assert not stale, f"listed here but no such block any more (drop them from the list): {sorted(stale)}"
