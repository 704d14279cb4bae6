"""The CLIP alignment loss of the authors' released students: the student's x_0 decoded by a tiny autoencoder
(TAESD, diffusers' ``AutoencoderTiny``), embedded by a frozen CLIP image tower, and held to the prompt's text
embedding by a hinge (:func:`loopfree.method.objective.clip_hinge_loss`), weighted by the step's w_s
(:func:`~loopfree.method.objective.clip_weight_at`). Gradients flow through the tiny decoder and the image tower into
the student; both networks stay frozen.

    loopfree distill --teacher sd21 --prompts p.txt --out runs/ft --student-init runs/tiue \\
        --clip-margin 0.35 --clip clip-vit-large-patch14 --tiny-vae taesd     # the authors' fine-tuning
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopfree.method.objective import clip_hinge_loss
from loopfree.pipelines.clip import load_clip
from loopfree.pipelines.loading import load_tiny_vae


class ClipAlignment:
    """``relu(τ - mean cos(CLIP text, CLIP image(tiny decode(x_0))))`` for a batch of latents and prompts."""

    def __init__(self, clip: str, tiny_vae: str, tau: float, device: torch.device, dtype: torch.dtype = torch.float32):
        self.tau = tau
        self.model, processor = load_clip(clip, device, dtype)
        self.tokenizer, image = processor.tokenizer, processor.image_processor
        self.vae = load_tiny_vae(tiny_vae, dtype).eval().requires_grad_(False).to(device)
        self.shortest_edge = image.size["shortest_edge"]
        self.crop = (image.crop_size["height"], image.crop_size["width"])
        self.mean = torch.tensor(image.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image.image_std, device=device).view(1, 3, 1, 1)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.device = device

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' projected CLIP text embeddings (B, D), truncated to the text model's positions."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        pooled = self.model.text_model(**{k: v.to(self.device) for k, v in tokens.items()}).pooler_output
        return self.model.text_projection(pooled)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's own preparation of images in [0, 1] (B, 3, H, W), differentiable: bicubic resize of the shortest
        edge (antialiased), centre crop, normalisation."""
        h, w = images.shape[-2:]
        scale = self.shortest_edge / min(h, w)
        size = (max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def image_embeds(self, x0: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings (B, D) of latents x_0, with gradient to x_0."""
        dtype = self.vae.dtype
        images = self.vae.decode(x0.to(dtype) / self.vae.config.scaling_factor).sample
        images = ((images.float() + 1) / 2).clamp(0, 1)
        pooled = self.model.vision_model(pixel_values=self.pixels(images).to(dtype)).pooler_output
        return self.model.visual_projection(pooled)

    def __call__(self, x0: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return clip_hinge_loss(text_embeds, self.image_embeds(x0), self.tau)
