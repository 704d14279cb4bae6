"""Joint attention in which the last text token stands for ``count`` identical tokens: SD3 without its T5, cheaply.

``StableDiffusion3Pipeline`` without a T5 (``text_encoder_3=None``) appends ``max_sequence_length`` (256) zero rows
to the CLIP tokens. They enter every joint block equal, so they stay equal — each has the same query over the same
keys — and attention over ``count`` equal keys is attention over one of them with its logit raised by log(count).
So the model on the CLIP tokens plus *one* zero row, with this processor on its joint attentions, equals the model
on the CLIP tokens plus all 256 (to float rounding), for a fraction of the tokens::

    model.set_attn_processor(RepeatedTokenJointAttention(256))
    v = model(x, encoder_hidden_states=context_with_one_zero_row, ...).sample   # = the plain model on 256 zero rows

The toy MMDiT teacher trains this way (:mod:`loopfree.demo.teacher_mmdit`) and ships with diffusers' own processor:
plain diffusers' default call gets what it was trained for. Built from the public ``Attention`` parts only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class RepeatedTokenJointAttention:
    """``JointAttnProcessor2_0``'s joint attention with the last context token counted ``count`` times."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"a token repeated {count} times")
        self.count = count

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:  # SD3.5's second, image-only attention: nothing repeated there
            raise ValueError("RepeatedTokenJointAttention needs the joint (image + text) attention")
        b, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = math.log(self.count)  # count equal keys = one key with log(count) more logit
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], -1)).transpose(1, 2).flatten(2).to(q.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        return image, (text if attn.context_pre_only else attn.to_add_out(text))
