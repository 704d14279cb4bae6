"""Per-image seeds and initial noise that depend on (seed, prompt, image) alone, so batch size, order and
process count never change an image."""

from __future__ import annotations

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
