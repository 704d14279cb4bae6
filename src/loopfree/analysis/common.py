"""What the analyses share: how they denoise_all (prompts, x_T, guidance, batches), the model checks made before any
loading, the quality figure (a pluggable function: the toy world's for a toy-world model, ``loopfree eval``'s CLIP
score with ``--clip``) and progress bars.

    setup = AnalysisSetup(num_prompts=16, images_per_prompt=4, guidance=4.5)   # loopfree.analysis.settings
    pipe, prompts = load(model, setup), prompt_list(setup)
    x_T = analysis_latents(pipe, len(prompts), setup)                    # image i of prompt p: image_seed(seed, p, i)
    latents = denoise_all(pipe, "loop", pipe.plan_steps("loop", 25), setup, per_image(prompts, setup), x_T)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from loopfree.analysis.settings import AnalysisSetup
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.outputs import OutputFolder
from loopfree.utils.seeding import image_seed, initial_latents

#: images (N, 3, H, W) in [-1, 1], the prompt of each image → named scores (toy world: alignment, fd)
Quality = Callable[[torch.Tensor, list[str]], dict[str, float]]

TOY_SCORES = ("alignment", "fd")  # the toy world's figures the analyses report (loopfree.evaluation.toy)


def check_model_folders(*models: str) -> list[str]:
    """Absolute paths of pipeline folders that pass the loading gate's cheap checks (nothing is loaded)."""
    from loopfree.pipelines.loading import inspect_pipeline

    for model in models:
        inspect_pipeline(model)
    return [str(Path(m).absolute()) for m in models]


def check_steps(steps: list[int], num_train: int) -> list[int]:
    """A non-empty list of DDIM step counts, each in 1..num_train."""
    if not steps:
        raise LoopfreeError("the step list is empty")
    bad = [n for n in steps if not 1 <= n <= num_train]
    if bad:
        raise LoopfreeError(f"steps must be in 1..{num_train} (the scheduler's training timesteps), got {bad[0]}")
    return list(steps)


def output_folder(out: str, command: str, settings: dict, overwrite: bool) -> OutputFolder:
    """The analysis' output folder (staged, published whole at the end), checked before any model loads."""
    return OutputFolder(out, f"analyze {command}", settings, overwrite=overwrite)


@dataclass
class Run:
    """An analysis of one model over prompts and step counts, checked and ready to write into ``folder``."""

    model: str
    steps: list[int]
    prompts: list[str]
    folder: OutputFolder
    pipe: Any
    quality: Quality | None
    clip: dict | None = None  # the CLIP model of the clip_score figure: path and sha256 of its weights


def start(command: str, model: str | None, bundled_default: str, steps: list[int], setup: AnalysisSetup, out: str,
          overwrite: bool, clip: str | None = None, transformers: bool = False) -> Run:
    """Check the model folder (default: the bundled ``bundled_default``; a transformer's only with
    ``transformers``), steps, prompts, ``--out`` and the ``clip`` folder (``--clip``, optional) before loading the
    model; then load it and its quality figure."""
    from loopfree.utils.devices import resolve_device
    from loopfree.pipelines.loading import inspect_pipeline
    from loopfree.toy.assets import bundled

    model = str(Path(model or bundled(bundled_default)).absolute())
    steps = check_steps(list(steps), inspect_pipeline(model, transformers=transformers).num_train_timesteps)
    prompts = prompt_list(setup)
    clip = str(Path(clip).absolute()) if clip is not None else None
    folder = output_folder(out, command, dict(model=model, steps=steps, **setup.settings(), clip=clip), overwrite)
    scorer = None
    if clip is not None:
        from loopfree.evaluation.clip import ClipScorer

        with quiet_loading():
            scorer = ClipScorer(clip, resolve_device(setup.device))
    pipe = load(model, setup)
    return Run(model, steps, prompts, folder, pipe, quality_for(pipe, prompts, scorer),
               scorer and dict(path=scorer.path, sha256=scorer.sha256))


