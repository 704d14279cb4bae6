"""Per-image seeds and initial noise that depend on (seed, prompt, image) alone, so batch size, order and
process count never change an image: image i of prompt p starts from ``initial_latents(pipe, [image_seed(seed, p,
i)], height, width)`` in every command (generate, serve, eval, analyze, the demo)."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *keys: int, bits: int = 64) -> int:
    """A ``bits``-bit (32 or 64) seed derived from ``seed`` and integer ``keys`` (SeedSequence: no collisions in
    practice)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64 if bits == 64 else np.uint32)[0])


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_T ~ N(0, I), one (C, h, w) draw per seed on the CPU (identical on every device), as (N, C, h, w)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device, dtype)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` (its index in the whole prompt source; 0 for
    commands that take one prompt) under the user's ``seed``."""
    return derive_seed(seed, prompt_index, image_index)


def initial_latents(pipe, seeds: list[int], height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """x_T for ``pipe`` at ``height`` × ``width`` pixels (its ``latent_shape``), one draw per seed, in its denoiser's
    dtype on ``device`` (default: the pipeline's)."""
    shape = pipe.latent_shape(height, width)
    return initial_noise(seeds, shape, pipe.device if device is None else device, pipe.denoiser.dtype)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The global random states (python, numpy, torch) seeded inside are restored afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
