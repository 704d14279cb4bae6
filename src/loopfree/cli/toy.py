"""``loopfree toy``: commands for the toy world.

    loopfree toy train-teacher --out runs/teacher
    loopfree toy train-teacher --arch mmdit --out runs/teacher-mmdit
    loopfree toy fine-tune --domain night --out runs/night
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
@click.option("--arch", type=click.Choice(["unet", "mmdit"]), default="unet", show_default=True,
              help="unet: a Stable Diffusion UNet with DDIM; mmdit: an SD3 transformer with rectified flow (on the UNet teacher's VAE).")
@click.option("--vae-steps", type=click.IntRange(1, None), default=2000, show_default=True, help="Autoencoder steps (stage a, unet).")
@click.option("--max-steps", type=click.IntRange(1, None), default=None, help="Denoiser + text encoder steps (default: unet 6000, mmdit 9000).")
@click.option("--minutes", type=click.FloatRange(0, None, min_open=True), default=None, help="Wall-clock cap on the denoiser's training; it then checkpoints and goes on.")
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True, help="Denoiser batch size.")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=3e-4, show_default=True, help="Denoiser learning rate.")
@click.option("--probe-every", type=click.IntRange(0, None), default=1000, show_default=True, help="Steps between accuracy probes (0 = none).")
@options.seed()
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="torch CPU threads.")
def train_teacher(out, arch, vae_steps, max_steps, minutes, batch_size, lr, probe_every, seed, threads) -> None:
    """Train the toy teacher and save it as a diffusers pipeline folder in OUT/pipeline (Stable Diffusion or SD3)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if arch == "mmdit":
        from loopfree.demo.teacher_mmdit import train_teacher as run
        from loopfree.toy.settings import MMDiTTeacherConfig

        config = MMDiTTeacherConfig(seed=seed, threads=threads, minutes=minutes, batch=batch_size, lr=lr,
                                    probe_every=probe_every, **({"steps": max_steps} if max_steps else {}))
    else:
        from loopfree.demo.teacher import TeacherConfig, train_teacher as run

        config = TeacherConfig(seed=seed, threads=threads, vae_steps=vae_steps, minutes=minutes, unet_batch=batch_size,
                               unet_lr=lr, probe_every=probe_every, **({"unet_steps": max_steps} if max_steps else {}))
    report = run(out, config)
    click.echo(json.dumps({g: {k: v for k, v in s.items() if k.startswith(("accuracy", "align"))}
                           for g, s in report["guidance"].items()}, indent=2))


@toy.command("fine-tune")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (resumed if it holds checkpoints).")
@click.option("--teacher", type=click.Path(), default=None, help="The toy UNet teacher's pipeline folder (default: the bundled one).")
@click.option("--domain", type=click.Choice(["night"]), default="night", show_default=True,
              help="The shifted domain: night (every background black, whatever the caption names).")
@click.option("--max-steps", type=click.IntRange(1, None), default=1000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1, None), default=32, show_default=True, help="Images per step.")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Peak learning rate, cosine to 0 (default: 1e-4 for the UNet, 1e-3 for a LoRA).")
@click.option("--lora-rank", type=click.IntRange(1, None), default=None,
              help="Train a style LoRA of this rank (diffusers' format, OUT/pytorch_lora_weights.safetensors) instead of the UNet.")
@options.seed()
@options.threads()
def fine_tune(out, teacher, domain, max_steps, batch_size, lr, lora_rank, seed, threads) -> None:
    """Fine-tune the toy teacher on a shifted domain: the UNet (OUT/pipeline, a teacher folder) or a style LoRA."""
    from loopfree.demo.finetune import FineTuneConfig, fine_tune as run

    result = run(FineTuneConfig(out=out, teacher=teacher, domain=domain, steps=max_steps, batch=batch_size, lr=lr,
                                lora_rank=lora_rank, seed=seed, threads=threads))
    click.echo(f"fine-tuned on {domain}: {result}")
