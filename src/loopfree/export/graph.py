"""The whole one-pass sampler as one module without Python control flow between steps: token ids and x_T in,
uint8 images out — text encoder(s), the encoder once, the K decoders as one batch, the fixed DDIM combination and the
VAE decoder. It is what ``loopfree export`` traces (:mod:`loopfree.export.exporter`)::

    graph = SamplerGraph.from_pipeline(load_pipeline("out/student"), height=128, width=128)
    images = graph(input_ids, x_T)  # (B, 128, 128, 3) uint8

Unguided (students sample at guidance 1), Stable Diffusion 1.x/2.x and XL students (SDXL's pooled text and
time ids are built inside; the time ids are constants of the exported resolution).
"""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor

from loopfree.utils.errors import LoopfreeError
from loopfree.method.sampler import Conditioning, loop_free
from loopfree.method.schedule import NoiseSchedule


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1], (B, 3, H, W) → (B, H, W, 3) uint8, as diffusers' postprocess + ``numpy_to_pil`` do."""
    return (VaeImageProcessor.denormalize(image) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class SamplerGraph(torch.nn.Module):
    """A loop-free student, prompt tokens and x_T → images, as one forward (see the module docstring)."""

    def __init__(self, pipe, timesteps: list[int], final_alpha_cumprod: float | None, height: int, width: int):
        super().__init__()
        if pipe.vae.config.get("latents_mean") is not None:
            raise LoopfreeError("VAEs with latents_mean/std are not exported yet")
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.xl = hasattr(pipe, "text_encoder_2")
        self.schedule = NoiseSchedule.from_scheduler(pipe.scheduler, final_alpha_cumprod)
        self.timesteps = list(timesteps)
        self.latent_shape = pipe.latent_shape(height, width)
        if self.xl:  # SDXL's micro-conditioning: original size, crop (0, 0), target size — fixed by the resolution
            dim, size = self.text_encoder_2.config.projection_dim, (height, width)
            ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=dim)
            self.register_buffer("time_ids", ids, persistent=False)

    @classmethod
    def from_pipeline(cls, pipe, height: int | None = None, width: int | None = None) -> "SamplerGraph":
        """The graph of a loaded student at its recorded decoder timesteps (K = 4 DDIM timesteps if it records none)."""
        plan = pipe.plan_steps("loop_free")
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return cls(pipe, plan.timesteps, plan.final_alpha_cumprod, height or native, width or native)

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "x_T", "input_ids_2"] if self.xl else ["input_ids", "x_T"]

    def conditioning(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> Conditioning:
        """The text conditioning as the pipelines' ``encode_prompt`` computes it (no clip skip)."""
        if not self.xl:
            return Conditioning(self.text_encoder(input_ids)[0])
        states, pooled = [], None
        for encoder, ids in ((self.text_encoder, input_ids), (self.text_encoder_2, input_ids_2)):
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        time_ids = self.time_ids.to(states[0].dtype).expand(input_ids.shape[0], -1)
        return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def forward(self, input_ids: torch.Tensor, x_T: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids, (B, C, h, w) x_T (SDXL: and the second tokenizer's ids) → (B, H, W, 3) uint8."""
        cond = self.conditioning(input_ids, input_ids_2)
        x0 = loop_free(self.unet, self.schedule, x_T, self.timesteps, Conditioning(cond.text.to(x_T.dtype), cond.added))[0]
        latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor
        return to_uint8(self.vae.decode(latents).sample.float())
