"""loopfree: loop-free (TiUE) text-to-image diffusion — encoder once, K decoders in parallel.

    from loopfree import load_pipeline, DistillConfig, distill

    pipe = load_pipeline("runs/tiue")                       # a diffusers pipeline
    images = pipe("a red circle on a white background").images

Names are imported on first use, so ``import loopfree`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "LoopFreePipeline": "loopfree.pipelines.pipeline",
    "LoopFreeXLPipeline": "loopfree.pipelines.pipeline",
    "LoopFreePixArtPipeline": "loopfree.pipelines.pipeline_pixart",
    "LoopFreeSD3Pipeline": "loopfree.pipelines.pipeline_sd3",
    "LoopFreeFluxPipeline": "loopfree.pipelines.pipeline_flux",
    "load_pipeline": "loopfree.pipelines.loading",
    "inspect_pipeline": "loopfree.pipelines.loading",
    "DistillConfig": "loopfree.training.config",
    "load_config": "loopfree.training.config",
    "distill": "loopfree.training.trainer",
    "LoopfreeError": "loopfree.utils.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'loopfree' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
