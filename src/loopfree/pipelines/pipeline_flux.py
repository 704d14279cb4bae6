"""``LoopFreeFluxPipeline``: diffusers' ``FluxPipeline`` (FLUX.1 schnell, dev) sampling in one pass (MMDiT, rectified flow).

``mode="loop_free"``: the prompt encoded once (CLIP and T5), :func:`loopfree.method.split_flux.loop_free` on the
packed latents — the shared part at σ_K, the K per-step parts batched, Euler over the decoder σ's (recorded, or the
pipeline's for K, shifted by resolution); ``mode="loop"``: ``FluxPipeline.__call__`` itself. x_T is the unpacked
latent (B, C, H/8, W/8), packed into 2×2 patches as FluxPipeline packs the noise it draws, so a generator gives
both the same x_T. ``guidance_scale``: FLUX-dev's embedded guidance (ignored by schnell, as by FluxPipeline);
``true_cfg_scale`` with a negative prompt: classifier-free guidance::

    pipe = LoopFreeFluxPipeline.from_pretrained("models/flux-schnell")
    image = pipe("a red cat", num_inference_steps=4).images[0]
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from loopfree.method import flow, split_flux
from loopfree.method.sampler import Conditioning
from loopfree.pipelines.pipeline import StepPlan
from loopfree.pipelines.transformer_pipeline import TransformerPipelineMixin


class LoopFreeFluxPipeline(TransformerPipelineMixin, FluxPipeline):
    """FLUX.1 components (CLIP-L, T5; double- and single-stream blocks), one-pass sampling."""

    _plain_class = FluxPipeline
    family = "flux"

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The unpacked latent of one image: (C, H/8, W/8), C a quarter of the transformer's packed channels."""
        return (self.transformer.config.in_channels // 4, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        return self._pack_latents(x, *x.shape)

    def _unpack(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self._unpack_latents(x, height, width, self.vae_scale_factor)

    def _one_pass(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T,
                  true_cfg_scale: float = 1.0) -> torch.Tensor:
        device = self._execution_device
        text, pooled, text_ids = self.encode_prompt(prompts, device=device, num_images_per_prompt=n)
        cond, uncond = Conditioning(text, {"pooled_projections": pooled}), None
        if true_cfg_scale > 1 and negatives is not None:  # FluxPipeline's true CFG
            neg, neg_pooled, _ = self.encode_prompt(negatives, device=device, num_images_per_prompt=n)
            uncond = Conditioning(neg, {"pooled_projections": neg_pooled})
        x, image_ids = self.prepare_latents(x_T.shape[0], x_T.shape[1], height, width, text.dtype, device, None, self._pack(x_T))
        sigmas = plan.sigmas or flow.decoder_sigmas(self.scheduler.config, plan.num_steps, image_seq_len=x.shape[1],
                                                    pipeline="flux")
        guidance = guidance_scale if self.transformer.config.guidance_embeds else None
        x0, _ = split_flux.loop_free(self.transformer, x, sigmas, cond, image_ids, text_ids, guidance, uncond,
                                     true_cfg_scale, self.shared_blocks)
        return self._unpack(x0, height, width)

    def _loop(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T,
              true_cfg_scale: float = 1.0) -> torch.Tensor:
        out = FluxPipeline.__call__(
            self, prompts, negative_prompt=negatives, true_cfg_scale=true_cfg_scale, height=height, width=width,
            num_inference_steps=plan.num_steps, guidance_scale=guidance_scale, num_images_per_prompt=n,
            latents=self._pack(x_T), output_type="latent").images
        return self._unpack(out, height, width)
