"""Exact hoisting: the K decoders' up blocks with the work that does not depend on the decoder timestep done once.

The K decoders of one pass share their inputs (the mid-block output, the skip tensors, the text states) and differ
only in the time embedding, which enters a ResNet after its ``conv1``. So this runs once per batch of B, not K·B:

* the first up-block ResNet's ``norm1 → act → conv1`` and ``conv_shortcut`` on its whole input (mid ⊕ skip);
* in every later ResNet, whose input is ``running ⊕ skip``, the skip part of ``norm1 → act → conv1``: a GroupNorm
  of a concatenation is one GroupNorm per part when no group straddles the boundary, and ``conv1`` splits along
  its input channels. A group that straddles moves the split up to the next group edge (its few skip channels
  run K times). The skip part of the 1×1 ``conv_shortcut`` likewise;
* the text keys/values of every cross-attention: :class:`SharedTextAttnProcessor` folds the K decoders into the
  query sequence. It is installed with diffusers' public ``Attention.set_processor`` for the duration of the call
  and the previous processors are restored after, so two threads must not decode with one UNet at once.

Shared B-row tensors broadcast against the K·B running ones; nothing shared is copied K times. Not hoisting but
exact too: each upsampler's nearest 2× + 3×3 convolution runs as four 2×2 convolutions at the low resolution
(:func:`_upsample`, 4/9 of the multiply-adds). Written on the
public sub-modules of diffusers' ``UpBlock2D`` / ``CrossAttnUpBlock2D`` / ``ResnetBlock2D``; anything else makes
:func:`unsupported` name the reason and ``loopfree.method.split.run_decoders`` take the plain path, which this equals to float
rounding (tests/test_hoist.py)::

    eps = run_decoders(unet, run_encoder(unet, x_T, 751, text), [751, 501, 251, 1])  # hoisted; hoist=False: plain
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from diffusers.models.upsampling import Upsample2D
from torch.utils.checkpoint import checkpoint


# Output pixels (all rows) below which a convolution's time goes to reading its weights rather than to arithmetic
# (measured on a CPU): splitting or folding the weights there costs more than the multiply-adds it saves.
MIN_PIXELS = 1024


def _small(pixels: int | torch.SymInt) -> bool:
    """Whether ``pixels`` is under :data:`MIN_PIXELS`; False for a size only known when the graph runs (a traced
    dynamic batch: ``loopfree export``), where the split/folded path, exact for every size, is the one kept."""
    return not isinstance(pixels, torch.SymInt) and pixels < MIN_PIXELS


def tile(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (K*B, ...), decoder-major: rows k*B..(k+1)*B-1 belong to decoder k."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


def unsupported(unet: UNet2DConditionModel) -> str | None:
    """Why the hoisted up blocks can't run this UNet exactly, or None when they can."""
    for i, block in enumerate(unet.up_blocks):
        if type(block) not in (UpBlock2D, CrossAttnUpBlock2D):
            return f"up block {i} is a {type(block).__name__}"
        if all(getattr(block, name, None) for name in ("s1", "s2", "b1", "b2")):
            return "FreeU is enabled"
        for resnet in block.resnets:
            if type(resnet) is not ResnetBlock2D:
                return f"up block {i} has a {type(resnet).__name__}"
            if resnet.upsample is not None or resnet.downsample is not None:
                return f"up block {i} has a ResNet that resamples"
            if resnet.time_emb_proj is None or resnet.time_embedding_norm not in ("default", "scale_shift"):
                return f"up block {i} has a ResNet without a default/scale_shift time embedding"
            convs = [resnet.conv1] + ([resnet.conv_shortcut] if resnet.conv_shortcut is not None else [])
            if any(type(c) is not torch.nn.Conv2d for c in convs):  # its weight is not all it computes
                return f"up block {i} has a ResNet convolution that is not a plain Conv2d (an unfused LoRA?)"
            if any(c.groups != 1 or c.padding_mode != "zeros" for c in convs):
                return f"up block {i} has a grouped or non-zero-padded ResNet convolution"
        for attn in getattr(block, "attentions", []):
            if type(attn) is not Transformer2DModel or not attn.is_input_continuous:
                return f"up block {i} has a {type(attn).__name__} attention"
    return None


