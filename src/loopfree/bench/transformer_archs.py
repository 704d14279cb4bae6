"""Transformer denoisers by name, for benchmarks: the public models' configs, random weights (speed doesn't depend
on values), the inputs their pipelines feed them, and the three calls a cost table times::

    arch = TRANSFORMER_ARCHS["pixart-1024"]
    calls = arch.calls(arch.build(), batch=1, size=(1024, 1024), decoders=4, device="cpu", dtype=torch.float32)
    calls.full()                        # the model's own forward at τ_K
    calls.per_step(calls.shared(14))    # the one pass: shared part (14 of 28 blocks) once, 4 per-step parts batched

``build(reduced=True)`` keeps one block of each kind (:meth:`TransformerArch.block_kinds`), for costs by blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from loopfree.bench.archs import CLIP_L, OPENCLIP_BIGG, SD_VAE
from loopfree.method import split_flux, split_pixart, split_sd3

MODELS = {"pixart": PixArtTransformer2DModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}
# one block of each kind: PixArt's blocks are alike; SD3's last joint block has no text output (context_pre_only)
REDUCED = {"pixart": dict(num_layers=1), "sd3": dict(num_layers=2), "flux": dict(num_layers=1, num_single_layers=1)}

# google/t5-v1_1-xxl's encoder (4.76 B parameters): the T5 of PixArt-α, SD3 and FLUX.1
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
FLOW_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)  # SD3's and FLUX.1's
TEXT_ENCODERS = {"t5": (T5Config, T5EncoderModel), "clip": (CLIPTextConfig, CLIPTextModel),
                 "clip-projection": (CLIPTextConfig, CLIPTextModelWithProjection)}

# PixArt-alpha/PixArt-XL-2-{512x512,1024-MS} transformer/config.json (0.61 B parameters), also
# PixArtTransformer2DModel's defaults; sample_size 64 / 128, size conditioning (use_additional_conditions) at 1024 only
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, attention_bias=True, patch_size=2, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              caption_channels=4096)
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (2.03 B parameters)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192)
# black-forest-labs/FLUX.1-dev transformer/config.json (11.9 B parameters), also FluxTransformer2DModel's defaults
# but for the guidance embedding (FLUX.1-schnell: without)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@dataclass
class Calls:
    """One model's calls on fixed random inputs: its own forward, the split's shared part with N blocks, and the
    K per-step parts batched on the shared part's features."""

    full: Callable[[], torch.Tensor]
    shared: Callable[[int], object]
    per_step: Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class TransformerArch:
    """A transformer config, its pipeline's text length and latent shape, and its text encoders and VAE (counted by
    ``bench --train --memory``)."""

    family: str  # "pixart", "sd3" or "flux"
    config: dict = field(repr=False)  # the diffusers model class's arguments
    resolution: int  # native image size in pixels
    text_len: int  # context tokens per prompt, as the pipeline makes them
    text_encoders: tuple[tuple[str, dict], ...] = field(repr=False)  # (kind in TEXT_ENCODERS, config arguments)
    vae: dict = field(repr=False)
    vae_scale_factor: int = 8

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
              reduced: bool = False) -> torch.nn.Module:
        """The model with random weights; ``reduced``: with one block of each kind only."""
        torch.manual_seed(seed)
        with torch.device(device):
            model = MODELS[self.family](**(self.config | (REDUCED[self.family] if reduced else {})))
        return (model if dtype == torch.float32 else model.to(dtype)).eval()

    def build_text_encoders(self, device: str | torch.device = "meta") -> list[torch.nn.Module]:
        with torch.device(device):
            return [TEXT_ENCODERS[kind][1](TEXT_ENCODERS[kind][0](**cfg)) for kind, cfg in self.text_encoders]

    def build_vae(self, device: str | torch.device = "meta") -> AutoencoderKL:
        with torch.device(device):
            return AutoencoderKL(**self.vae)

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The block list N counts in (FLUX: double-stream, then single-stream)."""
        return split_flux.blocks(model) if self.family == "flux" else list(model.transformer_blocks)

    def block_kinds(self, reduced: bool = False) -> list[str]:
        """The kind of each block, in order; blocks of a kind cost the same."""
        c = self.config | (REDUCED[self.family] if reduced else {})
        if self.family == "flux":
            return ["double-stream"] * c["num_layers"] + ["single-stream"] * c["num_single_layers"]
        n = c["num_layers"]
        return ["DiT"] * n if self.family == "pixart" else ["joint"] * (n - 1) + ["joint, text pre-only"]

    def tokens(self, size: tuple[int, int]) -> int:
        """Image tokens of a ``size`` (height, width) image: latent pixels over the patch area."""
        side = 2 * self.vae_scale_factor  # a 2×2 patch per token (FLUX: 2×2 packed latents)
        return (size[0] // side) * (size[1] // side)

    def calls(self, model: torch.nn.Module, batch: int, size: tuple[int, int], decoders: int,
              device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Calls:
        """The three calls on random inputs for ``batch`` images of ``size`` (height, width) and K = ``decoders``."""
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        c, (h, w) = model.config, (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
        sigmas = [(decoders - k) / decoders for k in range(decoders)]  # σ_K = 1 > … ; costs don't depend on them
        full_t = lambda t: torch.full((batch,), t, device=device)  # noqa: E731
        text = rand(batch, self.text_len, c.caption_channels if self.family == "pixart" else c.joint_attention_dim)
        if self.family == "pixart":
            ts = [int(999 * s) for s in sigmas]
            mask = torch.ones(batch, self.text_len, device=device)
            sizes = None
            if model.use_additional_conditions:  # PixArtAlphaPipeline's size conditioning (1024² models)
                sizes = {"resolution": torch.tensor([[float(size[0]), float(size[1])]] * batch).to(device, dtype),
                         "aspect_ratio": torch.tensor([[size[0] / size[1]]] * batch).to(device, dtype)}
            x = rand(batch, c.in_channels, h, w)
            return Calls(
                lambda: model(x, text, timestep=full_t(ts[0]), added_cond_kwargs=sizes, encoder_attention_mask=mask).sample,
                lambda n: split_pixart.run_shared(model, x, ts[0], text, sizes, mask, n),
                lambda feats: split_pixart.run_per_step(model, feats, ts))
        pooled = rand(batch, c.pooled_projection_dim)
        if self.family == "sd3":
            ts = [1000.0 * s for s in sigmas]
            x = rand(batch, c.in_channels, h, w)
            return Calls(lambda: model(x, text, pooled, full_t(ts[0])).sample,
                         lambda n: split_sd3.run_shared(model, x, ts[0], text, pooled, n),
                         lambda feats: split_sd3.run_per_step(model, feats, ts))
        img_ids = torch.zeros(h // 2, w // 2, 3)  # FluxPipeline's packed 2×2 latents: (0, row, column) per token
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids, txt_ids = img_ids.reshape(-1, 3).to(device, dtype), torch.zeros(self.text_len, 3).to(device, dtype)
        guidance = 3.5 if c.guidance_embeds else None
        x = rand(batch, (h // 2) * (w // 2), c.in_channels)
        return Calls(
            lambda: model(x, text, pooled, full_t(sigmas[0]), img_ids, txt_ids,
                          None if guidance is None else full_t(guidance)).sample,
            lambda n: split_flux.run_shared(model, x, sigmas[0], text, pooled, img_ids, txt_ids, guidance, n),
            lambda feats: split_flux.run_per_step(model, feats, sigmas))


_T5 = ("t5", T5_XXL)
_TINY_T5 = ("t5", dict(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"))
_TINY_VAE = dict(SD_VAE, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4)

TRANSFORMER_ARCHS: dict[str, TransformerArch] = {
    "pixart-512": TransformerArch("pixart", PIXART | dict(sample_size=64), 512, 120, (_T5,), SD_VAE),
    "pixart-1024": TransformerArch("pixart", PIXART | dict(sample_size=128), 1024, 120, (_T5,), SD_VAE),
    # SD3's context: CLIP-L and CLIP-G's 77 tokens (their states side by side, zero-padded to 4096) + T5's 256
    "sd3-medium": TransformerArch("sd3", SD3_MEDIUM, 1024, 77 + 256,
                                  (("clip-projection", CLIP_L), ("clip-projection", OPENCLIP_BIGG), _T5), FLOW_VAE),
    # FluxPipeline: CLIP-L's pooled embedding and T5's 512 tokens (max_sequence_length, FLUX.1-dev)
    "flux-dev": TransformerArch("flux", FLUX_DEV, 1024, 512, (("clip", CLIP_L), _T5), FLOW_VAE),
    # a few thousand parameters each, for tests and quick looks
    "pixart-tiny": TransformerArch("pixart", dict(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=4, cross_attention_dim=12,
                                                  sample_size=8, patch_size=2, caption_channels=10, use_additional_conditions=True),
                                   64, 6, (_TINY_T5,), _TINY_VAE),
    "sd3-tiny": TransformerArch("sd3", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4, num_attention_heads=2,
                                            joint_attention_dim=12, caption_projection_dim=8, pooled_projection_dim=6,
                                            out_channels=4, pos_embed_max_size=16), 64, 5, (_TINY_T5,), _TINY_VAE),
    "flux-tiny": TransformerArch("flux", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                                              num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                                              guidance_embeds=True, axes_dims_rope=(2, 2, 4)), 64, 5, (_TINY_T5,), _TINY_VAE),
}
