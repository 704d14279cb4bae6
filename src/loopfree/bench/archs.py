"""Pipeline architectures by name, for benchmarks: the real shapes, random weights (speed doesn't depend on values).

A UNet config, and the text encoder(s) and VAE of the same pipeline for end-to-end timings, all as data::

    unet = ARCHS["sd21"].build()
    encoders, vae = ARCHS["sd21"].build_text_encoders(), ARCHS["sd21"].build_vae()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


def _clip(hidden: int, layers: int, heads: int, act: str = "gelu", projection: int = 768, **kw) -> dict:
    """CLIPTextConfig arguments: 49408 tokens, 77 positions, an MLP 4× wide, unless ``kw`` says otherwise."""
    return dict(dict(vocab_size=49408, max_position_embeddings=77, intermediate_size=4 * hidden), hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act, projection_dim=projection) | kw


CLIP_L = _clip(768, 12, 12, "quick_gelu")  # openai/clip-vit-large-patch14: SD1.5, SDXL's first encoder
OPENCLIP_H = _clip(1024, 23, 16, projection=512)  # SD2.x: OpenCLIP ViT-H/14 minus its last layer
OPENCLIP_BIGG = _clip(1280, 32, 20, projection=1280)  # SDXL's second encoder (with the pooled projection)
SD_VAE = dict(  # AutoencoderKL of SD1.5/SD2.1/SDXL (SDXL: another scaling factor, same shape)
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def _bench_vae(width: int, groups: int) -> dict:
    """A small AutoencoderKL with SD's 8× down-scaling, for the small benchmark architectures."""
    return dict(SD_VAE, block_out_channels=(width,) * 4, layers_per_block=1, norm_num_groups=groups)


def _placed(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to(device).eval()
    return model if dtype == torch.float32 else model.to(dtype)


@dataclass(frozen=True)
class Arch:
    """A UNet config plus the text encoders, VAE and conditioning shapes of its pipeline."""

    unet: dict = field(repr=False)
    resolution: int  # native image size in pixels
    text_encoders: tuple[dict, ...] = field(repr=False)  # CLIPTextConfig arguments; SDXL: the last one is pooled
    vae: dict = field(repr=False)  # AutoencoderKL arguments
    text_len: int = 77  # tokens per prompt
    vae_scale_factor: int = 8
    pooled_dim: int | None = None  # SDXL: pooled text embedding size (added conditioning)

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> UNet2DConditionModel:
        torch.manual_seed(seed)
        return _placed(UNet2DConditionModel(**self.unet), device, dtype)

    def build_text_encoders(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> list:
        """The CLIP text encoder(s); with added conditioning the last one carries the pooled projection."""
        torch.manual_seed(seed)
        classes = [CLIPTextModel] * len(self.text_encoders)
        if self.pooled_dim is not None:
            classes[-1] = CLIPTextModelWithProjection
        return [_placed(cls(CLIPTextConfig(**cfg)), device, dtype) for cls, cfg in zip(classes, self.text_encoders)]

    def build_vae(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> AutoencoderKL:
        torch.manual_seed(seed)
        return _placed(AutoencoderKL(**self.vae), device, dtype)

    def build_tiny_vae(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> AutoencoderTiny:
        """TAESD (diffusers' ``AutoencoderTiny`` defaults: madebyollin/taesd's shape, 8× like every arch here)."""
        torch.manual_seed(seed)
        return _placed(AutoencoderTiny(latent_channels=self.unet.get("in_channels", 4)), device, dtype)

    def token_ids(self, batch: int, device, seed: int = 0) -> torch.Tensor:
        """Random token ids (speed doesn't depend on which), ``text_len`` per prompt."""
        vocab = self.text_encoders[0]["vocab_size"]
        return torch.randint(0, vocab, (batch, self.text_len), generator=torch.Generator().manual_seed(seed)).to(device)

    def inputs(self, batch: int, size: tuple[int, int], device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """Random latents, text states and (SDXL) added conditioning for ``batch`` images of ``size`` (height, width)."""
        g = torch.Generator().manual_seed(seed)
        height, width = size
        x = torch.randn(batch, self.unet.get("in_channels", 4), height // self.vae_scale_factor, width // self.vae_scale_factor, generator=g)
        text = torch.randn(batch, self.text_len, self.unet["cross_attention_dim"], generator=g)
        added = None
        if self.pooled_dim is not None:
            added = {
                "text_embeds": torch.randn(batch, self.pooled_dim, generator=g).to(device, dtype),
                "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch).to(device, dtype),
            }
        return x.to(device, dtype), text.to(device, dtype), added


ARCHS: dict[str, Arch] = {
    # runwayml/stable-diffusion-v1-5 UNet (859.5 M parameters)
    "sd15": Arch(dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), resolution=512,
                 text_encoders=(CLIP_L,), vae=SD_VAE),
    # stabilityai/stable-diffusion-2-1-base UNet (865.9 M parameters) — the paper's teacher
    "sd21": Arch(
        dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        resolution=512, text_encoders=(OPENCLIP_H,), vae=SD_VAE,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 UNet (2.57 B parameters)
    "sdxl": Arch(
        dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        resolution=1024, text_encoders=(CLIP_L, OPENCLIP_BIGG), vae=SD_VAE,
        pooled_dim=1280,
    ),
    # ~30 M parameters: an SD-shaped UNet small enough to train on a CPU
    "small": Arch(
        dict(
            sample_size=32,
            block_out_channels=(80, 160, 320),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        resolution=256, text_encoders=(_clip(256, 4, 4),), vae=_bench_vae(32, 16),
    ),
    # a few hundred thousand parameters: smoke tests and quick looks
    "tiny": Arch(
        dict(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        resolution=64, text_encoders=(_clip(32, 2, 2, vocab_size=1000, max_position_embeddings=16, bos_token_id=998, eos_token_id=999),), vae=_bench_vae(8, 4),
        text_len=16,
    ),
}


def parameter_count(arch: Arch, part: str = "unet") -> int | list[int]:
    """Parameters of the ``part`` ("unet", "vae", or "text_encoders": one count each), counted on the meta device."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        if part == "text_encoders":
            return [count(m) for m in arch.build_text_encoders("meta")]
        return count(arch.build("meta") if part == "unet" else arch.build_vae("meta"))
