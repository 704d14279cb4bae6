"""The one-pass (loop-free) sampler of SPEC §2 and the ordinary DDIM loop it is compared with.

One pass: ``f = E(x_T, τ_K, c)`` once, ``ε^k = D(f, τ_k, c)`` for all K decoder timesteps as one batch,
then the DDIM (η = 0) recurrence ``x_{k-1} = a_k x_k + b_k ε^k`` from τ_K down to ā_final::

    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    x0, eps = loop_free(unet, schedule, x_T, decoder_timesteps(pipe.scheduler.config, 4), cond)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from loopfree.losses import guided
from loopfree.split import decode, encode


@dataclass
class Conditioning:
    """Text conditioning for a batch: UNet ``encoder_hidden_states`` plus SDXL's added conditioning."""

    text: torch.Tensor  # (B, L, D)
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, D'), time_ids (B, 6)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.text for p in parts]), added)

    def rows(self, start: int, stop: int) -> "Conditioning":
        added = None if self.added is None else {k: v[start:stop] for k, v in self.added.items()}
        return Conditioning(self.text[start:stop], added)

    def where(self, mask: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Row b from ``self`` where ``mask[b]``, else from ``other``."""

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.reshape(-1, *[1] * (a.ndim - 1)), a, b)

        added = None if self.added is None else {k: pick(v, other.added[k]) for k, v in self.added.items()}
        return Conditioning(pick(self.text, other.text), added)

    def repeat(self, n: int) -> "Conditioning":
        """Each row ``n`` times in a row (for several images per prompt)."""
        added = None if self.added is None else {k: v.repeat_interleave(n, 0) for k, v in self.added.items()}
        return Conditioning(self.text.repeat_interleave(n, 0), added)


@dataclass
class NoiseSchedule:
    """ā_t of the teacher's training scheduler, ā_final, and its prediction type (SPEC §1)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), float64
    final_alpha_cumprod: float  # 1.0 if set_alpha_to_one else ā_0
    prediction_type: str  # "epsilon" or "v_prediction"

    @classmethod
    def from_scheduler(cls, scheduler, final_alpha_cumprod: float | None = None) -> "NoiseSchedule":
        """From any diffusers scheduler's config; ``final_alpha_cumprod`` overrides ā_final (one-step: 1.0)."""
        ddim = DDIMScheduler.from_config(scheduler.config)
        if ddim.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {ddim.config.prediction_type!r} is not supported (epsilon, v_prediction)")
        final = float(ddim.final_alpha_cumprod) if final_alpha_cumprod is None else final_alpha_cumprod
        return cls(ddim.alphas_cumprod.double(), final, ddim.config.prediction_type)

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ā at integer timesteps; t < 0 means 'after the last step' (ā_final)."""
        t = torch.as_tensor(t)
        final = torch.tensor(self.final_alpha_cumprod, dtype=torch.float64)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0).cpu()], final)

    def to_epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Noise prediction from the model output: v → ε = sqrt(ā) v + sqrt(1-ā) x_t; t scalar or per item (B,)."""
        if self.prediction_type == "epsilon":
            return model_output
        ab = self.alpha_bar(t).to(x_t.device, torch.float32)
        ab = ab.reshape(-1, *[1] * (x_t.ndim - 1)) if ab.ndim else ab
        return (ab.sqrt() * model_output + (1 - ab).sqrt() * x_t).to(model_output.dtype)


def decoder_timesteps(scheduler_config, num_steps: int) -> list[int]:
    """The teacher's DDIM timesteps for ``num_steps`` steps (SD2.1-base, 4 → [751, 501, 251, 1])."""
    if num_steps < 1:
        raise ValueError(f"the number of decoder steps must be at least 1, got {num_steps}")
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_steps)
    return [int(t) for t in ddim.timesteps]


def ddim_combine(
    schedule: NoiseSchedule, x_T: torch.Tensor, outputs: torch.Tensor, timesteps: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain DDIM (η = 0) over K model outputs: (K, B, ...) → (x_0, ε) with ε the (K, B, ...) noise predictions.

    Step τ_k → τ_{k-1} (τ_0 ≡ final): ``x ← a_k x + b_k ε^k`` with ``a_k = sqrt(ā_{k-1}/ā_k)``,
    ``b_k = sqrt(ā_{k-1})(sqrt(1/ā_{k-1} - 1) - sqrt(1/ā_k - 1))`` (SPEC §2, paper Eqs. 7-10).
    """
    x, eps = x_T, []
    for k, t in enumerate(timesteps):
        ab = schedule.alpha_bar(t).item()
        ab_prev = schedule.alpha_bar(timesteps[k + 1] if k + 1 < len(timesteps) else -1).item()
        e = schedule.to_epsilon(outputs[k], x, t)
        a = (ab_prev / ab) ** 0.5
        b = ab_prev**0.5 * ((1 / ab_prev - 1) ** 0.5 - (1 / ab - 1) ** 0.5)
        x = a * x + b * e
        eps.append(e)
    return x, torch.stack(eps)


def _guided(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch laid out as [uncond; cond] along dim ``-4``."""
    return guided(*out.chunk(2, dim=-4), guidance_scale)


def loop_free(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: encoder once at τ_K, the K decoders batched, DDIM combination. Returns (x_0, ε (K, B, ...))."""
    guide = uncond is not None and guidance_scale != 1.0
    c = Conditioning.cat([uncond, cond]) if guide else cond
    x_in = torch.cat([x_T, x_T]) if guide else x_T
    feats = encode(unet, x_in, timesteps[0], c.text, c.added)
    out = decode(unet, feats, timesteps)
    if guide:
        out = _guided(out, guidance_scale)
    return ddim_combine(schedule, x_T, out, timesteps)


class Generator(torch.nn.Module):
    """The student as one module, x_T and text → (x_0, ε (K, B, ...)), so data-parallel wrappers see its forward.

    TiUE: K decoder timesteps. The one-step (SwiftBrush) student is the same with K = 1, τ = [T] and
    ā_final = 1, which makes the DDIM step ``x_0 = (x_T - sqrt(1-ā_T) ε_θ) / sqrt(ā_T)`` (SPEC §3).
    """

    def __init__(self, unet: UNet2DConditionModel, schedule: NoiseSchedule, timesteps: list[int]):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.timesteps = list(timesteps)

    def forward(self, x_T: torch.Tensor, text: torch.Tensor, added: dict[str, torch.Tensor] | None = None):
        return loop_free(self.unet, self.schedule, x_T, self.timesteps, Conditioning(text, added))


def ddim_loop(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    x_T: torch.Tensor,
    num_steps: int,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The ordinary DDIM loop: a full UNet pass per step (teacher sampling; paper Fig. 10)."""
    guide = uncond is not None and guidance_scale != 1.0
    c = Conditioning.cat([uncond, cond]) if guide else cond
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guide else x
        out = unet(scheduler.scale_model_input(x_in, t), t, c.text, added_cond_kwargs=c.added).sample
        if guide:
            out = _guided(out, guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
        if callback is not None:
            callback(i)
    return x
