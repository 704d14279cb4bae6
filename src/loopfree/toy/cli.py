"""``loopfree toy``: commands for the toy world.

    loopfree toy train-teacher --out runs/teacher
"""

from __future__ import annotations

import json
import logging

import click

from loopfree.toy.teacher import TeacherConfig, train_teacher

_DEFAULTS = TeacherConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def toy() -> None:
    """The toy world: a small captioned-image domain with ground truth."""


@toy.command("train-teacher")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder (resumed if it holds checkpoints).")
@click.option("--vae-steps", default=_DEFAULTS.vae_steps, show_default=True, help="Autoencoder steps (stage a).")
@click.option("--steps", "unet_steps", default=_DEFAULTS.unet_steps, show_default=True, help="UNet + text encoder steps (stage b).")
@click.option("--minutes", type=float, default=None, help="Wall-clock cap on stage b; it then checkpoints and goes on.")
@click.option("--batch", default=_DEFAULTS.unet_batch, show_default=True, help="Stage b batch size.")
@click.option("--lr", default=_DEFAULTS.unet_lr, show_default=True, help="Stage b learning rate.")
@click.option("--probe-every", default=_DEFAULTS.probe_every, show_default=True, help="Steps between accuracy probes (0 = none).")
@click.option("--seed", default=_DEFAULTS.seed, show_default=True)
@click.option("--threads", default=_DEFAULTS.threads, show_default=True, help="torch CPU threads.")
def train_teacher_command(out, vae_steps, unet_steps, minutes, batch, lr, probe_every, seed, threads) -> None:
    """Train the toy teacher and save it as a Stable Diffusion pipeline directory in OUT/pipeline."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = TeacherConfig(
        seed=seed, threads=threads, vae_steps=vae_steps, unet_steps=unet_steps, minutes=minutes,
        unet_batch=batch, unet_lr=lr, probe_every=probe_every,
    )
    report = train_teacher(out, config)
    click.echo(json.dumps({g: {k: v for k, v in s.items() if k.startswith(("accuracy", "align"))}
                           for g, s in report["guidance"].items()}, indent=2))
