"""``LoopFreePipeline`` / ``LoopFreeXLPipeline``: diffusers pipelines that sample in one pass.

They are the Stable Diffusion (XL) pipelines with a different ``__call__``: ``mode="loop_free"`` runs the
encoder once and K decoders in parallel (SPEC §2); ``mode="loop"`` is the ordinary DDIM loop, a full UNet
pass per step, so the same object serves as teacher. ``save_pretrained`` writes a directory that plain
``StableDiffusionPipeline.from_pretrained`` loads, plus ``loopfree.json`` with the decoder timesteps::

    pipe = load_pipeline("out/student")
    image = pipe("a red circle on a white background", generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from loopfree.sampler import Conditioning, NoiseSchedule, ddim_loop, decoder_timesteps, loop_free

SIDECAR = "loopfree.json"
MODES = ("loop_free", "loop")


def check_size(height: int, width: int, vae_scale_factor: int) -> None:
    """Image sizes the VAE can decode: positive multiples of its scale factor."""
    for name, v in (("height", height), ("width", width)):
        if v < vae_scale_factor or v % vae_scale_factor:
            raise ValueError(f"{name} must be a positive multiple of {vae_scale_factor} for this model, got {v}")


class _LoopFreeMixin:
    """``__call__``, sidecar I/O and VAE decoding shared by the SD and SDXL variants."""

    decoder_timesteps: list[int] | None = None  # recorded by distillation; default K and τ for generation
    final_alpha_cumprod: float | None = None  # recorded ā_final override (one-step students: 1.0)

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
                recorded = json.load(f)
            pipe.decoder_timesteps = recorded["decoder_timesteps"]
            pipe.final_alpha_cumprod = recorded.get("final_alpha_cumprod")
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, **kwargs)
        # name the plain diffusers class so DiffusionPipeline.from_pretrained loads it too
        index = os.path.join(save_directory, "model_index.json")
        with open(index) as f:
            config = json.load(f)
        config["_class_name"] = self._plain_class.__name__
        with open(index, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if self.decoder_timesteps is not None:
            with open(os.path.join(save_directory, SIDECAR), "w") as f:
                json.dump({"decoder_timesteps": list(self.decoder_timesteps), "final_alpha_cumprod": self.final_alpha_cumprod}, f, indent=2)

    def default_timesteps(self, num_steps: int) -> list[int]:
        """The recorded decoder timesteps when K matches them, else the scheduler's DDIM timesteps."""
        if self.decoder_timesteps is not None and len(self.decoder_timesteps) == num_steps:
            return list(self.decoder_timesteps)
        return decoder_timesteps(self.scheduler.config, num_steps)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents (as ``output_type="latent"`` returns them) to images of ``output_type``."""
        if output_type == "latent":
            return latents
        vae = self.vae
        latents = latents.to(vae.dtype)
        if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        mode: str = "loop_free",
    ):
        """Generate images. ``num_inference_steps`` is K (decoders) in ``loop_free`` mode, DDIM steps in ``loop``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        check_size(height, width, self.vae_scale_factor)

        device = self._execution_device
        guide = guidance_scale != 1.0
        cond, uncond = self.encode_conditioning(prompts, negatives, num_images_per_prompt, guide, device, (height, width))
        # x_T ~ N(0, I): DDIM's scale, whatever scheduler the directory ships (Euler's init_noise_sigma is not 1)
        shape = (len(prompts) * num_images_per_prompt, self.unet.config.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        x_T = latents if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=cond.text.dtype)
        x_T = x_T.to(device, cond.text.dtype)
        if mode == "loop_free":
            schedule = NoiseSchedule.from_scheduler(self.scheduler, self.final_alpha_cumprod)
            ts = list(timesteps) if timesteps is not None else self.default_timesteps(num_inference_steps)
            x0, _ = loop_free(self.unet, schedule, x_T, ts, cond, uncond, guidance_scale)
        else:
            scheduler = DDIMScheduler.from_config(self.scheduler.config)
            with self.progress_bar(total=num_inference_steps) as bar:
                x0 = ddim_loop(self.unet, scheduler, x_T, num_inference_steps, cond, uncond, guidance_scale, lambda i: bar.update())
        images = self.decode(x0, output_type)
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


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline directory's config files say, read without loading any weights."""

    xl: bool  # two text encoders and added conditioning
    vae_scale_factor: int
    default_size: int  # UNet sample size × VAE scale factor, in pixels


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def inspect_pipeline(path: str | os.PathLike) -> PipelineInfo:
    """Check that ``path`` is a local Stable Diffusion (XL) pipeline directory and read its shapes."""
    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{path!r} is not a diffusers pipeline directory (no model_index.json)")
    components = _read_json(index)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if name not in components or not os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"{path!r} is not a Stable Diffusion pipeline (no {name} component)")
    vae_scale = 2 ** (len(_read_json(os.path.join(path, "vae", "config.json"))["block_out_channels"]) - 1)
    sample_size = _read_json(os.path.join(path, "unet", "config.json"))["sample_size"]
    return PipelineInfo("text_encoder_2" in components, vae_scale, sample_size * vae_scale)


def load_pipeline(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LoopFreePipeline | LoopFreeXLPipeline:
    """Load a local Stable Diffusion (XL) pipeline directory as the matching loop-free pipeline."""
    info = inspect_pipeline(path)
    cls = LoopFreeXLPipeline if info.xl else LoopFreePipeline
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    if cls is LoopFreePipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls.from_pretrained(path, **kwargs)
