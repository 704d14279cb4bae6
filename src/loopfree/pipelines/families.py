"""Which denoiser family a pipeline folder holds, read from its ``model_index.json`` alone (no torch, milliseconds).

UNet folders (Stable Diffusion 1/2/XL) are the loading gate's own business (``family_of`` returns None for them);
the transformer families are named by the diffusers pipeline class the folder records, and a folder of another
pipeline class around one of their transformers is refused by name::

    family_of(read_json(root / "model_index.json"), root)   # "pixart", "sd3", "flux" or None
    refuse_transformer("runs/pixart", "teacher", "distillation")   # one-line LoopfreeError for a transformer folder
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from loopfree.utils.errors import LoopfreeError


@dataclass(frozen=True)
class Family:
    """A transformer family: its name for messages, the diffusers classes, the components its pipeline needs."""

    name: str
    pipeline: str  # the plain diffusers pipeline class (model_index.json's _class_name)
    transformer: str  # the diffusers transformer class
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()  # components the diffusers pipeline runs without (saved as [null, null])


_BASE = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FAMILIES = {
    "pixart": Family("PixArt-α", "PixArtAlphaPipeline", "PixArtTransformer2DModel", _BASE),
    "sd3": Family("Stable Diffusion 3", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
                  _BASE + ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")),
    "flux": Family("FLUX.1", "FluxPipeline", "FluxTransformer2DModel", _BASE + ("text_encoder_2", "tokenizer_2")),
}


def present(components: dict, name: str) -> bool:
    """Whether ``model_index.json`` lists component ``name`` as a (library, class) pair, not as [null, null]."""
    entry = components.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def family_of(components: dict, path: str | os.PathLike) -> str | None:
    """The transformer family of the folder ``path`` from its ``model_index.json`` content; None when it names none
    (a UNet folder, or not a pipeline). A transformer of a family under another pipeline class is refused by name."""
    cls = components.get("_class_name")
    for key, family in FAMILIES.items():
        if cls == family.pipeline:
            return key
    transformer = components.get("transformer")
    if present(components, "transformer") and transformer[1] in {f.transformer for f in FAMILIES.values()}:
        supported = ", ".join(f.pipeline for f in FAMILIES.values())
        raise LoopfreeError(f"{str(path)!r} is a {cls} folder, which loopfree does not take: its transformer pipelines are {supported}")
    return None


def folder_family(path: str | os.PathLike) -> str | None:
    """:func:`family_of` for the folder ``path``; None when it has no readable ``model_index.json`` object (the
    loading gate says what is wrong with such a folder)."""
    try:
        components = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return family_of(components, path) if isinstance(components, dict) else None


def refuse_transformer(path: str | os.PathLike, role: str, command: str, allowed: tuple[str, ...] = ()) -> None:
    """A one-line LoopfreeError if the folder ``path`` (the command's ``role``, e.g. its teacher) holds a
    transformer pipeline, which ``command`` does not take yet (but for the families ``allowed``)."""
    family = folder_family(path)
    if family is not None and family not in allowed:
        takes = " and ".join(["Stable Diffusion (UNet)", *(FAMILIES[f].name for f in allowed)])
        raise LoopfreeError(f"{role} {str(path)!r} is a {FAMILIES[family].name} pipeline (a transformer denoiser): "
                            f"{command} takes {takes} pipelines only so far")
