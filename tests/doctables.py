"""The documented tables and the data files behind them.

Every Markdown table in README.md and docs/ carries a marker on the line before it:

    <!-- data: demo-metrics.json#rows -->         the file (relative to the Markdown file) and optionally a key in it
    <!-- not data: options -->                   a table of settings or names, not of results
    <!-- no data yet: measured before … -->      results whose data file was never kept (a pinned, shrinking list)

A data table's body rows must each be one record of its file: every number in the row (outside its first, label
column) equals, at the digits printed, a number of one record (a JSON object with a ``name``, or a row of a
Markdown table file).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*(data|not data|no data yet):\s*(.*?)\s*-->")
NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w.])|(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


@dataclass
class Table:
    file: Path
    line: int  # 1-based line of the header
    kind: str | None  # the marker's kind, None without one
    spec: str
    header: list[str]
    rows: list[list[str]]

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(path: Path) -> list[Table]:
    """Every Markdown table of ``path`` outside code blocks, with its marker."""
    lines, found, fenced, i = path.read_text(encoding="utf-8").splitlines(), [], False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*:?-{3}", lines[i + 1]):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.search(before)
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            found.append(Table(path, i + 1, marker and marker.group(1), marker.group(2) if marker else "",
                               cells(lines[i]), [cells(l) for l in lines[i + 2 : end]]))
            i = end
            continue
        i += 1
    return found


def documented() -> list[Table]:
    return [t for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] for t in tables(path)]


def numbers(text: str) -> list[tuple[float, int]]:
    """The numbers in ``text`` with their printed decimals."""
    found = []
    for token in NUMBER.findall(text.replace("−", "-")):
        plain = token.replace(",", "")
        decimals = len(plain.split(".")[1].split("e")[0]) if "." in plain else 0
        found.append((float(plain), decimals))
    return found


def _leaves(value) -> list[float]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return []


def _records(value) -> list[list[float]]:
    """Every object with a ``name`` under ``value``, as its numbers."""
    if isinstance(value, dict):
        own = [_leaves(value)] if "name" in value else []
        return own + [r for v in value.values() for r in _records(v)]
    if isinstance(value, list):
        return [r for v in value for r in _records(v)]
    return []


def records(table: Table) -> list[list[float]]:
    """The records of the table's data files (``a.json#key`` selects a key; several files separated by spaces)."""
    found = []
    for spec in table.spec.split():
        name, _, key = spec.partition("#")
        path = table.file.parent / name
        if not path.is_file():
            raise AssertionError(f"{table.where()}: its data file {name} does not exist")
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            for part in filter(None, key.split("/")):
                data = data[part]
            found += _records(data)
        else:  # a Markdown table file: each body row a record
            for t in tables(path):
                found += [[v for c in row[1:] for v, _ in numbers(c)] for row in t.rows]
    return found


def matches(value: float, decimals: int, candidates: list[float]) -> bool:
    tolerance = 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value))
    return any(abs(c - value) <= tolerance for c in candidates)


def check(table: Table) -> None:
    """Raise AssertionError naming the first row of ``table`` that no record of its data files accounts for."""
    found = records(table)
    if not found:
        raise AssertionError(f"{table.where()}: no records in {table.spec}")
    for row in table.rows:
        printed = [n for c in row[1:] for n in numbers(c)]
        if not any(all(matches(v, d, record) for v, d in printed) for record in found):
            raise AssertionError(f"{table.where()}: row {row[0]!r} ({', '.join(row[1:])}) is not in {table.spec}")
