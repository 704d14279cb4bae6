"""Run a diffusers ``PixArtTransformer2DModel`` (DiT, ε-prediction) as a shared part and K per-step parts (SPEC §6).

Shared part S, once at τ_K: ``pos_embed`` (patch embedding + positions), ``caption_projection``, the first N
``transformer_blocks`` with τ_K's adaLN-single modulation. Per-step part P, for all K decoder timesteps as one
batch: the remaining blocks, ``norm_out`` with the ``scale_shift_table`` modulation, ``proj_out``, unpatchify —
each decoder with its own timestep embedding. PixArt's blocks leave the caption tokens as they are, so S's
projected caption is what every block of P cross-attends to.

What P's K passes share is done once (``hoist=True``): the timestep embedding for K rows, not K·B, and the size
conditioning (resolution, aspect ratio; the 1024² models') for B rows, not K·B. Not hoisted: the caption's
cross-attention keys and values, 2·L of a block's ≈ 14·T + 2·L token projections for T image and L caption tokens
(0.4 % at 1024² with 120 tokens, 4 % at 512² with 300), which would need a swapped attention processor.

``run_per_step(model, run_shared(model, x, t, text, shared_blocks=N), [t])`` equals ``model(x, text, timestep=t)``::

    feats = run_shared(model, x_T, 751, caption, added_cond_kwargs=sizes, encoder_attention_mask=mask)
    out = run_per_step(model, feats, [751, 501, 251, 1])   # (K, B, 2C, H, W): ε is out[:, :, :C] (learned variance)
    x0, eps = loop_free(model, schedule, x_T, [751, 501, 251, 1], Conditioning(caption, {"attention_mask": mask}))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel

from loopfree.method.hoist import tile
from loopfree.method.sampler import Conditioning, ddim_combine
from loopfree.method.schedule import NoiseSchedule
from loopfree.method.transformer_split import check_shared_blocks, guided_outputs, run_block, unpatchify
from loopfree.utils.errors import LoopfreeError

SizeKwargs = dict[str, torch.Tensor] | None  # diffusers' added_cond_kwargs: resolution (B, 2), aspect_ratio (B, 1)


@dataclass
class SharedFeatures:
    """What the per-step part needs from one shared pass over a batch of B latents."""

    hidden: torch.Tensor  # image tokens after the patch embedding and the first N blocks, (B, T, D)
    context: torch.Tensor  # caption tokens after caption_projection, (B, L, D)
    context_bias: torch.Tensor | None  # the caption mask as an attention bias, (B, 1, L)
    sizes: SizeKwargs  # the size conditioning, as given
    shared_blocks: int  # N
    grid: tuple[int, int]  # patch grid h, w


def _check(model: PixArtTransformer2DModel, sizes: SizeKwargs) -> None:
    if model.use_additional_conditions and not sizes:
        raise LoopfreeError("this PixArt model is size-conditioned: pass added_cond_kwargs with resolution and aspect_ratio")


def run_shared(
    model: PixArtTransformer2DModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: SizeKwargs = None,
    encoder_attention_mask: torch.Tensor | None = None,
    shared_blocks: int | None = None,
) -> SharedFeatures:
    """Shared pass S(x, τ, c): patch embedding, caption projection, the first N blocks at τ (None: L // 2).
    ``added_cond_kwargs``: as the model's forward takes it (its pipeline passes None values to 512² models)."""
    added_cond_kwargs = {k: v for k, v in (added_cond_kwargs or {}).items() if v is not None} or None
    _check(model, added_cond_kwargs)
    n = check_shared_blocks(shared_blocks, len(model.transformer_blocks))
    B, p = sample.shape[0], model.config.patch_size
    grid = (sample.shape[-2] // p, sample.shape[-1] // p)
    bias = None
    if encoder_attention_mask is not None:  # 1 = keep, 0 = drop → an additive bias, as the model's forward makes it
        bias = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    hidden = model.pos_embed(sample)
    context = encoder_hidden_states
    if model.caption_projection is not None:
        context = model.caption_projection(context).view(B, -1, hidden.shape[-1])
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
    modulation, _ = model.adaln_single(t, added_cond_kwargs, batch_size=B, hidden_dtype=hidden.dtype)
    for block in model.transformer_blocks[:n]:
        hidden = _block(model, block, hidden, context, bias, modulation)
    return SharedFeatures(hidden, context, bias, added_cond_kwargs, n, grid)


def _block(model, block, hidden, context, bias, modulation) -> torch.Tensor:
    return run_block(model, block, hidden_states=hidden, attention_mask=None, encoder_hidden_states=context,
                     encoder_attention_mask=bias, timestep=modulation, cross_attention_kwargs=None, class_labels=None)


def _embeddings_plain(model, feats: SharedFeatures, timesteps: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """adaLN-single of K·B rows as the model's forward computes it: (modulation (K·B, 6D), embedding (K·B, D))."""
    B, K = feats.hidden.shape[0], timesteps.shape[0]
    sizes = None if feats.sizes is None else {k: tile(v, K) for k, v in feats.sizes.items()}
    return model.adaln_single(timesteps.repeat_interleave(B), sizes, batch_size=K * B, hidden_dtype=dtype)


def _embeddings_hoisted(model, feats: SharedFeatures, timesteps: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, with the timestep embedding made for K rows and the size embedding for B rows, summed by broadcast."""
    B, K = feats.hidden.shape[0], timesteps.shape[0]
    emb = model.adaln_single.emb  # PixArtAlphaCombinedTimestepSizeEmbeddings
    embedded = emb.timestep_embedder(emb.time_proj(timesteps).to(dtype))[:, None]  # (K, 1, D)
    if emb.use_additional_conditions:
        res, ar = feats.sizes["resolution"], feats.sizes["aspect_ratio"]
        res = emb.resolution_embedder(emb.additional_condition_proj(res.flatten()).to(dtype)).reshape(B, -1)
        ar = emb.aspect_ratio_embedder(emb.additional_condition_proj(ar.flatten()).to(dtype)).reshape(B, -1)
        embedded = embedded + torch.cat([res, ar], dim=1)  # (K, B, D)
    modulation = model.adaln_single.linear(model.adaln_single.silu(embedded))
    return (modulation.expand(K, B, -1).reshape(K * B, -1), embedded.expand(K, B, -1).reshape(K * B, -1))


def run_per_step(
    model: PixArtTransformer2DModel, feats: SharedFeatures, timesteps: torch.Tensor | list[int], hoist: bool = True
) -> torch.Tensor:
    """Per-step passes P(f, τ_k, c) for K timesteps as one batch of K·B → (K, B, C_out, H, W), decoder-major.

    ``hoist``: the embeddings' shared work done once (module docstring); False: adaLN-single on K·B rows."""
    B, dtype = feats.hidden.shape[0], feats.hidden.dtype
    timesteps = torch.as_tensor(timesteps, device=feats.hidden.device).reshape(-1)
    K = timesteps.shape[0]
    embed = _embeddings_hoisted if hoist else _embeddings_plain
    modulation, embedded = embed(model, feats, timesteps, dtype)
    hidden = tile(feats.hidden, K)
    context = tile(feats.context, K)
    bias = None if feats.context_bias is None else tile(feats.context_bias, K)
    for block in model.transformer_blocks[feats.shared_blocks :]:
        hidden = _block(model, block, hidden, context, bias, modulation)
    shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)  # final adaLN modulation
    hidden = model.proj_out(model.norm_out(hidden) * (1 + scale) + shift)
    out = unpatchify(hidden, feats.grid, model.config.patch_size, model.out_channels)
    return out.reshape(K, B, *out.shape[1:])


def _conditioning(cond: Conditioning) -> tuple[SizeKwargs, torch.Tensor | None]:
    """Conditioning.added → (diffusers' added_cond_kwargs, the caption mask): keys resolution, aspect_ratio, attention_mask."""
    added = dict(cond.added or {})
    mask = added.pop("attention_mask", None)
    return added or None, mask


def predict(
    model: PixArtTransformer2DModel,
    x: torch.Tensor,
    timesteps: list[int],
    cond: Conditioning,
    shared_blocks: int | None = None,
    hoist: bool = True,
) -> torch.Tensor:
    """The K noise predictions of one pass, (K, B, C, H, W): S at τ_K, P batched; of a learned-variance output
    (2C channels) the first C, which are ε."""
    sizes, mask = _conditioning(cond)
    feats = run_shared(model, x, timesteps[0], cond.text, sizes, mask, shared_blocks)
    out = run_per_step(model, feats, timesteps, hoist)
    return out[:, :, : x.shape[1]] if out.shape[2] == 2 * x.shape[1] else out


def loop_free(
    model: PixArtTransformer2DModel,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    shared_blocks: int | None = None,
    hoist: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass with the DDIM combination (SPEC §2, ``sampler.ddim_combine``): returns (x_0, ε (K, B, ...))."""
    out = guided_outputs(lambda x, c: predict(model, x, timesteps, c, shared_blocks, hoist), x_T, cond, uncond, guidance_scale)
    return ddim_combine(schedule, x_T, out, timesteps)
