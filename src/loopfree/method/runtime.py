"""How a loaded model runs: SDPA attention, and an opt-in ``torch.compile`` of the encoder and decoder.

    pipe = prepare_pipeline(load_pipeline(model, dtype=torch.bfloat16), torch.device("cpu"), compile=True)
    pipe("a red circle")  # one pass: the compiled encoder once, the compiled (hoisted) decoders

:func:`compile_unet` works in place, like ``nn.Module.compile``: every one-pass call on that UNet — pipelines,
``loop_free``, ``bench`` — runs ``torch.compile``'d copies of ``split.run_encoder`` and ``split.run_decoders`` (two graphs,
static shapes: a new batch size, K or resolution compiles again), and the UNet's own forward (the loop mode's
full steps) is compiled too. The first call of each shape pays the compilation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from loopfree.method import split

PASSES_ATTR = "loopfree_passes"  # set on a UNet by compile_unet


@dataclass(frozen=True)
class Passes:
    """The encoder and decoder functions a one-pass call runs (signatures of ``split.run_encoder`` / ``split.run_decoders``)."""

    run_encoder: Callable
    run_decoders: Callable


EAGER = Passes(split.run_encoder, split.run_decoders)


def passes(unet: UNet2DConditionModel) -> Passes:
    """The passes this UNet runs: compiled after :func:`compile_unet`, else eager."""
    return getattr(unet, PASSES_ATTR, EAGER)


def compile_unet(unet: UNet2DConditionModel, backend: str = "inductor", mode: str | None = None) -> UNet2DConditionModel:
    """``torch.compile`` the encoder and the decoder separately (static shapes), and the full forward; in place."""
    options = dict(backend=backend, mode=mode, dynamic=False)
    setattr(unet, PASSES_ATTR, Passes(torch.compile(split.run_encoder, **options), torch.compile(split.run_decoders, **options)))
    unet.compile(**options)
    return unet


def prepare_pipeline(pipe, device: torch.device, compile: bool = False, backend: str = "inductor"):
    """A loaded pipeline ready to sample on ``device``: moved there, the text encoders on transformers' ``sdpa``
    attention (diffusers' UNet and VAE load with ``AttnProcessor2_0``, which is SDPA already: tests/test_precision.py),
    optionally the UNet compiled. Returns ``pipe``."""
    pipe.to(device)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None and encoder.config._attn_implementation != "sdpa":
            encoder.set_attn_implementation("sdpa")
    if compile:
        compile_unet(pipe.unet, backend)
    return pipe
