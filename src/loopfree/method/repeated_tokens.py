"""Joint attention in which the last text token stands for ``repeats`` identical tokens: SD3 without its T5, cheaply.

``StableDiffusion3Pipeline`` without a T5 (``text_encoder_3=None``) appends ``max_sequence_length`` (256) zero rows
to the CLIP tokens. They enter every joint block equal, so they stay equal — each has the same query over the same
keys — and attention over r equal keys is attention over one of them with its logit raised by log(r). So the model
on the CLIP tokens plus *one* zero row, with this processor on its attentions and ``repeats=256`` passed as diffusers
passes a processor's arguments (``joint_attention_kwargs``), equals the model on all 256 (to float rounding), for a
fraction of the tokens::

    c, kwargs = compact_zero_rows(model, Conditioning(text, added))  # c.text (B, 77 + 1, D); {"repeats": 256}
    v = model(x, encoder_hidden_states=c.text, joint_attention_kwargs=kwargs, ...).sample  # = the model on 333 rows

Without ``repeats`` (1) the processor is diffusers' joint attention, so a model carrying it serves plain calls too.
The toy MMDiT teacher trains this way (:mod:`loopfree.demo.teacher_mmdit`), and every SD3 call of the one pass,
the teacher pairs and the distillation scores goes through :func:`compact_zero_rows`. Built from the public
``Attention`` parts only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from loopfree.method.sampler import Conditioning


class RepeatedTokenJointAttention:
    """``JointAttnProcessor2_0``'s joint attention with the last context token counted ``repeats`` times (a call
    argument, default 1); an image-only attention (SD3.5's second one) is ``AttnProcessor2_0``'s."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, repeats: int = 1) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:  # nothing repeated there
            return AttnProcessor2_0()(attn, hidden_states, attention_mask=attention_mask)
        if repeats < 1:
            raise ValueError(f"a token repeated {repeats} times")
        b, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states), None), heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        mask = None
        if repeats > 1:
            bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
            bias[-1] = math.log(repeats)  # r equal keys = one key with log(r) more logit
            mask = bias.expand(q.shape[2], -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2).to(q.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        return image, (text if attn.context_pre_only else attn.to_add_out(text))


def zero_tail(text: torch.Tensor) -> int:
    """How many of the last rows of ``text`` (B, L, D) are zero in every batch row."""
    zero = (text == 0).all(dim=-1).all(dim=0).flip(0).int()
    return int(zero.cumprod(0).sum())


def use_repeated_tokens(model: torch.nn.Module) -> None:
    """Give ``model``'s attentions :class:`RepeatedTokenJointAttention` unless they have it (plain calls unchanged)."""
    if not all(isinstance(p, RepeatedTokenJointAttention) for p in model.attn_processors.values()):
        model.set_attn_processor(RepeatedTokenJointAttention())


def compact_zero_rows(model: torch.nn.Module, c: Conditioning) -> tuple[Conditioning, dict | None]:
    """``c`` with its trailing zero text rows cut to one, and the ``joint_attention_kwargs`` that count it as all of
    them (``model`` given the processor for it); with fewer than two such rows, ``c`` and None."""
    r = zero_tail(c.text)
    if r < 2:
        return c, None
    use_repeated_tokens(model)
    return Conditioning(c.text[:, : c.text.shape[1] - r + 1], c.added), {"repeats": r}
