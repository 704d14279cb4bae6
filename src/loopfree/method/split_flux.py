"""Run a diffusers ``FluxTransformer2DModel`` (MMDiT, rectified flow) as a shared part and K per-step parts (SPEC §6).

The blocks are one list, the double-stream ``transformer_blocks`` then the ``single_transformer_blocks`` (both take
and return the image and text streams apart), and the boundary N may fall anywhere in it: the two kinds cost a
token the same 12·D² multiply-adds of projections, so N = L // 2 halves the work.

Shared part S, once at τ_K: ``x_embedder``, ``context_embedder``, the rotary embedding of the text and image
positions (``pos_embed``), blocks 0..N-1 with τ_K's modulation — on both streams, as the text tokens too are
modulated. Per-step part P, for all K decoder timesteps as one batch: blocks N..L-1, ``norm_out`` (modulated),
``proj_out`` — each decoder with its own ``time_text_embed``: timestep, pooled text and, for guidance-distilled
models (FLUX-dev, ``guidance_embeds``), the embedded guidance scale.

Shared by P's K passes and done once: the rotary embedding (S's), and with ``hoist=True`` the embeddings — the
timestep part for K rows, the pooled-text and guidance parts for B rows, summed by broadcast.

Latents are FLUX's packed tokens (B, S, C) and so is the output. Timesteps are the model's own: σ ∈ (0, 1] (its
forward scales them by 1000). ``run_per_step(model, run_shared(model, x, t, ...), [t])`` equals ``model(x, ..., t)``::

    feats = run_shared(model, x_T, 1.0, text, pooled, img_ids, txt_ids, guidance=torch.full((B,), 3.5))
    v = run_per_step(model, feats, [1.0, 0.94, 0.83, 0.6])    # (K, B, S, C) velocities
    x0, eps = loop_free(model, x_T, sigmas, Conditioning(text, {"pooled_projections": pooled}), img_ids, txt_ids, 3.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

from loopfree.method import flow
from loopfree.method.hoist import tile
from loopfree.method.sampler import Conditioning
from loopfree.method.transformer_split import check_shared_blocks, guided_outputs, run_block
from loopfree.utils.errors import LoopfreeError


@dataclass
class SharedFeatures:
    """What the per-step part needs from one shared pass over a batch of B packed latents."""

    hidden: torch.Tensor  # image tokens after x_embedder and the first N blocks, (B, S, D)
    context: torch.Tensor  # text tokens after context_embedder and the first N blocks, (B, L, D)
    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the text then image positions, (L + S, head_dim)
    pooled: torch.Tensor  # pooled text embeddings as given, (B, P)
    guidance: torch.Tensor | None  # the guidance scale per item, (B,), for guidance-embedding models
    shared_blocks: int  # N, over the double-stream then single-stream blocks


def blocks(model: FluxTransformer2DModel) -> list[torch.nn.Module]:
    """The double-stream blocks, then the single-stream ones: the list N counts in."""
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _check_guidance(model: FluxTransformer2DModel, guidance) -> None:
    if model.config.guidance_embeds and guidance is None:
        raise LoopfreeError("this FLUX model embeds the guidance scale (guidance_embeds): pass guidance")
    if not model.config.guidance_embeds and guidance is not None:
        raise LoopfreeError("this FLUX model has no guidance embedding (guidance_embeds is off): pass guidance=None")


def run_shared(
    model: FluxTransformer2DModel,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | float | None = None,
    shared_blocks: int | None = None,
) -> SharedFeatures:
    """Shared pass S(x, τ, c): embeddings, rotary positions, the first N blocks at τ (None: L // 2). ``img_ids``
    (S, 3) and ``txt_ids`` (L, 3) are the positions FluxPipeline makes; ``guidance`` a scale or one per item."""
    _check_guidance(model, guidance)
    n = check_shared_blocks(shared_blocks, len(blocks(model)))
    B = hidden_states.shape[0]
    hidden = model.x_embedder(hidden_states)
    if guidance is not None:
        guidance = torch.as_tensor(guidance, device=hidden.device, dtype=torch.float32).reshape(-1).expand(B)
    t = torch.as_tensor(timestep, device=hidden.device).reshape(-1).expand(B)
    temb = _embed(model, t[None], pooled_projections, guidance)
    context = model.context_embedder(encoder_hidden_states)
    rotary = model.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
    for block in blocks(model)[:n]:
        context, hidden = _block(model, block, hidden, context, temb, rotary)
    return SharedFeatures(hidden, context, rotary, pooled_projections, guidance, n)


def _block(model, block, hidden, context, temb, rotary) -> tuple[torch.Tensor, torch.Tensor]:
    return run_block(model, block, hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                     image_rotary_emb=rotary, joint_attention_kwargs=None)


def _embed(model, timesteps: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None, hoist: bool = False):
    """``time_text_embed`` for K·B rows, decoder-major, from ``timesteps`` (K, B) in σ and B rows of pooled text and
    guidance; ``hoist``: the timestep part for K rows (one timestep per decoder), the others for B rows, summed."""
    K, B = timesteps.shape[0], pooled.shape[0]
    dtype = model.x_embedder.weight.dtype
    t = timesteps.to(dtype) * 1000  # the model's forward scales σ to its training timesteps
    g = None if guidance is None else guidance.to(dtype) * 1000
    embed = model.time_text_embed  # CombinedTimestep(Guidance)TextProjEmbeddings
    if not hoist:
        args = (t.reshape(-1),) + (() if g is None else (tile(g, K),)) + (tile(pooled, K),)
        return embed(*args)
    emb = embed.timestep_embedder(embed.time_proj(t[:, 0]).to(pooled.dtype))[:, None]  # (K, 1, D)
    rest = embed.text_embedder(pooled)
    if g is not None:
        rest = rest + embed.guidance_embedder(embed.time_proj(g).to(pooled.dtype))
    return (emb + rest[None]).reshape(K * B, -1)


def run_per_step(
    model: FluxTransformer2DModel, feats: SharedFeatures, timesteps: torch.Tensor | list[float], hoist: bool = True
) -> torch.Tensor:
    """Per-step passes P(f, τ_k, c) for K timesteps (σ's) as one batch of K·B → (K, B, S, C), decoder-major.

    ``hoist``: the embedding's shared work done once (module docstring); False: ``time_text_embed`` on K·B rows."""
    B = feats.hidden.shape[0]
    timesteps = torch.as_tensor(timesteps, device=feats.hidden.device).reshape(-1)
    K = timesteps.shape[0]
    temb = _embed(model, timesteps[:, None].expand(K, B), feats.pooled, feats.guidance, hoist)
    hidden, context = tile(feats.hidden, K), tile(feats.context, K)
    for block in blocks(model)[feats.shared_blocks :]:
        context, hidden = _block(model, block, hidden, context, temb, feats.rotary)
    out = model.proj_out(model.norm_out(hidden, temb))
    return out.reshape(K, B, *out.shape[1:])


def predict(
    model: FluxTransformer2DModel,
    x: torch.Tensor,
    timesteps: list[float],
    cond: Conditioning,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: float | None = None,
    shared_blocks: int | None = None,
    hoist: bool = True,
) -> torch.Tensor:
    """The K velocities of one pass, (K, B, S, C): S at τ_K, P batched. ``cond.added``: pooled_projections."""
    pooled = cond.added["pooled_projections"]
    feats = run_shared(model, x, timesteps[0], cond.text, pooled, img_ids, txt_ids, guidance, shared_blocks)
    return run_per_step(model, feats, timesteps, hoist)


def loop_free(
    model: FluxTransformer2DModel,
    x_T: torch.Tensor,
    sigmas: list[float],
    cond: Conditioning,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: float | None = None,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    shared_blocks: int | None = None,
    hoist: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the decoder σ's (``flow.decoder_sigmas(…, pipeline="flux")``) with the Euler combination.

    ``guidance``: FLUX-dev's embedded guidance scale (one model call per pass); ``uncond`` and ``guidance_scale``:
    classifier-free guidance over [uncond; cond] (FluxPipeline's true CFG). Returns (x_0, ε̂ (K, B, S, C))."""
    v = guided_outputs(lambda x, c: predict(model, x, sigmas, c, img_ids, txt_ids, guidance, shared_blocks, hoist),
                       x_T, cond, uncond, guidance_scale)
    return flow.euler_combine(x_T, v, sigmas)