class SharedTextAttnProcessor:
    """Cross-attention of K·B query rows (decoder-major) to B rows of text states, with keys/values computed once.

    The K decoders of one image attend to the same keys, so their queries are stacked along the sequence:
    (K·B, N) queries become (B, K·N) for ``F.scaled_dot_product_attention`` and go back after. With K = 1 it
    is diffusers' ``AttnProcessor2_0`` on a plain cross-attention.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("SharedTextAttnProcessor takes (batch, tokens, channels) states and no attention mask")
        kb, n, _ = hidden_states.shape
        b, length, _ = encoder_hidden_states.shape
        k, heads = kb // b, attn.heads
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = query.shape[-1] // heads
        query = query.view(k, b, n, heads, d).permute(1, 3, 0, 2, 4).reshape(b, heads, k * n, d)
        key = key.view(b, length, heads, d).transpose(1, 2)
        value = value.view(b, length, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, K·N, d)
        out = out.view(b, heads, k, n, d).permute(2, 0, 3, 1, 4).reshape(kb, n, heads * d).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


SHARED_TEXT = SharedTextAttnProcessor()  # stateless; one instance keeps torch.compile's guards stable


def _text_attentions(unet: UNet2DConditionModel) -> list[Attention] | None:
    """The up blocks' cross-attentions if all of them can take :data:`SHARED_TEXT` (their processor is diffusers'
    SDPA one, nothing else reads the text states), else None."""
    found = []
    for block in unet.up_blocks:
        for transformer in getattr(block, "attentions", []):
            for tb in transformer.transformer_blocks:
                attn = getattr(tb, "attn2", None)
                if type(tb) is not BasicTransformerBlock or attn is None or tb.only_cross_attention:
                    return None
                plain = (attn.spatial_norm, attn.group_norm, attn.norm_q, attn.norm_k) == (None,) * 4
                if not (type(attn.processor) is AttnProcessor2_0 and attn.is_cross_attention and plain
                        and not attn.norm_cross and not attn.residual_connection and attn.rescale_output_factor == 1.0):
                    return None
                found.append(attn)
    return found


@contextmanager
def shared_text_attention(attentions: list[Attention]) -> Iterator[None]:
    """:data:`SHARED_TEXT` on ``attentions`` inside, their own processors restored after."""
    before = [a.processor for a in attentions]
    for a in attentions:
        a.set_processor(SHARED_TEXT)
    try:
        yield
    finally:
        for a, p in zip(attentions, before):
            a.set_processor(p)


def _conv(conv: torch.nn.Conv2d, x: torch.Tensor, lo: int, hi: int, bias: bool) -> torch.Tensor:
    """``conv`` restricted to its input channels lo:hi (zero padding makes the parts add up to the whole)."""
    return F.conv2d(x, conv.weight[:, lo:hi], conv.bias if bias else None, conv.stride, conv.padding, conv.dilation)


def _norm_act(resnet: ResnetBlock2D, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``act(norm1(·))`` on the channels lo:hi of norm1's input, which span whole groups."""
    norm = resnet.norm1
    groups = (hi - lo) * norm.num_groups // norm.num_channels
    return resnet.nonlinearity(F.group_norm(x, groups, norm.weight[lo:hi], norm.bias[lo:hi], norm.eps))


def _split_input(resnet: ResnetBlock2D, h: torch.Tensor, skip: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv1(act(norm1(h ⊕ skip)))`` and the shortcut of ``h ⊕ skip`` as (K, B, ...) running parts plus broadcast
    (B, ...) skip parts; ``h`` is (K·B, ...), ``skip`` (B, ...)."""
    ch, total = h.shape[1], h.shape[1] + skip.shape[1]
    per_group = total // resnet.norm1.num_groups
    edge = -(-ch // per_group) * per_group  # the first group edge at or after the boundary
    x = h if edge == ch else torch.cat([h, tile(skip[:, : edge - ch], k)], 1)
    y = _conv(resnet.conv1, _norm_act(resnet, x, 0, edge), 0, edge, True).unflatten(0, (k, -1))
    if edge < total:
        y = y + _conv(resnet.conv1, _norm_act(resnet, skip[:, edge - ch :], edge, total), edge, total, False)
    sc = resnet.conv_shortcut
    if sc is None:
        return y, torch.cat([h, tile(skip, k)], 1).unflatten(0, (k, -1))
    return y, _conv(sc, h, 0, ch, True).unflatten(0, (k, -1)) + _conv(sc, skip, ch, total, False)


def _resnet(resnet: ResnetBlock2D, h: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, k: int, shared: bool) -> torch.Tensor:
    """``resnet(h ⊕ skip, temb)`` for K decoders → (K·B, ...). ``shared``: ``h`` is (B, ...) like ``skip`` (the
    first up-block ResNet), else (K·B, ...), split from the skip unless under :data:`MIN_PIXELS`; ``temb`` (K·B, D)."""
    if shared or _small(h[:, 0].numel()):  # the whole input at once: shared, or too small to split
        x = torch.cat([h, skip if shared else tile(skip, k)], 1)
        groups = 1 if shared else k
        y = resnet.conv1(resnet.nonlinearity(resnet.norm1(x))).unflatten(0, (groups, -1))
        short = (x if resnet.conv_shortcut is None else resnet.conv_shortcut(x)).unflatten(0, (groups, -1))
    else:
        y, short = _split_input(resnet, h, skip, k)
    t = resnet.time_emb_proj(temb if resnet.skip_time_act else resnet.nonlinearity(temb))
    t = t.unflatten(0, (k, -1))[..., None, None]
    if resnet.time_embedding_norm == "default":
        y = resnet.norm2((y + t).flatten(0, 1))
    else:  # scale_shift: norm2 comes before the time embedding, so a shared y is normalised once
        scale, shift = t.chunk(2, dim=2)
        y = (resnet.norm2(y.flatten(0, 1)).unflatten(0, y.shape[:2]) * (1 + scale) + shift).flatten(0, 1)
    y = resnet.conv2(resnet.dropout(resnet.nonlinearity(y)))
    return ((short + y.unflatten(0, (k, -1))) / resnet.output_scale_factor).flatten(0, 1)


def _fold(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel axis seen from the two output parities of a nearest 2× upsampling: taps (0, 1+2) and (0+1, 2)."""
    a, b, c = w.unbind(dim)
    return torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)


