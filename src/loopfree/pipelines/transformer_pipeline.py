"""What the transformer pipelines (PixArt-α, SD3, FLUX) share: the image sizes they take, step plans, ``loopfree.json``
and ``__call__``.

Each family's pipeline (:mod:`~loopfree.pipelines.pipeline_pixart`, :mod:`~loopfree.pipelines.pipeline_sd3`,
:mod:`~loopfree.pipelines.pipeline_flux`) is the diffusers pipeline with another ``__call__``: ``mode="loop_free"``
runs the family's one pass (``method/split_*.py``: the shared part — patch embedding and the first N blocks — once
at τ_K, the per-step part for the K decoders as one batch); ``mode="loop"`` is the diffusers pipeline's own call,
its own scheduler for ``num_inference_steps`` steps, on the same x_T. ``save_pretrained`` writes a folder the plain
diffusers class loads, plus ``loopfree.json``: N (``shared_blocks``) and any recorded decoder timesteps (PixArt) or
decoder σ's (SD3, FLUX)::

    pipe = load_pipeline("models/pixart")
    image = pipe("a red cat", num_inference_steps=4).images[0]   # K = 4 decoders, N = L // 2 unless recorded

x_T (``latents``) is (B, C, H/f, W/f) in every family, f the VAE's scale factor — FLUX's too, packed here as
FluxPipeline packs its latents — and so are the latents ``output_type="latent"`` returns. Guidance is the diffusers
pipeline's: classifier-free for ``guidance_scale > 1`` (PixArt, SD3); FLUX's ``guidance_scale`` is the embedded
guidance of guidance-distilled models (FLUX-dev), its classifier-free guidance ``true_cfg_scale`` with a negative prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging

from loopfree.method.flow import check_sigmas
from loopfree.method.transformer_split import check_shared_blocks
from loopfree.pipelines.families import FAMILIES
from loopfree.pipelines.pipeline import (DEFAULT_DECODERS, DEFAULT_LOOP_STEPS, MAX_SIDE_FACTOR, SIDECAR, StepPlan,
                                         check_guidance, check_size, name_plain_class, plan_key_steps, plan_steps,
                                         prompt_lists, start_latents)
from loopfree.utils.errors import LoopfreeError, short
from loopfree.utils.outputs import write_json
from loopfree.utils.vocabulary import MODES

logger = logging.get_logger(__name__)

FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default latent side (its transformer config has no sample_size)


@dataclass(frozen=True)
class Geometry:
    """The image sizes a transformer pipeline takes, from its transformer's config and the VAE's scale factor."""

    default_size: int  # pixels: the model's native side
    multiple: int  # pixels: every side is a positive multiple of this (VAE factor × patch)
    max_side: int  # pixels
    num_blocks: int  # L, what the shared blocks N count in (FLUX: double- then single-stream blocks)

    def check(self, height: int, width: int) -> None:
        check_size(height, width, self.multiple, self.default_size)
        for name, v in (("height", height), ("width", width)):
            if v > self.max_side:
                raise LoopfreeError(f"{name} {v} is over this model's limit of {self.max_side} px (its position embedding's size)")


def geometry(family: str, config: Mapping, vae_scale_factor: int) -> Geometry:
    """:class:`Geometry` of a ``family`` transformer with ``config`` (a config.json's content or ``model.config``)."""
    if family == "flux":  # FluxPipeline packs 2×2 latent patches into a token
        patch, sample, blocks = 2, FLUX_SAMPLE_SIZE, config["num_layers"] + config["num_single_layers"]
    else:
        patch, sample, blocks = config["patch_size"], config["sample_size"], config["num_layers"]
    default = int(sample) * vae_scale_factor
    max_side = MAX_SIDE_FACTOR * default
    if config.get("pos_embed_max_size"):  # SD3: positions are cropped from a fixed grid
        max_side = min(max_side, config["pos_embed_max_size"] * patch * vae_scale_factor)
    return Geometry(default, vae_scale_factor * patch, max_side, int(blocks))


def plan_transformer_steps(family: str, mode: str, num_inference_steps: int | None, timesteps: list[int] | None,
                           key_steps: list[int] | None, scheduler_config, recorded: list | None,
                           sigmas: list[float] | None = None) -> StepPlan:
    """What a call samples (configs only, so commands check before loading). PixArt: as the UNet pipelines'
    :func:`~loopfree.pipelines.pipeline.plan_steps`, with the ``recorded`` decoder timesteps. SD3, FLUX: K decoder σ's —
    given ``sigmas``, the ``recorded`` ones when K is theirs (or not given), else the scheduler's for K, which FLUX
    shifts by resolution, so the pipeline makes them at the call's size (``StepPlan.sigmas`` None). ``loop``: the
    diffusers pipeline with ``num_inference_steps`` (default 50); there is no ``propagate`` mode."""
    if mode == "propagate":
        raise LoopfreeError("the propagate mode (encoder propagation) is for UNet pipelines; transformers sample in loop_free or loop")
    if family == "pixart":
        if sigmas is not None:
            raise LoopfreeError("sigmas are the decoder steps of rectified-flow models (SD3, FLUX); PixArt takes timesteps")
        return plan_steps(mode, num_inference_steps, timesteps, scheduler_config, recorded, None, key_steps)
    if mode not in MODES:
        raise LoopfreeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    plan_key_steps(mode, key_steps, 0)  # refuses key steps
    if timesteps is not None:
        raise LoopfreeError(f"{FAMILIES[family].name} samples by σ (rectified flow): give the number of steps, not timesteps")
    num_train = scheduler_config["num_train_timesteps"]
    if num_inference_steps is not None and not 1 <= num_inference_steps <= num_train:
        raise LoopfreeError(f"steps must be in 1..{num_train} (the scheduler's training timesteps), got {num_inference_steps}")
    if mode == "loop":
        if sigmas is not None:
            raise LoopfreeError("sigmas are decoder σ's of the loop_free mode, not of 'loop'")
        return StepPlan(num_inference_steps or DEFAULT_LOOP_STEPS)
    recorded = list(recorded) if recorded else None
    if sigmas is not None:
        chosen = check_sigmas(sigmas)
        if num_inference_steps is not None and num_inference_steps != len(chosen):
            raise LoopfreeError(f"{len(chosen)} sigmas given but steps is {num_inference_steps}")
    elif num_inference_steps is None or (recorded and num_inference_steps == len(recorded)):
        chosen = recorded
    else:
        chosen = None
    if recorded and chosen != recorded:
        instead = short(chosen) if chosen else f"the scheduler's {num_inference_steps} σ's"
        logger.warning(f"this student was distilled for decoder sigmas {short(recorded)}; sampling with {instead} instead")
    return StepPlan(len(chosen) if chosen else num_inference_steps or DEFAULT_DECODERS, sigmas=chosen)


class TransformerPipelineMixin:
    """``__call__``, ``loopfree.json`` and VAE decoding shared by the transformer families. A family class sets
    ``family`` and ``_plain_class`` and implements ``_one_pass`` and ``_loop`` (x_T → x_0 latents)."""

    family: str  # a key of loopfree.pipelines.families.FAMILIES
    _plain_class: type
    latent_shift: bool = True  # the pipeline adds the VAE's shift_factor before decoding (SD3, FLUX)
    decoder_timesteps: list[int] | None = None  # PixArt: recorded decoder timesteps
    decoder_sigmas: list[float] | None = None  # SD3, FLUX: recorded decoder σ's
    shared_blocks: int | None = None  # recorded N; None: the split's default (method.transformer_split)

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
        self.decoder_timesteps = recorded.get("decoder_timesteps")
        self.decoder_sigmas = recorded.get("decoder_sigmas")
        self.shared_blocks = recorded.get("shared_blocks")

    def record(self) -> dict:
        """What ``loopfree.json`` holds of this pipeline: N and any decoder timesteps or σ's."""
        recorded: dict[str, Any] = {"shared_blocks": self.num_shared_blocks}
        for key in ("decoder_timesteps", "decoder_sigmas"):
            if getattr(self, key) is not None:
                recorded[key] = list(getattr(self, key))
        return recorded

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        name_plain_class(save_directory, self._plain_class)
        write_json(os.path.join(save_directory, SIDECAR), self.record())

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the sampler runs (here the transformer)."""
        return self.transformer

    @property
    def geometry(self) -> Geometry:
        return geometry(self.family, self.transformer.config, self.vae_scale_factor)

    @property
    def num_shared_blocks(self) -> int:
        """N: the recorded ``shared_blocks``, or the split's default for this model's L blocks."""
        return check_shared_blocks(self.shared_blocks, self.geometry.num_blocks)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape of one image's x_T at ``height`` × ``width`` pixels, as ``latents`` takes it."""
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def plan_steps(self, mode: str, num_inference_steps: int | None = None, timesteps: list[int] | None = None,
                   key_steps: list[int] | None = None, sigmas: list[float] | None = None) -> StepPlan:
        """What a call with these arguments samples (:func:`plan_transformer_steps` with this pipeline's record)."""
        recorded = self.decoder_timesteps if self.family == "pixart" else self.decoder_sigmas
        return plan_transformer_steps(self.family, mode, num_inference_steps, timesteps, key_steps, self.scheduler.config,
                                      recorded, sigmas)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents (as ``output_type="latent"`` returns them) to images of ``output_type``, as the family's pipeline decodes."""
        if output_type == "latent":
            return latents
        config = self.vae.config
        latents = latents.to(self.vae.dtype) / config.scaling_factor
        if self.latent_shift:
            latents = latents + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
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
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        mode: str = "loop_free",
        key_steps: list[int] | None = None,
        **options: Any,
    ):
        """Generate images. ``num_inference_steps`` is K (decoders) in ``loop_free`` mode — by default the recorded
        decoder steps (:meth:`plan_steps`) — and the diffusers pipeline's steps in ``loop`` (default 50);
        ``timesteps`` (PixArt) or ``sigmas`` (SD3, FLUX): explicit decoder steps; ``key_steps``: refused (no
        propagate mode). ``options``: the family's own (FLUX: ``true_cfg_scale``)."""
        plan = self.plan_steps(mode, num_inference_steps, timesteps, key_steps, sigmas)
        check_guidance(guidance_scale)
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        size = self.geometry
        height, width = height or size.default_size, width or size.default_size
        size.check(height, width)
        shape = (len(prompts) * num_images_per_prompt, *self.latent_shape(height, width))
        x_T = start_latents(latents, shape, generator, self._execution_device, self.transformer.dtype)
        run = self._loop if mode == "loop" else self._one_pass
        x0 = run(prompts, negatives, height, width, plan, guidance_scale, num_images_per_prompt, x_T, **options)
        images = self.decode(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
