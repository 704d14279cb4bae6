"""``loopfree toy``: commands for the toy world.

    loopfree toy train-teacher --out runs/teacher
"""

from __future__ import annotations

import json

import click

from loopfree.cli import options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def toy() -> None:
    """The toy world: a small captioned-image domain with ground truth."""


@toy.command("train-teacher")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumed if it holds checkpoints).")
@click.option("--vae-steps", type=click.IntRange(1, None), default=2000, show_default=True, help="Autoencoder steps (stage a).")
@click.option("--max-steps", type=click.IntRange(1, None), default=6000, show_default=True, help="UNet + text encoder steps (stage b).")
@click.option("--minutes", type=click.FloatRange(0, None, min_open=True), default=None, help="Wall-clock cap on stage b; it then checkpoints and goes on.")
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True, help="Stage b batch size.")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=3e-4, show_default=True, help="Stage b learning rate.")
@click.option("--probe-every", type=click.IntRange(0, None), default=1000, show_default=True, help="Steps between accuracy probes (0 = none).")
@options.seed()
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="torch CPU threads.")
def train_teacher(out, vae_steps, max_steps, minutes, batch_size, lr, probe_every, seed, threads) -> None:
    """Train the toy teacher and save it as a Stable Diffusion pipeline folder in OUT/pipeline."""
    import logging

    from loopfree.demo.teacher import TeacherConfig, train_teacher as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = TeacherConfig(seed=seed, threads=threads, vae_steps=vae_steps, unet_steps=max_steps, minutes=minutes,
                           unet_batch=batch_size, unet_lr=lr, probe_every=probe_every)
    report = run(out, config)
    click.echo(json.dumps({g: {k: v for k, v in s.items() if k.startswith(("accuracy", "align"))}
                           for g, s in report["guidance"].items()}, indent=2))
