"""Rectified-flow maths for SD3 and FLUX students (SPEC §6): the decoder σ's, the one-pass Euler combination, and
the conversions v ↔ ε ↔ x̂_0 the objectives need. Forward process ``x_σ = (1 − σ) x_0 + σ ε``; the model predicts
the velocity ``v = ε − x_0``::

    sigmas = decoder_sigmas(scheduler.config, 4)                                     # SD3: static shift s = 3
    sigmas = decoder_sigmas(scheduler.config, 4, image_seq_len=4096, pipeline="flux")  # FLUX at 1024²: shift by μ
    x0, eps = euler_combine(x_T, v, sigmas)                                          # v: (K, B, ...) velocities

Decoder σ's are what ``FlowMatchEulerDiscreteScheduler.set_timesteps`` gives for K steps when called as the
diffusers pipeline does: SD3's with K alone — diffusers spaces K σ's evenly between the ends of the shifted training
schedule (1 and σ'(1/1000)) and shifts them again, ``σ' = s σ / (1 + (s − 1) σ)`` with s the config's ``shift``;
FLUX's with ``sigmas = linspace(1, 1/K, K)`` and ``mu`` (:func:`flux_mu`), shifted ``e^μ / (e^μ + 1/σ − 1)``
(``use_dynamic_shifting``). The scheduler's other options (shift_terminal, Karras σ's …) apply as it applies them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from loopfree.utils.errors import LoopfreeError, short

Sigma = torch.Tensor | float  # a scalar, or one σ per item (B,)


def flux_mu(scheduler_config, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift μ, linear in the image's token count through (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) of the scheduler config, as diffusers' FluxPipeline computes it."""
    c = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return c.base_shift + slope * (image_seq_len - c.base_image_seq_len)


def decoder_sigmas(
    scheduler_config, num_steps: int, image_seq_len: int | None = None, pipeline: Literal["sd3", "flux"] = "sd3"
) -> list[float]:
    """σ_K > … > σ_1 for K one-pass steps: the scheduler's σ's for ``num_steps`` steps as ``pipeline`` sets them
    (module docstring), without the final σ_0 = 0. ``image_seq_len`` (image tokens): needed when the scheduler
    shifts by resolution (``use_dynamic_shifting``; FLUX: the packed latent's length, SD3: (H/p)·(W/p))."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    c = scheduler.config
    if c.stochastic_sampling or c.invert_sigmas:
        raise LoopfreeError(
            "the one pass needs a deterministic flow scheduler: stochastic_sampling and invert_sigmas must be off")
    if not 1 <= num_steps <= c.num_train_timesteps:
        raise LoopfreeError(
            f"the number of steps must be in 1..{c.num_train_timesteps} (the scheduler's training timesteps), got {num_steps}")
    if pipeline not in ("sd3", "flux"):
        raise LoopfreeError(f"pipeline must be 'sd3' or 'flux', got {pipeline!r}")
    kwargs = {}
    if c.use_dynamic_shifting:
        if image_seq_len is None:
            raise LoopfreeError(
                "this scheduler shifts by resolution (use_dynamic_shifting): pass image_seq_len, the image's token count")
        kwargs["mu"] = flux_mu(scheduler_config, image_seq_len)
    if pipeline == "flux":
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler.sigmas[:-1].tolist()


def check_sigmas(sigmas: list[float]) -> list[float]:
    """``sigmas`` as floats if they are a non-empty, strictly decreasing list within (0, 1]."""
    s = [float(x) for x in sigmas]
    if not s or any(not 0 < x <= 1 for x in s) or any(a <= b for a, b in zip(s, s[1:])):
        raise LoopfreeError(f"decoder sigmas must be a non-empty, strictly decreasing list in (0, 1], got {short(s)}")
    return s


def _per_item(sigma: Sigma, like: torch.Tensor) -> Sigma:
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        return sigma.to(like.device, like.dtype).reshape(-1, *[1] * (like.ndim - 1))
    return float(sigma)


def diffuse(x0: torch.Tensor, eps: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """Forward process: x_σ = (1 − σ) x_0 + σ ε."""
    s = _per_item(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_v(x: torch.Tensor, sigma: Sigma, v: torch.Tensor) -> torch.Tensor:
    """x̂_0 = x_σ − σ v."""
    return x - _per_item(sigma, x) * v


def eps_from_v(x: torch.Tensor, sigma: Sigma, v: torch.Tensor) -> torch.Tensor:
    """ε̂ = x_σ + (1 − σ) v."""
    return x + (1 - _per_item(sigma, x)) * v


def v_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """v = (x_σ − x_0) / σ (σ > 0)."""
    return (x - x0) / _per_item(sigma, x)


def v_from_eps(x: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """v = (ε − x_σ) / (1 − σ) (σ < 1)."""
    return (eps - x) / (1 - _per_item(sigma, x))


def x0_from_eps(x: torch.Tensor, sigma: Sigma, eps: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_σ − σ ε) / (1 − σ) (σ < 1)."""
    s = _per_item(sigma, x)
    return (x - s * eps) / (1 - s)


def eps_from_x0(x: torch.Tensor, sigma: Sigma, x0: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_σ − (1 − σ) x_0) / σ (σ > 0)."""
    s = _per_item(sigma, x)
    return (x - (1 - s) * x0) / s


def euler_combine(x_T: torch.Tensor, velocities: torch.Tensor, sigmas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain Euler over K velocities: (K, B, ...) → (x_0, ε̂) with ε̂ the (K, B, ...) noise estimates.

    Step σ_k → σ_{k−1} (σ_0 = 0): ``x_{k−1} = x_k + (σ_{k−1} − σ_k) v_k``; ε̂_k = x_k + (1 − σ_k) v_k with the
    running x_k, as ``sampler.ddim_combine`` turns v-predictions into ε."""
    sigmas = check_sigmas(sigmas)
    if len(sigmas) != velocities.shape[0]:
        raise LoopfreeError(f"{velocities.shape[0]} velocities for {len(sigmas)} decoder sigmas")
    x, eps = x_T, []
    for k, sigma in enumerate(sigmas):
        eps.append(eps_from_v(x, sigma, velocities[k]))
        x = x + ((sigmas[k + 1] if k + 1 < len(sigmas) else 0.0) - sigma) * velocities[k]  # Euler step, SPEC §6
    return x, torch.stack(eps)
