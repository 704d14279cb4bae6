"""``LoopFreePipeline`` / ``LoopFreeXLPipeline``: diffusers pipelines that sample in one pass.

They are the Stable Diffusion (XL) pipelines with a different ``__call__``: ``mode="loop_free"`` runs the
encoder once and K decoders in parallel (SPEC §2); ``mode="loop"`` is the ordinary DDIM loop, a full UNet
pass per step, so the same object serves as teacher; ``mode="propagate"`` is that loop with encoder propagation
(Faster Diffusion: the full UNet only at ``key_steps``, the decoder alone elsewhere). ``save_pretrained`` writes
a directory that plain ``StableDiffusionPipeline.from_pretrained`` loads, plus ``loopfree.json`` with the
decoder timesteps::

    pipe = load_pipeline("out/student")
    image = pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from loopfree.utils.errors import LoopfreeError, short
from loopfree.utils.outputs import write_json
from loopfree.utils.vocabulary import MODES
from loopfree.method.sampler import Conditioning, check_key_steps, ddim_loop, default_key_steps, loop_free, propagate
from loopfree.method.schedule import NoiseSchedule, check_timesteps, decoder_timesteps

logger = logging.get_logger(__name__)

SIDECAR = "loopfree.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA student's adapter, in diffusers' LoRA format
STUDENT_ADAPTER, STYLE_ADAPTER = "loop_free", "style"  # the adapters' names: a LoRA student's, a style LoRA's
BASE_RECORD = "base_sha256"  # a LoRA student's loopfree.json: the hash of the denoiser weights it was distilled on
DEFAULT_DECODERS = 4  # K when a model records no decoder timesteps (paper: 4)
DEFAULT_LOOP_STEPS = 50  # DDIM steps of the loop modes (diffusers' default)


MAX_SIDE_FACTOR = 4  # largest image side: this many times the model's native size (memory bound, see check_size)


def check_size(height: int, width: int, vae_scale_factor: int, native_size: int) -> None:
    """Image sizes the model takes: positive multiples of the VAE's scale factor, each side at most
    ``MAX_SIDE_FACTOR`` × the native size (SD2.1: 2048 px; beyond that activations outgrow any single GPU)."""
    limit = MAX_SIDE_FACTOR * native_size
    for name, v in (("height", height), ("width", width)):
        if v < vae_scale_factor or v % vae_scale_factor:
            raise LoopfreeError(f"{name} must be a positive multiple of {vae_scale_factor} for this model, got {v}")
        if v > limit:
            raise LoopfreeError(f"{name} {v} is over this model's limit of {limit} px ({MAX_SIDE_FACTOR}× its native {native_size})")


@dataclass(frozen=True)
class StepPlan:
    """How a call samples: steps, the decoder (loop_free) or DDIM (propagate) timesteps, ā_final override, key steps;
    rectified-flow models (SD3, FLUX) sample by decoder σ's instead of timesteps."""

    num_steps: int
    timesteps: list[int] | None = None  # loop_free, propagate
    final_alpha_cumprod: float | None = None  # recorded override (one-step students: 1.0)
    key_steps: list[int] | None = None  # propagate only: indices into timesteps
    sigmas: list[float] | None = None  # loop_free of flow models: recorded or given σ's (None: the scheduler's for K)


def plan_key_steps(mode: str, key_steps: list[int] | None, num_steps: int) -> list[int] | None:
    """The propagate mode's key steps over ``num_steps`` DDIM steps, checked (default: Faster Diffusion's,
    :func:`~loopfree.method.sampler.default_key_steps`); None for the other modes, which take none. Needs no model, so
    commands call it before loading one."""
    if mode != "propagate":
        if key_steps is not None:
            raise LoopfreeError(f"key steps belong to the propagate mode, not to {mode!r}")
        return None
    return default_key_steps(num_steps) if key_steps is None else check_key_steps(key_steps, num_steps)


def _explicit_timesteps(timesteps: list[int] | None, num_inference_steps: int | None, num_train: int) -> list[int] | None:
    """Checked explicit ``timesteps`` (None if not given), agreeing with ``num_inference_steps`` if that is given."""
    if timesteps is None:
        return None
    ts = check_timesteps(timesteps, num_train)
    if num_inference_steps is not None and num_inference_steps != len(ts):
        raise LoopfreeError(f"{len(ts)} timesteps given but steps is {num_inference_steps}")
    return ts


