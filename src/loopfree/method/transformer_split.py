"""What the transformer splits share (SPEC §6): the boundary N over the block list, running one block, unpatchify.

A transformer denoiser is split at N of its L blocks: the *shared part* (patch embedding, caption/context
projection, blocks 0..N-1) runs once at τ_K; the *per-step part* (blocks N..L-1, final norm and projection) runs
for the K decoder timesteps as one batch. One module per family, each read top to bottom, builds on this one:
:mod:`~loopfree.method.split_pixart` (DiT, ε-prediction), :mod:`~loopfree.method.split_sd3` and
:mod:`~loopfree.method.split_flux` (MMDiT, rectified flow)::

    n = check_shared_blocks(None, len(model.transformer_blocks))   # None → default_shared_blocks(L) = L // 2
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from loopfree.method.guidance import guided_halves
from loopfree.method.sampler import Conditioning
from loopfree.utils.errors import LoopfreeError

#: The default share of the blocks run once: half (N is a setting of the student, ``shared_blocks``). Faster
#: Diffusion's DiT code (Li et al., NeurIPS 2024; github.com/sen-mao/DiT-FasterDiffusion, ``models.py``: ``blocks[:18]``)
#: reuses 18 of DiT-XL's 28 blocks (≈ 0.64) as its "encoder" — training-free, where sharing more is free speed. A
#: trained student's per-step blocks are all the capacity it has to tell its K timesteps apart, so the split
#: gives them half; one pass then costs N + K·(L − N) blocks: 2.5 full passes for K = 4.
SHARED_FRACTION = 0.5


def default_shared_blocks(num_blocks: int) -> int:
    """N for a model of ``num_blocks`` blocks: ⌊SHARED_FRACTION · L⌋."""
    return int(SHARED_FRACTION * num_blocks)


def check_shared_blocks(shared_blocks: int | None, num_blocks: int) -> int:
    """``shared_blocks`` as an int in 0..L (None: the default), else a LoopfreeError naming the range."""
    if shared_blocks is None:
        return default_shared_blocks(num_blocks)
    if isinstance(shared_blocks, bool) or int(shared_blocks) != shared_blocks:
        raise LoopfreeError(f"shared blocks must be an integer, got {shared_blocks!r}")
    if not 0 <= shared_blocks <= num_blocks:
        raise LoopfreeError(
            f"shared blocks N={shared_blocks} is out of range: this model has {num_blocks} blocks (N in 0..{num_blocks})")
    return int(shared_blocks)


def run_block(model: torch.nn.Module, block: torch.nn.Module, **inputs) -> tuple:
    """``block(**inputs)``; under gradient checkpointing (the model's own switch) with its activations recomputed
    in backward, as the model's forward does."""
    if torch.is_grad_enabled() and model.is_gradient_checkpointing:
        return checkpoint(block, use_reentrant=False, **inputs)
    return block(**inputs)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """(N, h·w, p·p·C) patch tokens → (N, C, h·p, w·p) latents: token (i, j) holds the p×p patch at (i·p, j·p)."""
    h, w = grid
    x = tokens.reshape(tokens.shape[0], h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], channels, h * patch, w * patch)


def guided_outputs(
    predict: Callable[[torch.Tensor, Conditioning], torch.Tensor],
    x_T: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
) -> torch.Tensor:
    """``predict(x_T, cond)`` → (K, B, ...), under classifier-free guidance when ``uncond`` is given and the scale
    isn't 1: one call on [uncond; cond] along the batch, then the guided combination (as ``sampler.loop_free``)."""
    if uncond is None or guidance_scale == 1.0:
        return predict(x_T, cond)
    out = predict(torch.cat([x_T, x_T]), Conditioning.cat([uncond, cond]))
    return guided_halves(out, guidance_scale, dim=1)
