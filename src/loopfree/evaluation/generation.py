"""The *generate* stage of ``loopfree eval``: one PNG per (prompt, image), resumable and shared among processes.

Image i of prompt p starts from x_T drawn from ``image_seed(seed, p, i)`` (p: the prompt's index in the whole
source), so a subset, another order, batch size or process count gives the same image (bit for bit when the
batches are the same; otherwise up to float rounding, which can move a pixel by one level). PNGs are written
atomically under their final names, so a file that is there is complete; a rerun generates only the missing
ones. ``manifest.jsonl`` lists every planned image (file, prompt, prompt index, image index, seed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from loopfree.utils.outputs import save_image, write_atomic
from loopfree.utils.seeding import image_seed, initial_latents
from loopfree.utils.timing import synchronize

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Job:
    """One image to generate: prompt ``prompt_index`` of the source, its ``image_index``-th image."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.prompt_index:06d}_{self.image_index:04d}.png"


@dataclass(frozen=True)
class Sampling:
    """How the pipeline is called (the same for every image of a run)."""

    height: int
    width: int
    mode: str = "loop_free"
    steps: int | None = None
    timesteps: list[int] | None = None
    guidance: float = 1.0
    key_steps: list[int] | None = None  # propagate: the full-UNet steps (default: Faster Diffusion's)

    def call_kwargs(self) -> dict:
        return dict(height=self.height, width=self.width, mode=self.mode, num_inference_steps=self.steps,
                    timesteps=self.timesteps, guidance_scale=self.guidance, key_steps=self.key_steps)

    def description(self) -> dict:
        """The fields as a dict for cache keys; ``key_steps`` only when set, so keys made before it existed still match."""
        fields = asdict(self)
        if fields["key_steps"] is None:
            del fields["key_steps"]
        return fields


def plan_jobs(prompts: list[str], indices: list[int], images_per_prompt: int, seed: int) -> list[Job]:
    """Prompt-major jobs for the source prompts at ``indices``, each image seeded from (seed, p, i) alone."""
    return [Job(p, i, prompts[p], image_seed(seed, p, i)) for p in indices for i in range(images_per_prompt)]


@torch.no_grad()
def generate_jobs(pipe, jobs: list[Job], sampling: Sampling, device: torch.device) -> tuple[list[Image.Image], float]:
    """The images of one batch of ``jobs`` and the seconds spent denoising them (text encoder, UNet, sampler;
    not the VAE decode)."""
    latents = initial_latents(pipe, [j.seed for j in jobs], sampling.height, sampling.width, device)
    synchronize(device)
    start = time.perf_counter()
    x0 = pipe([j.prompt for j in jobs], latents=latents, output_type="latent", **sampling.call_kwargs()).images
    synchronize(device)
    seconds = time.perf_counter() - start
    return pipe.decode(x0, "pil"), seconds


def batches(jobs: list, batch_size: int) -> list[list]:
    return [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]


def write_manifest(root: Path, jobs: list[Job]) -> None:
    """``manifest.jsonl`` in ``root``: one line per planned image."""
    lines = [json.dumps({"file": j.file, **asdict(j)}) for j in jobs]
    write_atomic(root / MANIFEST, "\n".join(lines) + "\n")


def missing(root: Path, jobs: list[Job]) -> list[Job]:
    """The jobs whose PNG is not in ``root``; leftover temporary files of interrupted writes are removed."""
    for partial in root.glob(".*.png.tmp-*"):
        partial.unlink(missing_ok=True)
    return [j for j in jobs if not (root / j.file).is_file()]


def generate(pipe, root: Path, todo: list[Job], sampling: Sampling, batch_size: int, device: torch.device,
             rank: int = 0, world: int = 1, desc: str = "generate") -> None:
    """Write the PNGs of ``todo`` into ``root``: batches of ``batch_size``, process ``rank`` of ``world`` takes
    every world-th batch."""
    mine = batches(todo, batch_size)[rank::world]
    with tqdm(total=sum(map(len, mine)), desc=desc, unit="img", disable=rank != 0) as bar:
        for batch in mine:
            images, _ = generate_jobs(pipe, batch, sampling, device)
            for job, image in zip(batch, images):
                save_image(root / job.file, image)
            bar.update(len(batch))
