"""Distillation losses of TiUE (SPEC §3), written in the paper's symbols.

`ā_t` is `alphas_cumprod[t]` of the teacher's training scheduler, given per item as a (B,)
tensor and broadcast over (B, C, H, W). Losses are computed in float32 whatever the input dtype.
"""

from typing import Literal

import torch


def _per_item(alpha_bar_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) in float32 so it broadcasts against `like`."""
    return alpha_bar_t.float().reshape(-1, *([1] * (like.ndim - 1)))


def vsd_loss(
    x0: torch.Tensor,
    eps_teacher: torch.Tensor,
    eps_fake: torch.Tensor,
    alpha_bar_t: torch.Tensor,
) -> torch.Tensor:
    """Variational score distillation loss on the student's latent `x0`.

    Its value is meaningless; its gradient is dL/dx0 = g / x0.numel() with
    g = (1 - ā_t)(ε_ψ - ε_φ), non-finite entries of g replaced by 0.
    """
    # SPEC §3.2: g = (1 - ā_t)(ε_ψ - ε_φ), non-finite → 0
    g = (1 - _per_item(alpha_bar_t, x0)) * (eps_teacher.float() - eps_fake.float())
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    # SPEC §3.2: L_vsd = 0.5 · mean((x_0 - sg(x_0 - g))²)
    target = (x0.float() - g).detach()
    return 0.5 * ((x0.float() - target) ** 2).mean()


def kl_loss(eps: torch.Tensor, reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """KL regulariser pulling each student noise prediction towards N(0, 1).

    `eps` holds the N = K·B decoder outputs, shape (N, C, H, W). Per item a scalar Gaussian
    is fitted over its C·H·W elements (μ = mean, s² = unbiased variance) and
    KL = 0.5 (μ² + s² - log s² - 1) is taken against N(0, 1).

    `reduction="sum"` sums over the N items: the authors' exact form, used with λ_KL = 0.1.
    `reduction="mean"` averages instead, so its weight does not change with K or the batch.
    As sum = N · mean, the sum form with weight λ equals the mean form with weight λ·N, where
    N = K·B is the number of items on one device. The paper's setting (λ = 0.1, K = 4,
    8 prompts per device) is therefore reproduced exactly by `reduction="mean"` with
    λ = 0.1 · 4 · 8 = 3.2. Away from that setting the two differ: the sum form's weight
    relative to the (mean-reduced) VSD loss grows with K·B, the mean form's stays fixed.
    """
    flat = eps.float().flatten(1)
    mu = flat.mean(dim=1)
    s2 = flat.var(dim=1, correction=1)
    # SPEC §3.3: KL = 0.5 (μ² + s² - log s² - 1)
    kl = 0.5 * (mu**2 + s2 - s2.log() - 1)
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def fake_score_loss(eps_fake: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake-score network on the detached student latents."""
    # SPEC §3.5: L_mse = mean((sqrt(ā_t)(ε_φ(x_t, t, c) - ε))²)
    a = _per_item(alpha_bar_t, eps_fake)
    return ((a.sqrt() * (eps_fake.float() - eps.float())) ** 2).mean()
