"""A local transformers CLIP folder, checked and loaded (safetensors only): ``eval``'s CLIP score and
``distill``'s CLIP loss both take it as ``--clip DIR``.

    files = check_clip("clip-vit-large-patch14")              # the gate: configs and headers, no weights loaded
    model, processor = load_clip("clip-vit-large-patch14", torch.device("cpu"))
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loopfree.utils.errors import LoopfreeError, first_line
from loopfree.pipelines.loading import check_safetensors

CLIP_REPOS = "openai/clip-vit-large-patch14, or laion/CLIP-ViT-g-14-laion2B-s12B-b42K for the GigaGAN protocol's ViT-g/14"
HINT = f"give a local transformers CLIP folder (config, tokenizer, preprocessor, model.safetensors), e.g. {CLIP_REPOS}"


def _weights(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise LoopfreeError(f"--clip {folder} holds no model.safetensors (loopfree loads safetensors only; convert a "
                        "pytorch_model.bin with CLIPModel.save_pretrained)")


def check_clip(path: str | None, needed_by: str = "--metrics clip") -> list[Path]:
    """The weight files of the CLIP folder ``path``, or a one-line error naming what is wrong with it."""
    if path is None:
        raise LoopfreeError(f"{needed_by} needs --clip DIR: {HINT}")
    folder = Path(path)
    if not folder.is_dir():
        raise LoopfreeError(f"--clip {path} {'is not a folder' if folder.exists() else 'does not exist'}: {HINT}")
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise LoopfreeError(f"--clip {path}: {config_file} is missing or unreadable: {HINT}") from None
    if model_type != "clip":
        raise LoopfreeError(f"--clip {path} holds a {model_type!r} model, not CLIP: {HINT}")
    files = _weights(folder)
    for file in files:
        check_safetensors(file)
    return files


def load_clip(path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The checked folder's frozen, eval-mode ``CLIPModel`` on ``device`` in ``dtype``, and its ``CLIPProcessor``."""
    check_clip(path)
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoopfreeError(f"--clip {path}: cannot load it ({first_line(e)}): {HINT}") from None
    return model.eval().requires_grad_(False).to(device), processor
