"""``LoopFreePixArtPipeline``: diffusers' ``PixArtAlphaPipeline`` sampling in one pass (DiT, ε-prediction).

``mode="loop_free"``: the caption encoded by T5 once, :func:`loopfree.method.split_pixart.loop_free` — the shared
part at τ_K, the K per-step parts batched, the DDIM combination over the decoder timesteps (recorded, or the
scheduler's DDIM timesteps for K); ``mode="loop"``: ``PixArtAlphaPipeline.__call__`` itself. Both take the size
asked for as it is (no resolution binning) and the prompt as given (``clean_caption=False``)::

    pipe = LoopFreePixArtPipeline.from_pretrained("models/pixart")
    x0 = pipe("a red cat", num_inference_steps=4, output_type="latent").images
"""

from __future__ import annotations

import torch
from diffusers import PixArtAlphaPipeline

from loopfree.method import split_pixart
from loopfree.method.sampler import Conditioning
from loopfree.method.schedule import NoiseSchedule
from loopfree.pipelines.pipeline import StepPlan
from loopfree.pipelines.transformer_pipeline import TransformerPipelineMixin

MAX_TOKENS = 120  # T5 tokens of a caption: PixArt-α's (its pipeline's default)


class LoopFreePixArtPipeline(TransformerPipelineMixin, PixArtAlphaPipeline):
    """PixArt-α components (T5 text encoder, a DiT with adaLN-single), one-pass sampling."""

    _plain_class = PixArtAlphaPipeline
    family = "pixart"
    latent_shift = False  # PixArtAlphaPipeline decodes latents / scaling_factor

    def _conditioning(self, prompts, negatives, n, guide, height, width) -> tuple[Conditioning, Conditioning | None]:
        """Caption tokens and mask (and, for size-conditioned models, resolution and aspect ratio) as the pipeline makes them."""
        text, mask, neg, neg_mask = self.encode_prompt(
            prompts, guide, negative_prompt=negatives or "", num_images_per_prompt=n, device=self._execution_device,
            clean_caption=False, max_sequence_length=MAX_TOKENS)
        sizes = {}
        if self.transformer.use_additional_conditions:
            rows = text.shape[0]
            sizes = {"resolution": torch.tensor([height, width]).repeat(rows, 1).to(text),
                     "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(text)}
        cond = Conditioning(text, {"attention_mask": mask, **sizes})
        return cond, (Conditioning(neg, {"attention_mask": neg_mask, **sizes}) if guide else None)

    def _one_pass(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T) -> torch.Tensor:
        cond, uncond = self._conditioning(prompts, negatives, n, guidance_scale > 1.0, height, width)
        schedule = NoiseSchedule.from_scheduler(self.scheduler, plan.final_alpha_cumprod)
        return split_pixart.loop_free(self.transformer, schedule, x_T, plan.timesteps, cond, uncond, guidance_scale,
                                      self.shared_blocks)[0]

    def _loop(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T) -> torch.Tensor:
        return PixArtAlphaPipeline.__call__(
            self, prompts, negative_prompt=negatives or "", num_inference_steps=plan.num_steps, guidance_scale=guidance_scale,
            num_images_per_prompt=n, height=height, width=width, latents=x_T, output_type="latent", clean_caption=False,
            use_resolution_binning=False, max_sequence_length=MAX_TOKENS).images
