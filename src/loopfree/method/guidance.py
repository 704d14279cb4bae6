"""Classifier-free guidance: one formula, used by the sampler and by the distillation objective."""

from __future__ import annotations

import torch


def guided(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_uncond + w (ε_cond - ε_uncond) (Ho & Salimans 2022; the paper uses w = 4.5)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_halves(out: torch.Tensor, scale: float, dim: int = 0) -> torch.Tensor:
    """Guidance over a batch laid out as [uncond; cond] along ``dim``."""
    return guided(*out.chunk(2, dim=dim), scale)
