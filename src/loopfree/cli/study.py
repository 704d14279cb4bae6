"""``loopfree study``: run (or continue) a plan of toy-world distillations and tabulate it.

    loopfree study studies/probe.yaml --out .studies/probe
    loopfree study studies/probe.yaml --lock-only          # resolve the plan into studies/probe.lock.yaml, run nothing
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("plan", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="Study folder (rerun: finished runs are kept, stopped ones resume).")
@click.option("--teacher", default=None, type=click.Path(), help="Teacher pipeline folder (default: the bundled toy teacher).")
@click.option("--score-only", is_flag=True, help="Train nothing: tabulate the runs finished so far.")
@click.option("--lock-only", is_flag=True, help="Resolve the plan's variants into its lock file (PLAN.lock.yaml) and stop.")
def study(plan, out, teacher, score_only, lock_only) -> None:
    """Train every variant × seed of PLAN (a YAML file) two at a time, score them, write table.md and curves.png.
    Each variant's full settings are resolved once into PLAN.lock.yaml beside it and read from there afterwards."""
    from loopfree.demo.demo import format_table
    from loopfree.demo.lock import lock_path, locked
    from loopfree.demo.study import load_plan, run_study
    from loopfree.utils.errors import LoopfreeError

    study_plan = load_plan(plan)
    if lock_only:
        locked(study_plan, lock_path(plan))
        click.echo(f"wrote {lock_path(plan)}")
        return
    if out is None:
        raise LoopfreeError("--out is required (the study folder), unless --lock-only")
    rows = run_study(study_plan, lock_path(plan), out, teacher, train=not score_only)
    click.echo(format_table(rows, study_plan.num_prompts * study_plan.images_per_prompt))
    click.echo(f"wrote {Path(out) / 'table.md'}, {Path(out) / 'study.json'} and {Path(out) / 'curves.png'}")
