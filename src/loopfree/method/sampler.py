"""The one-pass (loop-free) sampler of SPEC §2 and the ordinary DDIM loop it is compared with.

One pass: ``f = E(x_T, τ_K, c)`` once, ``ε^k = D(f, τ_k, c)`` for all K decoder timesteps as one batch,
then the DDIM (η = 0) recurrence ``x_{k-1} = a_k x_k + b_k ε^k`` from τ_K down to ā_final
(:meth:`NoiseSchedule.ddim_step`)::

    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    x0, eps = loop_free(unet, schedule, x_T, decoder_timesteps(pipe.scheduler.config, 4), cond)

Encoder propagation (Faster Diffusion, the training-free baseline): a DDIM loop whose key steps run the
full UNet and whose other steps run only the decoder on the last key step's encoder features::

    x0 = propagate(unet, schedule, x_T, decoder_timesteps(pipe.scheduler.config, 50), default_key_steps(50), cond)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from loopfree.utils.errors import LoopfreeError
from loopfree.method.guidance import guided_halves
from loopfree.method.schedule import NoiseSchedule
from loopfree.method.runtime import passes

T = TypeVar("T")


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


def ddim_combine(
    schedule: NoiseSchedule, x_T: torch.Tensor, outputs: torch.Tensor, timesteps: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain DDIM (η = 0) over K model outputs: (K, B, ...) → (x_0, ε) with ε the (K, B, ...) noise predictions.

    Step τ_k → τ_{k-1}, τ_0 ≡ 'after the last step' (ā_final); v-predictions become ε with the running x_k.
    """
    x, eps = x_T, []
    for k, t in enumerate(timesteps):
        e = schedule.to_epsilon(outputs[k], x, t)
        x = schedule.ddim_step(x, e, t, timesteps[k + 1] if k + 1 < len(timesteps) else -1)
        eps.append(e)
    return x, torch.stack(eps)


