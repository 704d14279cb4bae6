"""UNet architectures by name, for benchmarks: the real shapes, random weights (speed doesn't depend on values)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel


@dataclass(frozen=True)
class Arch:
    """A UNet config plus the text conditioning shapes its pipeline feeds it."""

    unet: dict = field(repr=False)
    resolution: int  # native image size in pixels
    text_len: int = 77  # tokens per prompt
    vae_scale_factor: int = 8
    pooled_dim: int | None = None  # SDXL: pooled text embedding size (added conditioning)

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> UNet2DConditionModel:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**self.unet).to(device).eval()
        return unet if dtype == torch.float32 else unet.to(dtype)

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
    "sd15": Arch(dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8), resolution=512),
    # stabilityai/stable-diffusion-2-1-base UNet (865.9 M parameters) — the paper's teacher
    "sd21": Arch(
        dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        resolution=512,
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
        resolution=1024,
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
        resolution=256,
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
        resolution=64,
        text_len=16,
    ),
}


def parameter_count(arch: Arch) -> int:
    """Number of UNet parameters, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**arch.unet).parameters())
