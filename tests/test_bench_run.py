"""bench/run.py --docs: what a bench prints is pasted, with its provenance, into its block."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_bench_output_is_pasted_into_its_block(tmp_path, monkeypatch, capsys):
    run = _runner()
    (tmp_path / "bench_fake.py").write_text("print('| x | 1.5 s |')\n")
    page = tmp_path / "perf.md"
    page.write_text("intro\n<!-- report:bench-fake -->\nold\n<!-- /report -->\nafter\n")
    monkeypatch.setattr(run, "here", tmp_path)
    assert run.main(["fake", "--docs", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("after\n")
    block = text.split("<!-- report:bench-fake -->")[1].split("<!-- /report -->")[0]
    assert "```text\n| x | 1.5 s |\n```" in block
    assert "Provenance: `python bench/run.py fake` · commit " in block
    assert "| x | 1.5 s |" in capsys.readouterr().out  # and still printed


def test_bad_arguments_are_one_line(tmp_path, monkeypatch, capsys):
    run = _runner()
    monkeypatch.setattr(run, "here", tmp_path)
    (tmp_path / "bench_fake.py").write_text("print(1)\n")
    assert run.main(["nosuch"]) == 2
    assert "no bench named nosuch" in capsys.readouterr().err
    assert run.main(["fake", "--docs", str(tmp_path / "missing.md")]) == 2
    assert "no such Markdown file" in capsys.readouterr().err


def test_bench_args_reach_the_bench_and_its_provenance(tmp_path, monkeypatch):
    run = _runner()
    (tmp_path / "bench_fake.py").write_text("import sys\nprint(sys.argv[1:])\n")
    page = tmp_path / "perf.md"
    page.write_text("<!-- report:bench-fake -->\n<!-- /report -->\n")
    monkeypatch.setattr(run, "here", tmp_path)
    assert run.main(["fake", "--docs", str(page), "--bench-args", "--batches 0"]) == 0
    text = page.read_text()
    assert "['--batches', '0']" in text and "`python bench/run.py fake --bench-args '--batches 0'`" in text
