"""``loopfree study``: run (or continue) a plan of toy-world distillations and tabulate it.

    loopfree study studies/probe.yaml --out .studies/probe
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("plan", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Study folder (rerun: finished runs are kept, stopped ones resume).")
@click.option("--teacher", default=None, type=click.Path(), help="Teacher pipeline folder (default: the bundled toy teacher).")
def study(plan, out, teacher) -> None:
    """Train every variant × seed of PLAN (a YAML file) two at a time, score them, write table.md and curves.png."""
    from loopfree.demo.demo import format_table
    from loopfree.demo.study import load_plan, run_study

    rows = run_study(load_plan(plan), out, teacher)
    click.echo(format_table(rows))
    click.echo(f"wrote {Path(out) / 'table.md'}, {Path(out) / 'study.json'} and {Path(out) / 'curves.png'}")