def _subpixel_ok(upsampler: torch.nn.Module) -> bool:
    conv = getattr(upsampler, "conv", None)
    return (type(upsampler) is Upsample2D and upsampler.use_conv and not upsampler.use_conv_transpose
            and upsampler.norm is None and upsampler.interpolate and isinstance(conv, torch.nn.Conv2d)
            and (conv.kernel_size, conv.padding, conv.stride, conv.dilation, conv.groups, conv.padding_mode)
            == ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"))


def _upsample(upsampler: torch.nn.Module, h: torch.Tensor, size) -> torch.Tensor:
    """``upsampler(h, size)``. A nearest 2× upsampling then a 3×3 convolution is, for each of the four output
    parities, a 2×2 convolution of the low-resolution input with summed taps: 4·4 instead of 4·9 multiply-adds per
    output pixel, the same result. Explicit sizes (odd latents), outputs under :data:`MIN_PIXELS` and other
    upsamplers run the module."""
    if size is not None or _small(4 * h[:, 0].numel()) or not _subpixel_ok(upsampler):
        return upsampler(h, size)
    conv, (n, _, height, width) = upsampler.conv, h.shape
    padded = F.pad(h, (1, 1, 1, 1))
    rows = []
    for a, w in enumerate(_fold(conv.weight, 2)):
        cols = [F.conv2d(padded[:, :, a : a + height + 1, b : b + width + 1], k, conv.bias) for b, k in enumerate(_fold(w, 3))]
        rows.append(torch.stack(cols, -1))  # (N, C, H, W, 2): column parity last
    return torch.stack(rows, 3).reshape(n, -1, 2 * height, 2 * width)  # (N, C, H, 2, W, 2) → interleaved


def up_blocks(
    unet: UNet2DConditionModel, mid: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor,
    context: torch.Tensor, k: int, upsample_sizes: list,
) -> torch.Tensor:
    """All up blocks for K decoders: ``mid``, ``skips``, ``context`` of B rows, ``temb`` of K·B → (K·B, ...).

    Text keys/values are shared unless a cross-attention is unusual or gradient checkpointing will recompute
    attention during backward (after the processors are restored): then the text states are tiled.
    """
    attentions = _text_attentions(unet)
    recompute = torch.is_grad_enabled() and unet.is_gradient_checkpointing
    share = attentions is not None and not recompute
    text = context if share else tile(context, k)
    h, shared = mid, True
    with shared_text_attention(attentions if share else []):
        for block, size in zip(unet.up_blocks, upsample_sizes):
            for i, resnet in enumerate(block.resnets):
                skip, skips = skips[-1], skips[:-1]
                if torch.is_grad_enabled() and block.gradient_checkpointing:
                    h = checkpoint(_resnet, resnet, h, skip, temb, k, shared, use_reentrant=False)
                else:
                    h = _resnet(resnet, h, skip, temb, k, shared)
                shared = False
                if hasattr(block, "attentions"):
                    h = block.attentions[i](h, encoder_hidden_states=text, return_dict=False)[0]
            for upsampler in block.upsamplers or []:
                h = _upsample(upsampler, h, size)
    return h
