"""``loopfree demo``: distil the bundled toy teacher, then compare teacher and students on held-out prompts.

    loopfree demo --out loopfree-demo
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from loopfree.cli import options
from loopfree.cli.config_options import config_options
from loopfree.training.config import DistillConfig
from loopfree.toy.settings import DEMO_BUDGET, DEMO_DISTILL_KEYS, STUDENTS, TEACHER_ARCHS, TOY_DISTILL, DemoConfig

_DEMO = DemoConfig()


@click.command()
@click.option("--out", default=_DEMO.out, show_default=True, type=click.Path(), help="Output folder (rerun: finished students are kept).")
@options.overwrite()
@click.option("--max-steps", type=click.IntRange(1, None), default=_DEMO.max_steps, show_default=True, help="Distillation steps per student.")
@click.option("--students", default=",".join(_DEMO.students), show_default=True,
              help=f"Comma-separated student kinds, in table order: {', '.join(STUDENTS)}.")
@click.option("--train-seeds", type=click.IntRange(1, None), default=_DEMO.train_seeds, show_default=True,
              help="Train each student this many times; the table gives mean ± spread.")
@click.option("--num-prompts", type=int, default=_DEMO.num_prompts, show_default=True, help="Held-out evaluation prompts.")
@options.images_per_prompt(_DEMO.images_per_prompt)
@click.option("--teacher", default=None, type=click.Path(), help="Teacher pipeline folder (default: the bundled toy teacher of --teacher-arch).")
@click.option("--teacher-arch", type=click.Choice(list(TEACHER_ARCHS)), default=_DEMO.teacher_arch, show_default=True,
              help="The bundled teacher: unet (Stable Diffusion-shaped, DDIM) or mmdit (SD3-shaped, rectified flow; its "
                   "students share --shared-blocks of its 8 blocks, default half).")
@click.option("--teacher-steps", type=click.IntRange(1, 1000), default=_DEMO.teacher_steps, show_default=True, help="Steps of the reference teacher rows (DDIM loop and encoder propagation; an MMDiT's Euler).")
@options.threads()
@click.option("--eval-every", type=click.IntRange(0, None), default=0, show_default=True,
              help="Learning curves: score every student every N steps on the evaluation prompts (curves.png, curves.json).")
@config_options(DistillConfig, only=DEMO_DISTILL_KEYS, defaults={**TOY_DISTILL, **DEMO_BUDGET})
def demo(out, overwrite, max_steps, students, train_seeds, num_prompts, images_per_prompt, teacher, teacher_arch, teacher_steps,
         threads, eval_every, **distill) -> None:
    """Distil a bundled toy teacher and compare teacher and students: grid.png, metrics.json, a table.

    Every distillation setting below overrides the toy recipe (TOY_DISTILL, with the demo's short-budget lr and
    teacher-pair steps: DEMO_BUDGET) for all students; the rest are the paper's. Each set of settings needs its own
    --out.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from loopfree.utils.devices import cpu_threads
    from loopfree.demo.demo import format_table, run_demo

    cfg = DemoConfig(out=out, max_steps=max_steps, students=tuple(s.strip() for s in students.split(",") if s.strip()),
                     train_seeds=train_seeds, num_prompts=num_prompts, images_per_prompt=images_per_prompt, teacher=teacher,
                     teacher_arch=teacher_arch, teacher_steps=teacher_steps, eval_every=eval_every,
                     distill={k: v for k, v in distill.items() if v is not None})
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # loading and saving bars would bury the demo's own
    transformers_logging.disable_progress_bar()
    started = time.monotonic()
    try:
        with cpu_threads(threads):
            rows = run_demo(cfg, overwrite=overwrite)
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
    click.echo(format_table(rows, cfg.num_prompts * cfg.images_per_prompt))
    click.echo(f"wrote {Path(out) / 'grid.png'} and {Path(out) / 'metrics.json'} in {time.monotonic() - started:.0f} s")
