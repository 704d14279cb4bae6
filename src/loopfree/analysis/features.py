"""``loopfree analyze features`` (paper Fig. 1): how alike the UNet's encoder and decoder features are from one
DDIM step to the next, against the number of steps N, beside the images' quality at that N.

    loopfree analyze features                                  # the bundled toy teacher, N = 1, 2, 4, 8, 15, 25, 50
    loopfree analyze features --model path/to/sd21-base --prompts prompts.txt --guidance 4.5 --steps 4,15,50

For each N the model samples every prompt's images with N-step DDIM (a full UNet pass per step, guidance on
both halves of the batch); :mod:`loopfree.analysis.capture` records the features at every step and averages
the cosine similarity of adjacent steps per image and feature tensor. N = 1 has no adjacent steps (null).
Writes ``features.png`` and ``features.json``.

A transformer (PixArt, SD3, FLUX folders) is analysed per block: N-step sampling is its diffusers pipeline's own
loop, each block's image-token output is one feature tensor, and the "encoder" / "decoder" means are over the
split's shared blocks (the first N, the pipeline's ``shared_blocks``) and its per-step blocks. The figure plots
each block's adjacent-step similarity, one line per N — which blocks could run once for all timesteps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from contextlib import AbstractContextManager

from loopfree.analysis.capture import AdjacentSimilarity, block_features, denoiser_blocks, unet_features
from loopfree.analysis.common import (
    Quality, batches, analysis_latents, per_image, progress, denoise_batch, start, to_images,
)
from loopfree.utils.figures import figure, save_figure
from loopfree.analysis.settings import FEATURE_STEPS, FEATURES, AnalysisSetup
from loopfree.utils.outputs import write_json


def is_transformer(pipe) -> bool:
    return hasattr(pipe, "geometry")


def capture(pipe, on_step) -> AbstractContextManager:
    """The features of every denoiser pass inside: a UNet's encoder and decoder tensors, a transformer's blocks."""
    if is_transformer(pipe):
        return block_features(denoiser_blocks(pipe), pipe.num_shared_blocks, on_step)
    return unet_features(pipe.unet, on_step)


@torch.no_grad()
def sample_loop(pipe, steps: int, prompts: list[str], x_T: torch.Tensor, guidance: float) -> torch.Tensor:
    """x_0 latents of ``steps``-step sampling in the ``loop`` mode (a transformer: its diffusers pipeline's call)."""
    if is_transformer(pipe):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=x_T, mode="loop",
                    output_type="latent").images
    return denoise_batch(pipe, "loop", pipe.plan_steps("loop", steps), prompts, x_T, guidance)


def similarity_rows(pipe, steps: list[int], setup: AnalysisSetup, prompts: list[str], quality: Quality | None = None,
                    bar=None) -> list[dict]:
    """Per N: mean adjacent-step cosine similarity of the encoder and decoder features (and per tensor; a
    transformer's also per block), and ``quality`` of the N-step images if given."""
    image_prompts = per_image(prompts, setup)
    x_T = analysis_latents(pipe, len(prompts), setup)
    rows = []
    for n in steps:
        tracker = AdjacentSimilarity()
        latents = []
        with capture(pipe, tracker.update):
            for chunk, x in batches(image_prompts, x_T, setup, bar, n):
                tracker.reset()  # a batch is trajectories of its own
                latents.append(sample_loop(pipe, n, chunk, x, setup.guidance))
        row = dict(steps=n, encoder_similarity=tracker.mean("encoder"), decoder_similarity=tracker.mean("decoder"),
                   encoder_per_tensor=tracker.per_tensor("encoder"), decoder_per_tensor=tracker.per_tensor("decoder"))
        if is_transformer(pipe):
            parts = [row["encoder_per_tensor"], row["decoder_per_tensor"]]
            row["shared_blocks"] = pipe.num_shared_blocks
            row["block_similarity"] = None if n == 1 else [v for part in parts if part for v in part]
        if quality is not None:
            row["quality"] = quality(to_images(pipe, torch.cat(latents)), image_prompts)
        rows.append(row)
    return rows


def plot(rows: list[dict], title: str):
    """Quality against N (one panel per score, if any), then encoder/decoder similarity against N — a transformer's
    each block's similarity instead, a line per N."""
    scores = list(rows[0].get("quality", {}))
    fig, axes = figure(len(scores) + 1)
    steps = [r["steps"] for r in rows]
    for ax, score in zip(axes, scores):
        values = [r["quality"][score] for r in rows]
        ax.plot(steps, values, "o-", color="tab:green")
        ax.set_ylabel(score)
        if min(values) > 0 and max(values) > 50 * min(values):  # fd falls by orders of magnitude
            ax.set_yscale("log")
    blocks = "block_similarity" in rows[0]
    ax = axes[-1]
    if blocks:
        for row in rows:
            if row["block_similarity"]:
                ax.plot(range(len(row["block_similarity"])), row["block_similarity"], "o-", ms=3, label=f"N = {row['steps']}")
        ax.axvline(rows[0]["shared_blocks"] - 0.5, color="grey", ls="--", lw=1, label="shared | per-step")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    else:
        for part, colour in (("encoder", "tab:blue"), ("decoder", "tab:red")):
            kept = [(r["steps"], r[f"{part}_similarity"]) for r in rows if r[f"{part}_similarity"] is not None]
            ax.plot([n for n, _ in kept], [v for _, v in kept], "o-", color=colour, label=part)
    ax.set_ylabel("cosine similarity of adjacent steps")
    ax.legend(fontsize=7 if blocks else None)
    for ax in axes[:-1] if blocks else axes:  # axes over N
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps N" if blocks else "DDIM steps N")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def run_features(model: str | None = None, steps: list[int] = FEATURE_STEPS, setup: AnalysisSetup = FEATURES,
                 out: str = "analysis/features", overwrite: bool = False, clip: str | None = None) -> Path:
    """Analyse ``model`` (default: the bundled toy teacher) and write features.png/json to ``out``; the folder.
    ``clip``: a local CLIP folder, for the ``clip_score`` of every N."""
    run = start("features", model, "teacher", steps, setup, out, overwrite, clip, transformers=True)
    with run.folder, progress(sum(run.steps) * len(run.prompts) * setup.images_per_prompt, "features") as bar:
        rows = similarity_rows(run.pipe, run.steps, setup, run.prompts, run.quality, bar)
        kind = "transformer blocks over sampling steps" if is_transformer(run.pipe) else "UNet features over DDIM steps"
        save_figure(plot(rows, f"{kind}: {Path(run.model).name}"), run.folder.path / "features.png")
        write_json(run.folder.path / "features.json",
                   dict(model=run.model, steps=run.steps, settings=setup.settings(), prompts=run.prompts, clip=run.clip, rows=rows))
    return run.folder.final
