"""Every table in README.md and docs/ says where its numbers come from, and each one with a data file agrees with it
(tests/doctables.py), so a documented number can't drift from its source or be edited by hand."""

import dataclasses

import pytest

from doctables import ROOT, check, documented

#: results whose data files were never kept: measured before data files were committed beside the docs. This list may
#: only shrink (a re-measured table gets its data file and a `data:` marker).
WITHOUT_DATA = {
    ("README.md", "GiB per device (batch 1 / 8)"),
    ("docs/analyses.md", "N"), ("docs/analyses.md", ""), ("docs/analyses.md", "alignment / fd"),
    ("docs/benchmark.md", ""), ("docs/benchmark.md", "row (SD2.1 shapes, 512², fp32)"), ("docs/benchmark.md", "arch"),
    ("docs/benchmark.md", "part"), ("docs/benchmark.md", "arch, resolution"),
    ("docs/serve.md", "--max-batch"),
    ("docs/toy-world.md", "guidance"),
}


def test_every_table_says_where_its_numbers_come_from():
    unmarked = [t.where() for t in documented() if t.kind is None]
    assert not unmarked, f"tables without a <!-- data: … --> / <!-- not data: … --> marker: {unmarked}"


@pytest.mark.parametrize("table", [t for t in documented() if t.kind == "data"], ids=lambda t: t.where())
def test_each_documented_table_agrees_with_its_data_file(table):
    check(table)


def test_the_tables_without_data_are_only_the_old_ones():
    legacy = {(str(t.file.relative_to(ROOT)), t.header[0]) for t in documented() if t.kind == "no data yet"}
    assert legacy <= WITHOUT_DATA, f"new tables without data: {legacy - WITHOUT_DATA}"


def test_a_number_edited_by_hand_is_caught():
    tables = [t for t in documented() if t.kind == "data"]
    assert tables
    for table in tables:
        row = next(r for r in table.rows if any(ch.isdigit() for c in r[1:] for ch in c))
        column = next(i for i, c in enumerate(row) if i and any(ch.isdigit() for ch in c))
        last = max(i for i, ch in enumerate(row[column]) if ch.isdigit())  # the last printed digit, moved by 5
        edited = row[column][:last] + str((int(row[column][last]) + 5) % 10) + row[column][last + 1:]
        rows = [r if r is not row else [*r[:column], edited, *r[column + 1:]] for r in table.rows]
        with pytest.raises(AssertionError, match="is not in"):
            check(dataclasses.replace(table, rows=rows))
