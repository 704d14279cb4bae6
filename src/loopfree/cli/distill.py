"""``loopfree distill``: distil a teacher into a TiUE (or one-step) student from text prompts alone.

    loopfree distill --teacher path/to/sd21-base --prompts prompts.txt --out runs/tiue
    accelerate launch --multi_gpu --num_processes 8 -m loopfree distill --config distill.yaml
"""

from __future__ import annotations

import click

from loopfree.cli.config_options import config_options
from loopfree.training.config import DistillConfig

@click.command()
@click.option("--config", "config", type=click.Path(), default=None, help="YAML file of options (keys as below, with underscores).")
@config_options(DistillConfig)
def distill(config, **overrides) -> None:
    """Distil a teacher pipeline into a loop-free (TiUE) or one-step student from text prompts alone."""
    from loopfree.pipelines.families import refuse_transformer
    from loopfree.training.config import load_config

    cfg = load_config(config, overrides)
    refuse_transformer(cfg.teacher, "teacher", "distillation", ("sd3",))  # before torch loads: PixArt's and FLUX's students don't exist yet

    from accelerate import PartialState

    from loopfree.training.trainer import distill as run

    out = run(cfg)
    if PartialState().is_main_process:
        click.echo(f"student pipeline written to {out}")
