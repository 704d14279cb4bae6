"""``loopfree generate``: images for one prompt from a student (or any SD pipeline).

    loopfree generate "a red circle on a white background" --images-per-prompt 4 --out images
"""

from __future__ import annotations

import click

from loopfree.cli import options
from loopfree.utils.errors import LoopfreeError


@click.command()
@click.argument("prompt")
@options.model(options.ANY_MODEL)
@options.out("images", "Output folder for the PNGs and generate.json.")
@options.overwrite()
@options.images_per_prompt()
@options.seed()
@options.steps()
@options.timesteps()
@options.resolution()
@options.mode()
@options.key_steps()
@options.guidance()
@options.device()
@options.dtype()
@options.compile_()
@click.option("--tiny-vae", type=click.Path(), default=None,
              help="A local diffusers AutoencoderTiny (TAESD) folder that decodes instead of the model's VAE: fast, approximate.")
@options.lora()
@options.fuse()
@options.style_lora
@click.option("--backend", type=click.Choice(("torch", "onnxruntime")), default="torch", show_default=True,
              help="onnxruntime: --model is a `loopfree export` folder (ONNX), run without PyTorch's sampler.")
@options.threads()
def generate(prompt, model, out, overwrite, images_per_prompt, seed, steps, timesteps, resolution, mode,
             key_steps, guidance, device, dtype, compile_, tiny_vae, lora, fuse, style_lora, style_scale, backend, threads) -> None:
    """Generate images for PROMPT with a loop-free student (or any Stable Diffusion, PixArt-α, SD3 or FLUX pipeline)."""
    if not prompt.strip():
        raise LoopfreeError("the prompt is empty")

    from loopfree.pipelines.generate import generate_images

    folder = generate_images(
        prompt, model=model, out=out, overwrite=overwrite, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
        timesteps=timesteps, resolution=resolution, mode=mode, key_steps=key_steps, guidance=guidance, device=device,
        dtype=dtype, compile=compile_, tiny_vae=tiny_vae, lora=lora, fuse=fuse,
        style_lora=style_lora, style_scale=style_scale, backend=backend, threads=threads,
    )
    click.echo(f"wrote {images_per_prompt} image(s) to {folder}")
