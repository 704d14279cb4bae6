"""Latency and memory as the paper's Table 1 reports them: one image (batch 1), the whole pipeline call (text
encoder, UNet passes, VAE decode to a tensor), warmed up, timed with the device synchronised; peak CUDA memory."""

from __future__ import annotations

import torch

from loopfree.evaluation.generation import Sampling
from loopfree.utils.seeding import initial_latents
from loopfree.utils.timing import time_call

WARMUP = 2


@torch.no_grad()
def measure_latency(pipe, prompt: str, seed: int, sampling: Sampling, device: torch.device, repeats: int) -> dict[str, float | None]:
    """``latency_ms`` (median of ``repeats`` calls) and ``memory_gb`` (peak allocated GiB on CUDA, else None)."""
    latents = initial_latents(pipe, [seed], sampling.height, sampling.width, device)
    call = sampling.call_kwargs()
    seconds, peak = time_call(lambda: pipe([prompt], latents=latents, output_type="pt", **call), device, repeats, WARMUP)
    return {"latency_ms": 1000.0 * seconds, "memory_gb": peak}