def plan_steps(mode: str, num_inference_steps: int | None, timesteps: list[int] | None, scheduler_config,
               recorded: list[int] | None = None, final_alpha_cumprod: float | None = None,
               key_steps: list[int] | None = None) -> StepPlan:
    """What a call samples. ``loop_free``: the ``recorded`` decoder timesteps (and ā_final) by default; another K,
    or explicit ``timesteps``, replace them — with the scheduler's DDIM timesteps for that K and its own
    ā_final — and a student that recorded its own says so in a warning. Loop modes: DDIM with
    ``num_inference_steps`` (default 50); ``propagate`` also takes explicit DDIM ``timesteps`` and ``key_steps``
    (step indices, default :func:`~loopfree.method.sampler.default_key_steps`, Faster Diffusion's). Needs only configs,
    so commands check before loading weights."""
    if mode not in MODES:
        raise LoopfreeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    num_train = scheduler_config["num_train_timesteps"]
    if num_inference_steps is not None and not 1 <= num_inference_steps <= num_train:
        raise LoopfreeError(f"steps must be in 1..{num_train} (the scheduler's training timesteps), got {num_inference_steps}")
    if mode != "propagate":
        plan_key_steps(mode, key_steps, 0)  # refuses key steps: only propagate has them
    if mode == "loop":
        if timesteps is not None:
            raise LoopfreeError("timesteps are decoder timesteps of the loop_free mode (or DDIM timesteps of propagate), not of 'loop'")
        num_steps = num_inference_steps or DEFAULT_LOOP_STEPS
        decoder_timesteps(scheduler_config, num_steps)  # the loop's own DDIM plan stays within the schedule
        return StepPlan(num_steps)
    ts = _explicit_timesteps(timesteps, num_inference_steps, num_train)
    if mode == "propagate":
        ts = ts or decoder_timesteps(scheduler_config, num_inference_steps or DEFAULT_LOOP_STEPS)
        return StepPlan(len(ts), ts, key_steps=plan_key_steps(mode, key_steps, len(ts)))
    recorded = list(recorded) if recorded else None
    if ts is None and (num_inference_steps is None or (recorded and num_inference_steps == len(recorded))):
        ts = recorded or decoder_timesteps(scheduler_config, num_inference_steps or DEFAULT_DECODERS)
    elif ts is None:
        ts = decoder_timesteps(scheduler_config, num_inference_steps)
    if ts == recorded:
        return StepPlan(len(ts), ts, final_alpha_cumprod)
    if recorded:
        logger.warning(f"this student was distilled for decoder timesteps {short(recorded)}; sampling with {short(ts)} instead "
                       "(and the scheduler's own final ā)")
    return StepPlan(len(ts), ts)