def prompt_list(setup: AnalysisSetup) -> list[str]:
    """The first ``num_prompts`` prompts of the prompt file, or the toy world's held-out evaluation prompts."""
    from loopfree.training.data import load_prompts
    from loopfree.toy.world import heldout_prompts

    if setup.num_prompts < 1 or setup.images_per_prompt < 1 or setup.batch_size < 1:
        raise LoopfreeError("--num-prompts, --images-per-prompt and --batch-size must be at least 1")
    if setup.prompts:
        return load_prompts(setup.prompts).prompts[: setup.num_prompts]
    return heldout_prompts(setup.num_prompts, setup.seed)  # the demo's evaluation prompts for the same seed


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars off inside (they would bury the analysis' own), restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in enabled:
            if was:
                lib.enable_progress_bar()


def load(model: str, setup: AnalysisSetup):
    """The pipeline on ``setup``'s device and dtype, its own progress bar off (the analyses show theirs)."""
    from loopfree.utils.devices import resolve_device, resolve_dtype
    from loopfree.pipelines.loading import load_pipeline

    device = resolve_device(setup.device)
    with quiet_loading():
        pipe = load_pipeline(model, dtype=resolve_dtype(setup.dtype, device))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_image(prompts: list[str], setup: AnalysisSetup) -> list[str]:
    """The prompt of every image, prompt-major (image i of prompt p is at p·images_per_prompt + i)."""
    return [p for p in prompts for _ in range(setup.images_per_prompt)]


def native_size(pipe) -> int:
    """The side in pixels the pipeline's denoiser was made for (a UNet's sample size, a transformer's geometry)."""
    return pipe.geometry.default_size if hasattr(pipe, "geometry") else pipe.unet.config.sample_size * pipe.vae_scale_factor


def analysis_latents(pipe, num_prompts: int, setup: AnalysisSetup) -> torch.Tensor:
    """x_T of image i of prompt p from ``image_seed(seed, p, i)`` at the native size: the same noise in every
    analysis and row."""
    seeds = [image_seed(setup.seed, p, i) for p in range(num_prompts) for i in range(setup.images_per_prompt)]
    size = native_size(pipe)
    return initial_latents(pipe, seeds, size, size)


def batches(prompts: list[str], x_T: torch.Tensor, setup: AnalysisSetup, bar: tqdm | None = None, weight: int = 1):
    """(prompts, x_T) chunks of at most ``batch_size`` images; ``bar`` advances by ``weight`` × their images (the
    steps they take, so its ETA holds across step counts)."""
    for start in range(0, len(prompts), setup.batch_size):
        yield prompts[start : start + setup.batch_size], x_T[start : start + setup.batch_size]
        if bar is not None:
            bar.update(weight * min(setup.batch_size, len(prompts) - start))


def conditioning(pipe, prompts: list[str], guidance: float):
    """(cond, uncond or None) for one image per prompt at the pipeline's native size."""
    size = native_size(pipe)
    return pipe.encode_conditioning(prompts, None, 1, guidance != 1.0, pipe.device, (size, size))


@torch.no_grad()
def denoise_batch(pipe, mode: str, plan, prompts: list[str], x_T: torch.Tensor, guidance: float) -> torch.Tensor:
    """x_0 latents of one image per entry of ``prompts`` from ``x_T``, in one sampler call."""
    return pipe.denoise(mode, plan, x_T, *conditioning(pipe, prompts, guidance), guidance)


def denoise_all(pipe, mode: str, plan, setup: AnalysisSetup, prompts: list[str], x_T: torch.Tensor, bar: tqdm | None = None) -> torch.Tensor:
    """x_0 latents of one image per entry of ``prompts`` from ``x_T``, sampled in ``mode`` as ``plan`` says, in batches."""
    chunks = batches(prompts, x_T, setup, bar, plan.num_steps)
    return torch.cat([denoise_batch(pipe, mode, plan, chunk, x, setup.guidance) for chunk, x in chunks])


def to_images(pipe, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decoded images (N, 3, H, W) in [-1, 1], float32 on the CPU."""
    with torch.no_grad():
        return torch.cat([pipe.decode(chunk, "pt").float().cpu() * 2 - 1 for chunk in latents.split(batch_size)])


def to_pil(pipe, images: torch.Tensor) -> list:
    """Images in [-1, 1] (as :func:`to_images` returns them) as PIL images."""
    return pipe.image_processor.postprocess(images, output_type="pil")


def is_toy_world(pipe) -> bool:
    """Whether ``pipe`` draws the toy world: its image size, and a tokenizer with one token per toy-world word."""
    from loopfree.toy.world import IMAGE_SIZE, VOCABULARY

    vocab = pipe.tokenizer.get_vocab()
    return native_size(pipe) == IMAGE_SIZE and all(f"{w}</w>" in vocab for w in VOCABULARY)


def quality_for(pipe, prompts: list[str], clip=None) -> Quality | None:
    """The quality figure for ``pipe``'s images of ``prompts``: the toy world's alignment and fd (against its
    real images) for a toy-world model; with ``clip`` (a :class:`loopfree.evaluation.clip.ClipScorer`) also
    ``clip_score``, for any model. None when neither applies (the analyses then show no quality)."""
    figures = [figure for figure in (toy_quality(pipe, prompts), clip_quality(pipe, clip)) if figure is not None]
    if not figures:
        return None

    def quality(images: torch.Tensor, image_prompts: list[str]) -> dict[str, float]:
        return {k: v for figure in figures for k, v in figure(images, image_prompts).items()}

    return quality


def clip_quality(pipe, clip) -> Quality | None:
    """``clip_score``: ``loopfree eval``'s CLIP score of the images — the same PNG pixels, prepared at the metric
    resolution (256, Lanczos) and scored by the same :class:`~loopfree.evaluation.clip.ClipScorer` in the same
    batches, the mean cosine of image and prompt; None without a scorer."""
    if clip is None:
        return None
    from loopfree.evaluation.features import READ_BATCH, extract, prepare
    from loopfree.evaluation.settings import METRIC_RESOLUTION

    def clip_score(images: torch.Tensor, image_prompts: list[str]) -> dict[str, float]:
        prepared = np.stack([prepare(image, METRIC_RESOLUTION) for image in to_pil(pipe, images)])
        chunks = (prepared[i : i + READ_BATCH] for i in range(0, len(prepared), READ_BATCH))
        return {"clip_score": float(extract(None, chunks, clip, image_prompts)["clip"].mean())}

    return clip_score


def toy_quality(pipe, prompts: list[str]) -> Quality | None:
    """The toy world's alignment and fd of the images (against its real images); None for another model."""
    if not is_toy_world(pipe):
        return None
    from loopfree.toy.classifier import load_classifier
    from loopfree.evaluation.toy import evaluate_images
    from loopfree.toy.world import parse_prompt

    for prompt in prompts:
        parse_prompt(prompt)  # every prompt must name the toy world's attributes: a one-line error otherwise
    classifier = load_classifier()

    def toy_scores(images: torch.Tensor, image_prompts: list[str]) -> dict[str, float]:
        scores = evaluate_images(images, image_prompts, classifier, seed=0)
        return {k: scores[k] for k in TOY_SCORES}

    return toy_scores


def progress(total: int, desc: str, unit: str = "img·step") -> tqdm:
    """A bar over ``total`` units: image-steps by default (an image sampled with N steps counts N)."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
