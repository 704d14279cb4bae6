"""Run a diffusers ``UNet2DConditionModel`` as an encoder and a decoder (SPEC §1).

Encoder E: time/added-condition embedding, ``conv_in``, all ``down_blocks`` and the ``mid_block``.
Decoder D: all ``up_blocks``, ``conv_norm_out``/``conv_act``/``conv_out``, fed the mid-block output and
the skip tensors E collected. The time embedding enters every ResNet block, so D recomputes it for
each of its own timesteps — with the added conditioning (SDXL's pooled text embeds and time ids)
rebuilt every time. ``decode`` takes K timesteps and runs all K decoders as one batch, by default with the work
they share done once (:mod:`loopfree.method.hoist`); ``hoist=False`` calls diffusers' up blocks on inputs tiled K times.

Both are written on the UNet's public sub-modules; ``run_decoders(run_encoder(x, t), [t])`` equals ``unet(x, t)``::

    feats = run_encoder(unet, x_T, 751, text_embeds)
    eps = run_decoders(unet, feats, torch.tensor([751, 501, 251, 1]))  # (K, B, C, H, W)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from loopfree.method import hoist as hoisting
from loopfree.method.hoist import tile

AddedCondKwargs = dict[str, torch.Tensor] | None


@dataclass
class EncoderFeatures:
    """What the decoder needs from one encoder pass over a batch of B latents."""

    mid: torch.Tensor  # mid-block output, (B, C_mid, h, w)
    skips: tuple[torch.Tensor, ...]  # skip tensors in the order the down blocks produced them
    context: torch.Tensor  # text states after the UNet's own projection, (B, L, D)
    added_emb: torch.Tensor | None  # timestep-independent embedding (class / added conditioning), (B, D)
    sample_size: tuple[int, int]  # latent H, W — decides diffusers' ``upsample_size`` path


def _check_supported(unet: UNet2DConditionModel) -> None:
    cfg = unet.config
    if cfg.addition_embed_type in ("image_hint",) or cfg.encoder_hid_dim_type in ("ip_image_proj",):
        raise ValueError(f"UNet conditioning {cfg.addition_embed_type or cfg.encoder_hid_dim_type!r} is not supported")
    if cfg.class_embeddings_concat:
        raise ValueError("class_embeddings_concat=True is not supported by the encoder/decoder split")


def _time_embedding(unet: UNet2DConditionModel, like: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``time_embedding(time_proj(t))`` for one timestep per row of ``like``."""
    t_emb = unet.get_time_embed(sample=like, timestep=timesteps)
    return unet.time_embedding(t_emb)


def _activate(unet: UNet2DConditionModel, emb: torch.Tensor) -> torch.Tensor:
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def _added_embedding(
    unet: UNet2DConditionModel,
    emb: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: AddedCondKwargs,
    class_labels: torch.Tensor | None,
) -> torch.Tensor | None:
    """Class and added-condition embeddings: independent of the timestep, so computed once."""
    parts = [
        unet.get_class_embed(sample=emb, class_labels=class_labels),
        unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}),
    ]
    parts = [p for p in parts if p is not None]
    return sum(parts[1:], parts[0]) if parts else None


def run_encoder(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: AddedCondKwargs = None,
    class_labels: torch.Tensor | None = None,
) -> EncoderFeatures:
    """Encoder pass E(x, t, c): embedding, conv_in, down blocks, mid block."""
    _check_supported(unet)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = _time_embedding(unet, sample, torch.as_tensor(timestep, device=sample.device))
    added = _added_embedding(unet, emb, encoder_hidden_states, added_cond_kwargs, class_labels)
    emb = _activate(unet, emb if added is None else emb + added)
    context = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs or {})

    h = unet.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb)
    return EncoderFeatures(mid=h, skips=skips, context=context, added_emb=added, sample_size=tuple(sample.shape[-2:]))


def _upsample_sizes(unet: UNet2DConditionModel, feats: EncoderFeatures) -> list[tuple[int, int] | None]:
    """Per up block, the explicit size its upsampler must reach: diffusers forwards one (the next skip's size)
    when the latent isn't a multiple of the up factor, else None."""
    up_factor = 2**unet.num_upsamplers
    if all(d % up_factor == 0 for d in feats.sample_size):
        return [None] * len(unet.up_blocks)
    sizes, used = [], 0
    for block in unet.up_blocks[:-1]:
        used += len(block.resnets)
        sizes.append(tuple(feats.skips[-used - 1].shape[2:]))
    return sizes + [None]


def _plain_up_blocks(unet, feats: EncoderFeatures, emb: torch.Tensor, k: int, upsample_sizes: list) -> torch.Tensor:
    """Every up block called as diffusers does, on K·B rows: the shared inputs tiled K times."""
    h = tile(feats.mid, k)
    skips = tuple(tile(s, k) for s in feats.skips)
    context = tile(feats.context, k)
    for block, size in zip(unet.up_blocks, upsample_sizes):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        kwargs: dict[str, Any] = dict(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        h = block(**kwargs)
    return h


def run_decoders(
    unet: UNet2DConditionModel, feats: EncoderFeatures, timesteps: torch.Tensor | list[int], hoist: bool = True
) -> torch.Tensor:
    """Decoder passes D(f, τ_k, c) for K timesteps, run as one batch of K·B.

    ``timesteps``: (K,) one timestep per decoder, shared by the batch. Returns (K, B, C, H, W). ``hoist``: the
    work shared by the K decoders done once (:mod:`loopfree.method.hoist`; UNets it can't take run the plain path);
    False: every up block called as diffusers does on inputs tiled K times. Both agree to float rounding.
    """
    B = feats.mid.shape[0]
    timesteps = torch.as_tensor(timesteps, device=feats.mid.device).reshape(-1)
    K = timesteps.shape[0]
    like = feats.mid[:1].expand(K, *feats.mid.shape[1:])  # one row per decoder: the embedding of τ_k, once
    emb = _time_embedding(unet, like, timesteps)
    emb = emb[:, None].expand(K, B, *emb.shape[1:]).flatten(0, 1)  # each row B times (repeat_interleave, exported too)
    if feats.added_emb is not None:
        emb = emb + tile(feats.added_emb, K)
    emb = _activate(unet, emb)
    sizes = _upsample_sizes(unet, feats)
    if hoist and hoisting.unsupported(unet) is None:
        h = hoisting.up_blocks(unet, feats.mid, feats.skips, emb, feats.context, K, sizes)
    else:
        h = _plain_up_blocks(unet, feats, emb, K, sizes)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    h = unet.conv_out(h)
    return h.reshape(K, B, *h.shape[1:])
