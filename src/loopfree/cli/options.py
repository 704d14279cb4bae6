"""The command line's one vocabulary: shared options and value types.

Every command takes its common options from here, so a concept has one flag everywhere (docs/cli.md, "One
vocabulary").
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import click

from loopfree.toy.assets import MODELS
from loopfree.utils.vocabulary import DTYPES, MAX_SEED, MODES

F = Callable[..., Any]



class Resolution(click.ParamType):
    """``512`` (square) or ``WIDTHxHEIGHT`` (``768x512``), as (height, width) in pixels."""

    name = "N|WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", str(value))
        if not match:
            self.fail(f"{value!r} is not a size: give N (square) or WIDTHxHEIGHT", param, ctx)
        width = int(match.group(1))
        height = int(match.group(2)) if match.group(2) else width
        return height, width


class IntList(click.ParamType):
    """A comma-separated list of integers, ``751,501,251,1``."""

    name = "N,N,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            items = [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if not items:
            self.fail("the list is empty", param, ctx)
        return items


def number_check(low: float | None = None, high: float | None = None, finite: bool = True) -> Callable:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return value
        if finite and not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, got {value}", ctx, param)
        if low is not None and value < low:
            raise click.BadParameter(f"must be at least {low}, got {value}", ctx, param)
        if high is not None and value > high:
            raise click.BadParameter(f"must be at most {high}, got {value}", ctx, param)
        return value

    return check


def model(help: str = "A local diffusers Stable Diffusion (XL) pipeline folder (default: the bundled toy student).") -> F:
    return click.option("--model", type=click.Path(), default=None, help=help)


#: --model of the commands that sample transformer pipelines too (generate, eval, serve)
ANY_MODEL = ("A local diffusers pipeline folder: Stable Diffusion (XL), PixArt-α, SD3 or FLUX, or a bundled model's name "
             f"({', '.join(MODELS)}; default: the bundled toy student).")


def lora() -> F:
    return click.option("--lora", type=click.Path(), default=None,
                        help="A LoRA student's folder (distill --student-lora-rank) on --model, its base: samples as that student.")


def fuse() -> F:
    return click.option("--fuse", is_flag=True, help="Fold --lora and --style-lora into the weights: no LoRA layers, as fast as a full student.")


def style_lora(func: F) -> F:
    """--style-lora and --style-scale: any diffusers-format LoRA of the denoiser on the model (a student too)."""
    func = click.option("--style-scale", type=float, default=1.0, show_default=True, callback=number_check(),
                        help="The --style-lora's weight (0: off).")(func)
    return click.option("--style-lora", type=click.Path(), default=None,
                        help="A diffusers-format LoRA (a .safetensors file, or a folder holding pytorch_lora_weights.safetensors) "
                             "loaded onto the model, a student too: e.g. a style trained on the teacher.")(func)


def out(default: str | None = None, help: str = "Output folder.") -> F:
    return click.option("--out", type=click.Path(), default=default, required=default is None, show_default=default is not None, help=help)


def overwrite() -> F:
    return click.option("--overwrite", is_flag=True, help="Replace the results already in --out (kept until the new ones are complete).")


def seed(default: int = 0) -> F:
    return click.option("--seed", type=click.IntRange(0, MAX_SEED), default=default, show_default=True, help="Random seed.")


def steps(help: str = "Sampling steps: K decoders (loop_free, default: what the student recorded, else 4) or DDIM steps (loop, propagate; default 50).") -> F:
    return click.option("--steps", type=click.IntRange(1, None), default=None, help=help)


def timesteps() -> F:
    return click.option("--timesteps", type=IntList(), default=None, help="Explicit decoder timesteps τ_K > … > τ_1, e.g. 751,501,251,1.")


def key_steps() -> F:
    return click.option("--key-steps", type=IntList(), default=None,
                        help="propagate: the steps that run the full UNet, as indices from 0 (the first step, always "
                             "included); default Faster Diffusion's 0,1,2,3,5,10,15,25,35 of 50, scaled to other --steps.")


def guidance(default: float = 1.0) -> F:
    return click.option("--guidance", type=float, default=default, show_default=True, callback=number_check(0.0, 100.0),
                        help="Classifier-free guidance scale (1 = off).")


def device() -> F:
    return click.option("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available).")


def dtype(default: str = "fp32") -> F:
    return click.option("--dtype", type=click.Choice(DTYPES), default=default, show_default=True, help="Weights and compute precision.")


def resolution(help: str = "Image size: N (square) or WIDTHxHEIGHT (default: the model's).") -> F:
    return click.option("--resolution", type=Resolution(), default=None, help=help)


def images_per_prompt(default: int = 1) -> F:
    return click.option("--images-per-prompt", type=click.IntRange(1, 10_000), default=default, show_default=True, help="Images per prompt.")


def mode(choices: tuple[str, ...] = MODES) -> F:
    return click.option("--mode", type=click.Choice(choices), default="loop_free", show_default=True,
                        help="loop_free: one pass; loop: DDIM, a full UNet pass per step; propagate: encoder propagation.")


def threads() -> F:
    return click.option("--threads", type=click.IntRange(1, 256), default=None, help="torch CPU threads (default: torch's choice).")


def compile_() -> F:
    return click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder and the decoder (static shapes).")