def loop_free(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    hoist: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: encoder once at τ_K, the K decoders batched, DDIM combination. Returns (x_0, ε (K, B, ...)).

    ``hoist``: the decoders' shared work done once (:func:`loopfree.method.split.run_decoders`); False: the plain decoders."""
    guide = uncond is not None and guidance_scale != 1.0
    c = Conditioning.cat([uncond, cond]) if guide else cond
    x_in = torch.cat([x_T, x_T]) if guide else x_T
    run = passes(unet)  # eager, or compiled by loopfree.method.runtime.compile_unet
    feats = run.run_encoder(unet, x_in, timesteps[0], c.text, c.added)
    out = run.run_decoders(unet, feats, timesteps, hoist)
    if guide:
        out = guided_halves(out, guidance_scale, dim=-4)
    return ddim_combine(schedule, x_T, out, timesteps)


class Generator(torch.nn.Module):
    """The student as one module, x_T and text → (x_0, ε (K, B, ...)), so data-parallel wrappers see its forward.

    TiUE: K decoder timesteps. The one-step (SwiftBrush) student is the same with K = 1, τ = [T] and
    ā_final = 1, which makes the DDIM step ``x_0 = (x_T - sqrt(1-ā_T) ε_θ) / sqrt(ā_T)`` (SPEC §3).
    """

    def __init__(self, unet: UNet2DConditionModel, schedule: NoiseSchedule, timesteps: list[int], hoist: bool = True):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.timesteps = list(timesteps)
        self.hoist = hoist

    def forward(self, x_T: torch.Tensor, text: torch.Tensor, added: dict[str, torch.Tensor] | None = None):
        return loop_free(self.unet, self.schedule, x_T, self.timesteps, Conditioning(text, added), hoist=self.hoist)

    def sample(self, use: Callable[[], T]) -> T:
        """``use()``, run as a forward of this module: wrappers that act around forwards act around it (a sharded
        student's FSDP2 root gathers its layers for it: :func:`loopfree.training.sharding.sample_sharded`)."""
        return use()


def ddim_loop(
    unet: UNet2DConditionModel,
    scheduler,
    x_T: torch.Tensor,
    num_steps: int,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The ordinary DDIM loop: a full UNet pass per step (teacher sampling; paper Fig. 10).

    ``scheduler`` only lends its configuration: the loop runs its own DDIM scheduler and leaves it untouched.
    """
    guide = uncond is not None and guidance_scale != 1.0
    c = Conditioning.cat([uncond, cond]) if guide else cond
    scheduler = DDIMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(num_steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guide else x
        out = unet(scheduler.scale_model_input(x_in, t), t, c.text, added_cond_kwargs=c.added).sample
        if guide:
            out = guided_halves(out, guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
        if callback is not None:
            callback(i)
    return x


#: Faster Diffusion's key steps for Stable Diffusion with 50 DDIM steps, as step indices (0 = the first, noisiest
#: step; Li et al., "Faster Diffusion", NeurIPS 2024): the ``keytime`` list of the authors' SD code
#: (github.com/hutaiHang/Faster-Diffusion, ``utils_sd.py``). Its prior-noise injection is not part of this mode.
FASTER_DIFFUSION_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def default_key_steps(num_steps: int) -> list[int]:
    """Faster Diffusion's key steps for ``num_steps`` DDIM steps: its 50-step schedule exactly, scaled to other
    lengths (step k of 50 → ⌊k·N/50⌋, duplicates dropped), so the same fractions of the run are key steps."""
    return sorted({k * num_steps // 50 for k in FASTER_DIFFUSION_KEY_STEPS})


def check_key_steps(key_steps: list[int], num_steps: int) -> list[int]:
    """``key_steps`` as ints if they are strictly increasing step indices of an ``num_steps``-step schedule, the
    first step (0) among them: before it no encoder features exist to share."""
    keys = [int(k) for k in key_steps]
    if not keys:
        raise LoopfreeError("key steps: the list is empty")
    if any(float(a) != b for a, b in zip(key_steps, keys)):
        raise LoopfreeError(f"key steps must be integers (step indices), got {list(key_steps)}")
    outside = [k for k in keys if not 0 <= k < num_steps]
    if outside:
        raise LoopfreeError(f"key step {outside[0]} is not in the {num_steps}-step schedule (steps 0..{num_steps - 1})")
    if any(a >= b for a, b in zip(keys, keys[1:])):
        raise LoopfreeError(f"key steps must be strictly increasing, got {keys}")
    if keys[0] != 0:
        raise LoopfreeError(f"key steps must include the first step, 0 (the encoder has to run before its features can be shared), got {keys}")
    return keys


def propagate(
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    key_steps: list[int],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Encoder propagation over the DDIM ``timesteps``: the full UNet at each key step (indices into
    ``timesteps``), the decoder alone at the steps up to the next key step, on that key step's encoder features.

    With shared features the decoder outputs D(f, τ_j) do not depend on x_j, so a key step and the steps after
    it are one loop-free pass (:func:`loop_free`, decoders batched) started from the running x and ending at the
    next key step, whose ā takes the place of ā_final. Every step a key step is the ordinary DDIM loop; key
    steps [0] the loop-free pass over all N timesteps. ``callback(i, ε_i)`` follows every step i. Returns x_0.
    """
    keys = check_key_steps(key_steps, len(timesteps))
    x = x_T
    for start, stop in zip(keys, [*keys[1:], len(timesteps)]):
        segment = schedule
        if stop < len(timesteps):  # the segment's DDIM chain ends at the next key step's timestep
            segment = replace(schedule, final_alpha_cumprod=schedule.alpha_bar(timesteps[stop]).item())
        x, eps = loop_free(unet, segment, x, timesteps[start:stop], cond, uncond, guidance_scale)
        if callback is not None:
            for j in range(stop - start):
                callback(start + j, eps[j])
    return x
