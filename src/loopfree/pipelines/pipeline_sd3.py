"""``LoopFreeSD3Pipeline``: diffusers' ``StableDiffusion3Pipeline`` (SD3, SD3.5) sampling in one pass (MMDiT, rectified flow).

``mode="loop_free"``: the prompt encoded once (two CLIPs, and T5 where the folder has it — ``text_encoder_3`` may be
None, as in diffusers), :func:`loopfree.method.split_sd3.loop_free` — the shared part at σ_K, the K per-step parts
batched, Euler over the decoder σ's (recorded, or the scheduler's for K, shifted as the pipeline shifts them);
``mode="loop"``: ``StableDiffusion3Pipeline.__call__`` itself (the trailing zero text rows run as one, exactly)::

    pipe = LoopFreeSD3Pipeline.from_pretrained("models/sd3-medium", text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red cat", num_inference_steps=4, guidance_scale=4.5).images[0]
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from loopfree.method import flow, repeated_tokens, split_sd3
from loopfree.method.sampler import Conditioning
from loopfree.pipelines.pipeline import StepPlan
from loopfree.pipelines.transformer_pipeline import TransformerPipelineMixin


class LoopFreeSD3Pipeline(TransformerPipelineMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 components (CLIP-L, CLIP-G, optional T5; joint MMDiT blocks), one-pass sampling."""

    _plain_class = StableDiffusion3Pipeline
    family = "sd3"

    def encode_conditioning(self, prompt, negative_prompt, n, guide, device, size):
        """(cond, uncond or None): the CLIP (+ T5) sequence and the pooled embeddings, as the SD3 pipeline encodes them."""
        text, neg, pooled, neg_pooled = self.encode_prompt(
            prompt, None, None, device=device, num_images_per_prompt=n, do_classifier_free_guidance=guide,
            negative_prompt=negative_prompt)
        return (Conditioning(text, {"pooled_projections": pooled}),
                Conditioning(neg, {"pooled_projections": neg_pooled}) if guide else None)

    def _one_pass(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T) -> torch.Tensor:
        cond, uncond = self.encode_conditioning(prompts, negatives, n, guidance_scale > 1.0, self._execution_device, None)
        p = self.transformer.config.patch_size
        sigmas = plan.sigmas or flow.decoder_sigmas(self.scheduler.config, plan.num_steps,
                                                    image_seq_len=(x_T.shape[-2] // p) * (x_T.shape[-1] // p))
        return split_sd3.loop_free(self.transformer, x_T.to(cond.text.dtype), sigmas, cond, uncond, guidance_scale,
                                   self.shared_blocks, num_train_timesteps=self.scheduler.config.num_train_timesteps)[0]

    def _loop(self, prompts, negatives, height, width, plan: StepPlan, guidance_scale, n, x_T) -> torch.Tensor:
        """``StableDiffusion3Pipeline.__call__`` on the prompts encoded here, their trailing zero text rows (no T5) run
        as one (:func:`~loopfree.method.repeated_tokens.compact_zero_rows`, exact)."""
        cond, uncond = self.encode_conditioning(prompts, negatives, n, guidance_scale > 1.0, self._execution_device, None)
        both = Conditioning.cat([uncond, cond]) if uncond is not None else cond  # one count for both halves of the guided batch
        both, attention = repeated_tokens.compact_zero_rows(self.transformer, both)
        neg, text = both.text.split(len(cond.text)) if uncond is not None else (None, both.text)
        return StableDiffusion3Pipeline.__call__(
            self, prompt_embeds=text, negative_prompt_embeds=neg, pooled_prompt_embeds=cond.added["pooled_projections"],
            negative_pooled_prompt_embeds=uncond.added["pooled_projections"] if uncond is not None else None, height=height, width=width,
            num_inference_steps=plan.num_steps, guidance_scale=guidance_scale, latents=x_T, output_type="latent",
            joint_attention_kwargs=attention).images
