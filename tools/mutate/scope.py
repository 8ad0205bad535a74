"""Which of cosmic-ray's mutants ``make mutate`` runs, and which tests each one runs.

Four filters, each recorded as a skip reason in the session (so nothing is dropped silently):
the operator subset of targets.yaml, the functions a target is scoped to, mutants inside an
f-string (they change what a message says, not what the code computes) and, in a module with
``from __future__ import annotations``, mutants inside a type annotation (a string never run). The test selection
reads the baseline coverage map: a mutant inside a function body runs only the tests that
executed its statement; one in code run at import (module level, a ``def`` line with its
defaults and decorators) or in a statement no mapped test executed runs all the file's tests.
"""

from __future__ import annotations

import ast
import re

_REPLACE = re.compile(r"core/Replace(Binary|Comparison)Operator_(\w+?)_(\w+)$")


class SourceMap:
    """Statements, functions and f-strings of one Python file, by position (line, character
    column, as cosmic-ray's parso positions are; ``ast`` columns are UTF-8 byte offsets)."""

    def __init__(self, text: str):
        self.lines = text.split("\n")
        self.stmts: list[tuple[int, int, int]] = []       # (first, header last, last) line
        self.funcs: list[tuple[int, int, int, str]] = []  # (first incl. decorators, body first, last, qualname)
        self.fstrings: list[tuple[tuple[int, int], tuple[int, int]]] = []
        self.annotations: list[tuple[tuple[int, int], tuple[int, int]]] = []
        tree = ast.parse(text)
        self._visit(tree.body, "")
        lazy = any(isinstance(s, ast.ImportFrom) and s.module == "__future__" and
                   any(a.name == "annotations" for a in s.names) for s in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                self.fstrings.append(self._span(node))
            if lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                args = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
                self.annotations += [self._span(x.annotation) for x in args if x.annotation]
                self.annotations += [self._span(node.returns)] if node.returns else []
            if lazy and isinstance(node, ast.AnnAssign):
                self.annotations.append(self._span(node.annotation))

    def _span(self, node):
        return ((node.lineno, self._char(node.lineno, node.col_offset)),
                (node.end_lineno, self._char(node.end_lineno, node.end_col_offset)))

    def _char(self, line: int, byte_col: int) -> int:
        return len(self.lines[line - 1].encode()[:byte_col].decode(errors="ignore"))

    def _visit(self, body, prefix: str) -> None:
        for s in body:
            first = min([s.lineno] + [d.lineno for d in getattr(s, "decorator_list", [])])
            inner = [getattr(s, f, None) for f in ("body", "orelse", "finalbody")]
            inner = [b for b in inner if isinstance(b, list) and b and isinstance(b[0], ast.stmt)]
            inner += [h.body for h in getattr(s, "handlers", [])]
            inner += [c.body for c in getattr(s, "cases", [])]
            header = (s.body[0].lineno - 1) if inner and isinstance(getattr(s, "body", None), list) else s.end_lineno
            self.stmts.append((first, max(header, s.lineno), s.end_lineno))
            name = prefix
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{s.name}"
                if not isinstance(s, ast.ClassDef):
                    self.funcs.append((first, s.body[0].lineno, s.end_lineno, name))
                name += "."
            for b in inner:
                self._visit(b, name)

    def function(self, line: int) -> str | None:
        """Qualified name (``Class.method``) of the innermost function around ``line``, its
        ``def`` line, defaults and decorators included; None at module or class level."""
        hits = [f for f in self.funcs if f[0] <= line <= f[2]]
        return max(hits)[3] if hits else None

    def in_body(self, line: int) -> bool:
        return any(b <= line <= last for _, b, last, _ in self.funcs)

    def statement_lines(self, line: int) -> range:
        """Lines whose execution means the statement at ``line`` ran: a simple statement's lines,
        or a compound statement's header (``if`` test, ``for`` iterable); the whole statement
        where ``line`` is a clause line (``else:``, ``except ...:``)."""
        hits = [s for s in self.stmts if s[0] <= line <= s[2]]
        if not hits:
            return range(line, line + 1)
        first, header, last = max(hits, key=lambda s: (s[0], -s[2]))
        return range(first, (header if line <= header else last) + 1)

    def in_fstring(self, pos) -> bool:
        pos = tuple(pos)
        return any(a <= pos < b for a, b in self.fstrings)

    def in_annotation(self, pos) -> bool:
        pos = tuple(pos)
        return any(a <= pos < b for a, b in self.annotations)


def operator_kept(name: str, table: dict) -> bool:
    """cosmic-ray's binary and comparison replacements limited to ``table`` (targets.yaml
    ``operators``); every other operator is kept."""
    m = _REPLACE.match(name)
    if not m:
        return True
    family, src, dst = m.groups()
    return dst in (table.get(family.lower()) or {}).get(src, [])


def skip_reason(mutation, smap: SourceMap, functions: dict | None, table: dict) -> str | None:
    """Why a mutant is not run (None: it is run)."""
    if not operator_kept(mutation.operator_name, table):
        return "operator outside the kept subset"
    line = mutation.start_pos[0]
    if functions:
        fn = smap.function(line)
        owner = next((f for f in functions if fn and (fn == f or fn.startswith(f + "."))), None)
        if owner is None:
            return "outside the scoped functions"
        if functions[owner] and not re.search(functions[owner], smap.lines[line - 1]):
            return "outside the scoped lines"
    if smap.in_fstring(mutation.start_pos):
        return "inside an f-string (message text)"
    if smap.in_annotation(mutation.start_pos):
        return "inside a type annotation (never evaluated)"
    return None


def select_tests(mutation, smap: SourceMap, cov: dict, tests: list[str]) -> list[str]:
    """Node ids (or test files) to run for ``mutation``."""
    first, last = mutation.start_pos[0], mutation.end_pos[0]
    lines = set()
    for line in range(first, last + 1):
        lines.update(smap.statement_lines(line))
    ids = set()
    for line in lines:
        ids.update(cov["lines"].get(str(line), ()))
    if not ids or not all(smap.in_body(line) for line in range(first, last + 1)):
        return list(tests)
    # in the baseline's order (the suite's): a test that leans on an earlier one's state still
    # finds it, and a mutant is not "killed" by an order the unmutated code never ran in
    order = {nid: i for i, nid in enumerate(cov["durations"])}
    return sorted(ids, key=lambda n: (order.get(n, len(order)), n))
