"""CLIP score: the cosine between a local transformers CLIP model's image and caption embeddings.

The GigaGAN protocol (the paper's Table 1) reports the mean cosine (0.31-0.33), not torchmetrics' 100 × max(cos, 0),
with ViT-g/14; any CLIP folder works and its name goes into the results. Captions longer than the text model's
positions are truncated. Images are the prepared metric-resolution images; the CLIP processor resizes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from loopfree.utils.errors import LoopfreeError, first_line
from loopfree.evaluation.features import file_sha256
from loopfree.evaluation.settings import CLIP_REPOS
from loopfree.pipelines.loading import check_safetensors


def _weights(folder: Path, hint: str) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise LoopfreeError(f"--clip {folder} holds no model.safetensors (loopfree loads safetensors only; convert a "
                        f"pytorch_model.bin with CLIPModel.save_pretrained): {hint}")


class ClipScorer:
    """Per-image CLIP cosine between an image and its prompt."""

    def __init__(self, path: str | None, device: torch.device):
        hint = f"give a local transformers CLIP folder (config, tokenizer, preprocessor, model.safetensors), e.g. {CLIP_REPOS} from the Hugging Face Hub"
        if path is None:
            raise LoopfreeError(f"--metrics clip needs --clip DIR: {hint}")
        folder = Path(path)
        if not folder.is_dir():
            raise LoopfreeError(f"--clip {path} {'is not a folder' if folder.exists() else 'does not exist'}: {hint}")
        config_file = folder / "config.json"
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise LoopfreeError(f"--clip {path}: {config_file} is missing or unreadable: {hint}") from None
        if model_type != "clip":
            raise LoopfreeError(f"--clip {path} holds a {model_type!r} model, not CLIP: {hint}")
        files = _weights(folder, hint)
        for file in files:
            check_safetensors(file)
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = first_line(e)
            raise LoopfreeError(f"--clip {path}: cannot load it ({first}): {hint}") from None
        self.path, self.device = str(folder.absolute()), device
        self.sha256 = {file.name: file_sha256(file) for file in files}
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """Cosines (N,) of uint8 images (N, H, W, 3) and their prompts."""
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return (out.image_embeds * out.text_embeds).sum(-1).double().cpu().numpy()
