"""CLIP score: the cosine between a local transformers CLIP model's image and caption embeddings.

The GigaGAN protocol (the paper's Table 1) reports the mean cosine (0.31-0.33), not torchmetrics' 100 × max(cos, 0),
with ViT-g/14; any CLIP folder works and its name goes into the results. Captions longer than the text model's
positions are truncated. Images are the prepared metric-resolution images; the CLIP processor resizes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loopfree.evaluation.features import file_sha256
from loopfree.pipelines.clip import check_clip, load_clip


class ClipScorer:
    """Per-image CLIP cosine between an image and its prompt."""

    def __init__(self, path: str | None, device: torch.device):
        files = check_clip(path)
        self.model, self.processor = load_clip(path, device)
        self.path, self.device = str(Path(path).absolute()), device
        self.sha256 = {file.name: file_sha256(file) for file in files}
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Cosines (N,) of uint8 images (N, H, W, 3) and their prompts."""
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return (out.image_embeds * out.text_embeds).sum(-1).double().cpu().numpy()