def prompt_lists(prompt: str | list[str], negative_prompt: str | list[str] | None) -> tuple[list[str], list[str] | None]:
    """A call's prompts as a non-empty list, and its negative prompts as a list of the same length (or None)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise LoopfreeError("no prompt given")
    if negative_prompt is None:
        return prompts, None
    return prompts, [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)


def start_latents(latents: torch.Tensor | None, shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    """x_T of a call: ``latents`` (refused unless shaped ``shape``) or N(0, I) drawn from ``generator``; on ``device``
    in ``dtype``."""
    if latents is not None and tuple(latents.shape) != shape:
        raise LoopfreeError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    x_T = latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return x_T.to(device, dtype)


def check_guidance(guidance_scale: float) -> None:
    """Refuse a guidance scale that is not a finite number."""
    if not math.isfinite(guidance_scale):
        raise LoopfreeError(f"guidance must be a finite number, got {guidance_scale}")


def name_plain_class(save_directory: str | os.PathLike, plain_class: type) -> None:
    """Name the plain diffusers class in a saved folder's ``model_index.json``, so ``DiffusionPipeline.from_pretrained``
    loads the folder too."""
    index = os.path.join(save_directory, "model_index.json")
    with open(index) as f:
        config = json.load(f)
    config["_class_name"] = plain_class.__name__
    write_json(index, config)


class _LoopFreeMixin:
    """``__call__``, sidecar I/O and VAE decoding shared by the SD and SDXL variants."""

    decoder_timesteps: list[int] | None = None  # recorded by distillation; default K and τ for generation
    final_alpha_cumprod: float | None = None  # recorded ā_final override (one-step students: 1.0)
    distilled_from: str | None = None  # recorded: the student a fine-tuned student started from (distill --student-init)

    def encode_conditioning(
        self, prompt: list[str], negative_prompt: list[str] | None, n: int, guide: bool, device, size: tuple[int, int]
    ) -> tuple[Conditioning, Conditioning | None]:
        """Text (and SDXL added) conditioning for ``n`` images per prompt; the unconditional side if ``guide``."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        sidecar = os.path.join(str(pretrained_model_name_or_path), SIDECAR)
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                pipe.use_record(json.load(f))
        return pipe

    def use_record(self, recorded: dict) -> None:
        """Sample as the student that ``recorded`` (a ``loopfree.json``'s content) describes."""
        self.decoder_timesteps = recorded["decoder_timesteps"]
        self.final_alpha_cumprod = recorded.get("final_alpha_cumprod")
        self.distilled_from = recorded.get("distilled_from")

    def record(self) -> dict | None:
        """What ``loopfree.json`` holds of this pipeline: the decoder timesteps and ā_final (None: a teacher's)."""
        if self.decoder_timesteps is None:
            return None
        recorded = {"decoder_timesteps": list(self.decoder_timesteps), "final_alpha_cumprod": self.final_alpha_cumprod}
        if self.distilled_from is not None:
            recorded["distilled_from"] = self.distilled_from
        return recorded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        name_plain_class(save_directory, self._plain_class)
        recorded = self.record()
        if recorded is not None:
            write_json(os.path.join(save_directory, SIDECAR), recorded)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the sampler runs (here the UNet)."""
        return self.unet

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape of one image's x_T at ``height`` × ``width`` pixels, as ``latents`` takes it."""
        return (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def plan_steps(self, mode: str, num_inference_steps: int | None = None, timesteps: list[int] | None = None,
                   key_steps: list[int] | None = None) -> StepPlan:
        """What a call with these arguments samples (:func:`plan_steps` with this pipeline's scheduler and record)."""
        return plan_steps(mode, num_inference_steps, timesteps, self.scheduler.config, self.decoder_timesteps,
                          self.final_alpha_cumprod, key_steps)

    def denoise(self, mode: str, plan: StepPlan, x_T: torch.Tensor, cond: Conditioning, uncond: Conditioning | None = None,
                guidance_scale: float = 1.0) -> torch.Tensor:
        """x_T → x_0 latents in ``mode`` as ``plan`` (:meth:`plan_steps`) says, with the conditioning of
        :meth:`encode_conditioning` (``uncond`` for guidance)."""
        if mode == "loop_free":
            schedule = NoiseSchedule.from_scheduler(self.scheduler, plan.final_alpha_cumprod)
            return loop_free(self.unet, schedule, x_T, plan.timesteps, cond, uncond, guidance_scale)[0]
        with self.progress_bar(total=plan.num_steps) as bar:
            if mode == "propagate":
                schedule = NoiseSchedule.from_scheduler(self.scheduler)
                return propagate(self.unet, schedule, x_T, plan.timesteps, plan.key_steps, cond, uncond, guidance_scale,
                                 lambda i, eps: bar.update())
            return ddim_loop(self.unet, self.scheduler, x_T, plan.num_steps, cond, uncond, guidance_scale, lambda i: bar.update())

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents (as ``output_type="latent"`` returns them) to images of ``output_type``."""
        if output_type == "latent":
            return latents
        vae = self.vae
        # SDXL's VAE overflows in fp16: its config asks for the decode in fp32 (force_upcast), as diffusers' SDXL pipeline does
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            latents = latents.to(vae.dtype)
            if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
                mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        mode: str = "loop_free",
        key_steps: list[int] | None = None,
    ):
        """Generate images. ``num_inference_steps`` is K (decoders) in ``loop_free`` mode — by default the decoder
        timesteps the student recorded (see :meth:`plan_steps`) — and DDIM steps in ``loop`` and ``propagate``
        (default 50); ``key_steps``: the propagate mode's full-UNet steps (indices, the first is 0)."""
        plan = self.plan_steps(mode, num_inference_steps, timesteps, key_steps)
        check_guidance(guidance_scale)
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        check_size(height, width, self.vae_scale_factor, self.unet.config.sample_size * self.vae_scale_factor)

        device = self._execution_device
        guide = guidance_scale != 1.0
        cond, uncond = self.encode_conditioning(prompts, negatives, num_images_per_prompt, guide, device, (height, width))
        # x_T ~ N(0, I): DDIM's scale, whatever scheduler the directory ships (Euler's init_noise_sigma is not 1)
        shape = (len(prompts) * num_images_per_prompt, *self.latent_shape(height, width))
        x_T = start_latents(latents, shape, generator, device, cond.text.dtype)
        images = self.decode(self.denoise(mode, plan, x_T, cond, uncond, guidance_scale), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


class LoopFreePipeline(_LoopFreeMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x components, one-pass sampling."""

    _plain_class = StableDiffusionPipeline

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)

    def encode_conditioning(self, prompt, negative_prompt, n, guide, device, size):
        text, neg = self.encode_prompt(prompt, device, n, guide, negative_prompt)
        return Conditioning(text), (Conditioning(neg) if guide else None)


class LoopFreeXLPipeline(_LoopFreeMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL components (two text encoders, added conditioning), one-pass sampling."""

    _plain_class = StableDiffusionXLPipeline

    def encode_conditioning(self, prompt, negative_prompt, n, guide, device, size):
        text, neg, pooled, neg_pooled = self.encode_prompt(
            prompt, device=device, num_images_per_prompt=n, do_classifier_free_guidance=guide,
            negative_prompt=negative_prompt,
        )
        proj_dim = int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(size, (0, 0), size, dtype=text.dtype, text_encoder_projection_dim=proj_dim)
        time_ids = time_ids.to(device).repeat(text.shape[0], 1)
        cond = Conditioning(text, {"text_embeds": pooled, "time_ids": time_ids})
        uncond = Conditioning(neg, {"text_embeds": neg_pooled, "time_ids": time_ids}) if guide else None
        return cond, uncond
