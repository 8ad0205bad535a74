"""mkdocs hook: the nav entry ``Methods: methods/`` becomes every page under docs/methods/.

One page per method is added with the method; the nav then needs no edit. Pages are listed in
the order of ORDER (the methods as the README's table lists them), then alphabetically, with an
``index.md`` first when there is one. Titles come from each page's first heading.
"""

from __future__ import annotations

from pathlib import Path

ORDER = ["baselines", "baseline", "mmin", "if-mmin", "emmr", "cm-arr", "imder", "gcnet", "momke"]


def _rank(p: Path) -> tuple:
    if p.stem == "index":
        return (0, 0, "")
    return (1, ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem)


def on_config(config):
    docs = Path(config["docs_dir"])
    for i, item in enumerate(config["nav"] or []):
        if isinstance(item, dict) and item.get("Methods") == "methods/":
            pages = sorted((docs / "methods").glob("*.md"), key=_rank)
            config["nav"][i] = {"Methods": [p.relative_to(docs).as_posix() for p in pages]}
    return config
