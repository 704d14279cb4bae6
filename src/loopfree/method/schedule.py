"""The noise-schedule maths in one place (SPEC §1-2): ā_t, the forward process, v ↔ ε, DDIM steps.

    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    x_t = diffuse(x_0, eps, schedule.alpha_bar(t))
    taus = decoder_timesteps(pipe.scheduler.config, 4)      # SD2.1-base: [751, 501, 251, 1]

A rectified-flow teacher (SD3's ``FlowMatchEulerDiscreteScheduler``, ``prediction_type`` "flow") gets the same
variance-preserving view, so every objective reads ā_t, x_t and ε as for a UNet: its training σ's, σ_t = s·u/(1 +
(s − 1)·u) with u = (t + 1)/T, are ā_t = (1 − σ)² / ((1 − σ)² + σ²), and the flow latent is the VP latent scaled,
x_σ = (1 − σ) x_0 + σ ε = c_t x_t with c_t = sqrt((1 − σ)² + σ²). The model sees ``model_input`` (c_t x_t) at
``model_timestep`` (σ_t·T, as SD3's pipeline passes it) and its velocity v = ε − x_0 becomes ε = c_t x_t + (1 − σ_t) v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from loopfree.utils.errors import LoopfreeError, short


@dataclass
class NoiseSchedule:
    """ā_t of the teacher's training scheduler, ā_final, and its prediction type (SPEC §1)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,), float64
    final_alpha_cumprod: float  # 1.0 if set_alpha_to_one else ā_0
    prediction_type: str  # "epsilon", "v_prediction" or "flow" (a rectified-flow velocity)
    sigmas: torch.Tensor | None = None  # flow: σ_t (num_train_timesteps,), float64, ascending in t

    @classmethod
    def from_scheduler(cls, scheduler, final_alpha_cumprod: float | None = None) -> "NoiseSchedule":
        """From any diffusers scheduler's config; ``final_alpha_cumprod`` overrides ā_final (one-step: 1.0)."""
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            return cls.from_flow(scheduler.config)
        ddim = DDIMScheduler.from_config(scheduler.config)
        if ddim.config.prediction_type not in ("epsilon", "v_prediction"):
            raise LoopfreeError(f"prediction_type {ddim.config.prediction_type!r} is not supported (epsilon, v_prediction)")
        final = float(ddim.final_alpha_cumprod) if final_alpha_cumprod is None else final_alpha_cumprod
        return cls(ddim.alphas_cumprod.double(), final, ddim.config.prediction_type)

    @classmethod
    def from_flow(cls, scheduler_config) -> "NoiseSchedule":
        """A ``FlowMatchEulerDiscreteScheduler`` config's training σ's as ā_t (module docstring); ā_final = 1 (σ = 0)."""
        c = dict(scheduler_config)
        if c.get("use_dynamic_shifting"):
            raise LoopfreeError("this flow scheduler shifts by resolution (FLUX): its distillation is not built yet")
        T, shift = int(c.get("num_train_timesteps", 1000)), float(c.get("shift", 1.0))
        u = torch.arange(1, T + 1, dtype=torch.float64) / T
        sigmas = shift * u / (1 + (shift - 1) * u)  # FlowMatchEulerDiscreteScheduler's training σ's, ascending
        alphas = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
        return cls(alphas, 1.0, "flow", sigmas)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _flow(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """σ_t and c_t = sqrt((1 − σ)² + σ²), shaped to broadcast against ``like`` (t scalar or per item)."""
        sigma = self.sigmas[torch.as_tensor(t).cpu()].to(like.device, torch.float32)
        sigma = sigma.reshape(-1, *[1] * (like.ndim - 1)) if sigma.ndim else sigma
        return sigma, ((1 - sigma) ** 2 + sigma**2).sqrt()

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """What the model takes for the VP latent x_t: x_t itself, or a flow model's x_σ = c_t x_t."""
        if self.prediction_type != "flow":
            return x_t
        return (self._flow(t, x_t)[1] * x_t.float()).to(x_t.dtype)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the model is called with: t, or a flow model's σ_t·T."""
        if self.prediction_type != "flow":
            return t
        return (self.sigmas[t.cpu()] * self.num_train_timesteps).float().to(t.device)

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ā at integer timesteps (float64, on t's device); t < 0 means 'after the last step' (ā_final)."""
        t = torch.as_tensor(t)
        final = torch.tensor(self.final_alpha_cumprod, dtype=torch.float64)
        return torch.where(t.cpu() >= 0, self.alphas_cumprod[t.clamp(min=0).cpu()], final).to(t.device)

    def to_epsilon(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Noise prediction from the model output: v → ε = sqrt(ā) v + sqrt(1-ā) x_t (a flow velocity: module
        docstring); t scalar or per item (B,)."""
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "flow":  # ε = x_σ + (1 − σ) v, x_σ = c_t x_t
            sigma, c = self._flow(t, x_t)
            return (c * x_t.float() + (1 - sigma) * model_output.float()).to(model_output.dtype)
        ab = self.alpha_bar(t).to(x_t.device, torch.float32)
        ab = ab.reshape(-1, *[1] * (x_t.ndim - 1)) if ab.ndim else ab
        return (ab.sqrt() * model_output + (1 - ab).sqrt() * x_t).to(model_output.dtype)

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """One DDIM (η = 0) step from t to t_prev (t_prev < 0: to ā_final), given the noise prediction ε.

        ``x ← a x + b ε``, ``a = sqrt(ā_prev/ā)``, ``b = sqrt(ā_prev)(sqrt(1/ā_prev - 1) - sqrt(1/ā - 1))``
        (SPEC §2, paper Eqs. 7-10).
        """
        ab, ab_prev = self.alpha_bar(t).item(), self.alpha_bar(t_prev).item()
        a = (ab_prev / ab) ** 0.5
        b = ab_prev**0.5 * ((1 / ab_prev - 1) ** 0.5 - (1 / ab - 1) ** 0.5)
        return a * x + b * eps


def diffuse(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): x_t = sqrt(ā_t) x_0 + sqrt(1 - ā_t) ε, ā_t per item (B,)."""
    a = alpha_bar_t.float().reshape(-1, *([1] * (x0.ndim - 1)))
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype)


def sample_timesteps(
    batch: int, t_min: int, t_max: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``batch`` integer timesteps from U{t_min, ..., t_max}, both bounds inclusive (SPEC §3)."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=device)


def decoder_timesteps(scheduler_config, num_steps: int) -> list[int]:
    """The teacher's DDIM timesteps for ``num_steps`` steps (SD2.1-base, 4 → [751, 501, 251, 1])."""
    num_train = int(scheduler_config["num_train_timesteps"])
    if not 1 <= num_steps <= num_train:
        raise LoopfreeError(f"the number of steps must be in 1..{num_train} (the scheduler's training timesteps), got {num_steps}")
    ts = _ddim_timesteps(scheduler_config, num_steps)
    if ts[0] >= num_train:  # "leading" spacing plus steps_offset: diffusers' plan passes the last timestep
        fits = next(k for k in range(num_steps - 1, 0, -1) if _ddim_timesteps(scheduler_config, k)[0] < num_train)
        raise LoopfreeError(f"{num_steps} steps on this scheduler's spacing and steps_offset would start at timestep {ts[0]}, "
                            f"past its last ({num_train - 1}): use at most {fits}")
    return ts


def _ddim_timesteps(scheduler_config, num_steps: int) -> list[int]:
    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_steps)
    return [int(t) for t in ddim.timesteps]


def check_timesteps(timesteps: list[int], num_train_timesteps: int) -> list[int]:
    """``timesteps`` as ints if they are a non-empty, strictly decreasing list within [0, num_train_timesteps)."""
    ts = [int(t) for t in timesteps]
    if not ts:
        raise LoopfreeError("timesteps is empty")
    if any(float(a) != b for a, b in zip(timesteps, ts)):
        raise LoopfreeError(f"timesteps must be integers, got {short(list(timesteps))}")
    if any(not 0 <= t < num_train_timesteps for t in ts):
        raise LoopfreeError(f"timesteps must lie in [0, {num_train_timesteps - 1}], got {short(ts)}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise LoopfreeError(f"timesteps must be strictly decreasing, got {short(ts)}")
    return ts
