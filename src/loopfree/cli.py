"""The ``loopfree`` command line: generate, bench (and the commands later modules add).

    loopfree demo
    loopfree generate "a red circle on a white background"
    loopfree bench --arch sd21
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import click
import torch

from loopfree.config import DistillConfig, config_options, load_config
from loopfree.errors import LoopfreeError
from loopfree.toy.cli import toy
from loopfree.toy.demo import DemoConfig

_DEMO = DemoConfig()
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``; default: cuda if available. Unknown/unavailable → error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoopfreeError(f"unknown device {name!r} (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoopfreeError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LoopfreeError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoopfreeError("device 'mps' requested but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LoopfreeError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or mps)")
    return device


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loopfree")
def main() -> None:
    """Loop-free text-to-image diffusion: one encoder pass, K decoders in parallel (TiUE)."""


@main.command()
@click.argument("prompt")
@click.option("--model", "model", default=None, type=click.Path(),
              help="A diffusers Stable Diffusion (XL) pipeline directory (default: the bundled toy student).")
@click.option("--out", "out", default="images", show_default=True, type=click.Path(), help="Directory for the PNGs and generate.json.")
@click.option("--num-images", default=1, show_default=True, help="Images for the prompt.")
@click.option("--seed", default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--steps", default=4, show_default=True, help="K decoder steps (loop_free) or DDIM steps (loop).")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's).")
@click.option("--mode", type=click.Choice(["loop_free", "loop"]), default="loop_free", show_default=True)
@click.option("--guidance", default=1.0, show_default=True, help="Classifier-free guidance scale (1 = off).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
def generate(prompt, model, out, num_images, seed, steps, height, width, mode, guidance, device, dtype) -> None:
    """Generate images for PROMPT with a loop-free student (or any SD pipeline)."""
    from loopfree.pipeline import check_size, inspect_pipeline, load_pipeline
    from loopfree.toy.assets import bundled

    if not prompt.strip():
        raise LoopfreeError("the prompt is empty")
    if steps < 1:
        raise LoopfreeError(f"--steps must be at least 1, got {steps}")
    if num_images < 1:
        raise LoopfreeError(f"--num-images must be at least 1, got {num_images}")
    dev = resolve_device(device)
    model = model if model is not None else str(bundled("student"))
    try:
        info = inspect_pipeline(model)
        height = info.default_size if height is None else height
        width = info.default_size if width is None else width
        check_size(height, width, info.vae_scale_factor)
    except (OSError, ValueError) as e:
        raise LoopfreeError(str(e)) from None
    pipe = load_pipeline(model, dtype=DTYPES[dtype])
    pipe.to(dev)
    timesteps = pipe.default_timesteps(steps) if mode == "loop_free" else None
    images = pipe(
        prompt, num_images_per_prompt=num_images, generator=torch.Generator(dev).manual_seed(seed),
        num_inference_steps=steps, timesteps=timesteps, height=height, width=width, mode=mode, guidance_scale=guidance,
    ).images

    os.makedirs(out, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        files.append(f"{i:03d}.png")
        image.save(os.path.join(out, files[-1]))
    settings = dict(
        prompt=prompt, model=os.path.abspath(model), num_images=num_images, seed=seed, steps=steps,
        decoder_timesteps=timesteps, height=height, width=width, mode=mode, guidance=guidance, device=str(dev),
        dtype=dtype, files=files,
    )
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump(settings, f, indent=2)
    click.echo(f"wrote {len(files)} image(s) to {out}")


@main.command()
@click.option("--arch", type=click.Choice(["sd15", "sd21", "sdxl", "small", "tiny"]), default="sd21", show_default=True)
@click.option("--resolution", type=int, default=None, help="Image size in pixels (default: the architecture's native).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--decoders", default=4, show_default=True, help="K, decoder steps of the one-pass sampler.")
@click.option("--repeats", default=3, show_default=True, help="Timed repeats per row (median reported).")
@click.option("--with-50", is_flag=True, help="Also time a 50-step DDIM loop (long on a CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--train", is_flag=True, help="Time one distillation iteration instead, split into its sections.")
@click.option("--batch-size", default=1, show_default=True, help="Prompts per iteration (--train).")
@click.option("--gradient-checkpointing", is_flag=True, help="With --train.")
@click.option("--batch-teacher-fake/--no-batch-teacher-fake", default=True, show_default=True,
              help="With --train: teacher and fake-score passes as one UNet call.")
def bench(arch, resolution, device, dtype, decoders, repeats, with_50, as_json, train, batch_size, gradient_checkpointing,
          batch_teacher_fake) -> None:
    """Time one loop-free pass against full UNet steps (random weights, real shapes); --train: one distillation step."""
    from loopfree.archs import ARCHS
    from loopfree.bench import format_table, inference_rows, train_rows

    from loopfree.pipeline import check_size

    spec = ARCHS[arch]
    resolution = resolution or spec.resolution
    try:
        check_size(resolution, resolution, spec.vae_scale_factor)
    except ValueError as e:
        raise LoopfreeError(f"--resolution: {e}") from None
    if decoders < 1 or repeats < 1:
        raise LoopfreeError("--decoders and --repeats must be at least 1")
    dev = resolve_device(device)
    if train:
        precision = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[dtype]
        rows = train_rows(spec, resolution, dev, precision, repeats, batch_size, decoders, gradient_checkpointing, batch_teacher_fake)
        title = (f"loopfree bench --train: {arch}, {resolution}x{resolution}, {dev}, {dtype}, batch {batch_size}, K={decoders}, "
                 f"teacher+fake {'batched' if batch_teacher_fake else 'separate'}, median of {repeats}")
        click.echo(json.dumps(dict(arch=arch, rows=[asdict(r) for r in rows]), indent=2) if as_json else format_table(rows, title, "share"))
        return
    rows = inference_rows(spec, resolution, dev, DTYPES[dtype], repeats, decoders, with_50)
    if as_json:
        click.echo(json.dumps(dict(arch=arch, resolution=resolution, device=str(dev), dtype=dtype, rows=[asdict(r) for r in rows]), indent=2))
    else:
        click.echo(format_table(rows, f"loopfree bench: {arch}, {resolution}x{resolution}, {dev}, {dtype}, batch 1, median of {repeats}"))


@main.command()
@click.option("--config", "config", type=click.Path(), default=None, help="YAML file of options (keys as below, with underscores).")
@config_options(DistillConfig)
def distill(config, **overrides) -> None:
    """Distil a teacher pipeline into a loop-free (TiUE) or one-step student from text prompts alone."""
    from accelerate import PartialState

    from loopfree.trainer import distill as run

    out = run(load_config(config, overrides))
    if PartialState().is_main_process:
        click.echo(f"student pipeline written to {out}")


@main.command()
@click.option("--out", default=_DEMO.out, show_default=True, type=click.Path(file_okay=False), help="Output folder (reused: finished students are kept).")
@click.option("--steps", default=_DEMO.steps, show_default=True, help="Distillation steps per student.")
@click.option("--students", default=",".join(_DEMO.students), show_default=True,
              help="Comma-separated student kinds, in table order: one-step, tiue-no-kl, tiue.")
@click.option("--train-seeds", default=_DEMO.train_seeds, show_default=True, help="Train each student this many times; the table gives mean ± spread.")
@click.option("--prompts", default=_DEMO.prompts, show_default=True, help="Held-out evaluation prompts.")
@click.option("--seeds", default=_DEMO.seeds, show_default=True, help="Images per evaluation prompt.")
@click.option("--teacher", default=None, type=click.Path(), help="Teacher pipeline directory (default: the bundled toy teacher).")
@click.option("--teacher-steps", default=_DEMO.teacher_steps, show_default=True, help="DDIM steps of the reference teacher row.")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
def demo(out, steps, students, train_seeds, prompts, seeds, teacher, teacher_steps, threads) -> None:
    """Distil the bundled toy teacher and compare teacher and students: grid.png, metrics.json, a table."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from loopfree.toy.demo import DemoConfig, format_table, run_demo

    diffusers_logging.disable_progress_bar()  # loading and saving bars would bury the demo's own
    transformers_logging.disable_progress_bar()
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = DemoConfig(out=out, steps=steps, students=tuple(s.strip() for s in students.split(",") if s.strip()),
                     train_seeds=train_seeds, prompts=prompts, seeds=seeds, teacher=teacher, teacher_steps=teacher_steps)
    started = time.monotonic()
    rows = run_demo(cfg)
    click.echo(format_table(rows))
    click.echo(f"wrote {os.path.join(out, 'grid.png')} and {os.path.join(out, 'metrics.json')} in {time.monotonic() - started:.0f} s")


main.add_command(toy)
