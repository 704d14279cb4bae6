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
@click.option("--score-only", is_flag=True, help="Train nothing: tabulate the runs finished so far.")
def study(plan, out, teacher, score_only) -> None:
    """Train every variant × seed of PLAN (a YAML file) two at a time, score them, write table.md and curves.png."""
    from loopfree.demo.demo import format_table
    from loopfree.demo.study import load_plan, run_study

    study_plan = load_plan(plan)
    rows = run_study(study_plan, out, teacher, train=not score_only)
    click.echo(format_table(rows, study_plan.num_prompts * study_plan.images_per_prompt))
    click.echo(f"wrote {Path(out) / 'table.md'}, {Path(out) / 'study.json'} and {Path(out) / 'curves.png'}")
