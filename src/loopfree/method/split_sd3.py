"""Run a diffusers ``SD3Transformer2DModel`` (MMDiT, rectified flow) as a shared part and K per-step parts (SPEC §6).

Shared part S, once at τ_K: ``pos_embed`` (patch embedding + positions), ``context_embedder``, the first N joint
``transformer_blocks`` with τ_K's modulation. A joint block updates the text tokens too, with the same timestep
modulation as the image tokens, so S hands both streams to P. Per-step part P, for all K decoder timesteps as one
batch: the remaining joint blocks, ``norm_out`` (modulated), ``proj_out``, unpatchify — each decoder with its own
``time_text_embed``. SD3.5's dual-attention blocks and q/k norms are the blocks' own business.

Every token of P, image or text, is modulated by τ_k, so little of P is shared by its K passes; what is, is done
once (``hoist=True``): the timestep embedding for K rows, the pooled-text embedding for B rows, summed by broadcast.

Timesteps are the model's own: σ·1000 (``FlowMatchEulerDiscreteScheduler.timesteps``), as SD3's pipeline passes
them. ``run_per_step(model, run_shared(model, x, t, text, pooled, N), [t])`` equals ``model(x, text, pooled, t)``::

    feats = run_shared(model, x_T, 1000.0, text, pooled)           # N = L // 2
    v = run_per_step(model, feats, [1000.0, 908.9, 751.5, 500.2])  # (K, B, C, H, W) velocities
    x0, eps = loop_free(model, x_T, decoder_sigmas(scheduler.config, 4), Conditioning(text, {"pooled_projections": pooled}))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from loopfree.method import flow, repeated_tokens
from loopfree.method.hoist import tile
from loopfree.method.sampler import Conditioning
from loopfree.method.transformer_split import check_shared_blocks, guided_outputs, run_block, unpatchify


@dataclass
class SharedFeatures:
    """What the per-step part needs from one shared pass over a batch of B latents."""

    hidden: torch.Tensor  # image tokens after the patch embedding and the first N blocks, (B, T, D)
    context: torch.Tensor | None  # text tokens after context_embedder and the first N blocks (None after the last)
    pooled: torch.Tensor  # pooled text embeddings as given, (B, P)
    shared_blocks: int  # N
    grid: tuple[int, int]  # patch grid h, w
    attention: dict | None = None  # the blocks' joint_attention_kwargs (repeated_tokens.compact_zero_rows)


def run_shared(
    model: SD3Transformer2DModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    shared_blocks: int | None = None,
    joint_attention_kwargs: dict | None = None,
) -> SharedFeatures:
    """Shared pass S(x, τ, c): patch embedding, context projection, the first N joint blocks at τ (None: L // 2);
    ``joint_attention_kwargs`` go to every block's attention, here and in :func:`run_per_step`."""
    n = check_shared_blocks(shared_blocks, len(model.transformer_blocks))
    B, p = sample.shape[0], model.config.patch_size
    hidden = model.pos_embed(sample).contiguous()
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
    temb = model.time_text_embed(t, pooled_projections)
    context = model.context_embedder(encoder_hidden_states)
    for block in model.transformer_blocks[:n]:
        context, hidden = _block(model, block, hidden, context, temb, joint_attention_kwargs)
    return SharedFeatures(hidden, context, pooled_projections, n, (sample.shape[-2] // p, sample.shape[-1] // p),
                          joint_attention_kwargs)


def _block(model, block, hidden, context, temb, attention) -> tuple[torch.Tensor | None, torch.Tensor]:
    return run_block(model, block, hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                     joint_attention_kwargs=attention)


def _temb(model: SD3Transformer2DModel, feats: SharedFeatures, timesteps: torch.Tensor, hoist: bool) -> torch.Tensor:
    """``time_text_embed`` for K·B rows (decoder-major); hoisted: timestep part for K rows + text part for B rows."""
    B, K = feats.pooled.shape[0], timesteps.shape[0]
    embed = model.time_text_embed  # CombinedTimestepTextProjEmbeddings
    if not hoist:
        return embed(timesteps.repeat_interleave(B), tile(feats.pooled, K))
    t = embed.timestep_embedder(embed.time_proj(timesteps).to(feats.pooled.dtype))  # (K, D)
    return (t[:, None] + embed.text_embedder(feats.pooled)[None]).reshape(K * B, -1)


def run_per_step(
    model: SD3Transformer2DModel, feats: SharedFeatures, timesteps: torch.Tensor | list[float], hoist: bool = True
) -> torch.Tensor:
    """Per-step passes P(f, τ_k, c) for K timesteps as one batch of K·B → (K, B, C, H, W), decoder-major.

    ``hoist``: the embedding's shared work done once (module docstring); False: ``time_text_embed`` on K·B rows."""
    B = feats.hidden.shape[0]
    timesteps = torch.as_tensor(timesteps, device=feats.hidden.device).reshape(-1)
    K = timesteps.shape[0]
    temb = _temb(model, feats, timesteps, hoist)
    hidden = tile(feats.hidden, K)
    context = None if feats.context is None else tile(feats.context, K)
    for block in model.transformer_blocks[feats.shared_blocks :]:
        context, hidden = _block(model, block, hidden, context, temb, feats.attention)
    hidden = model.proj_out(model.norm_out(hidden, temb))
    out = unpatchify(hidden, feats.grid, model.config.patch_size, model.out_channels)
    return out.reshape(K, B, *out.shape[1:])


def predict(
    model: SD3Transformer2DModel,
    x: torch.Tensor,
    timesteps: list[float],
    cond: Conditioning,
    shared_blocks: int | None = None,
    hoist: bool = True,
) -> torch.Tensor:
    """The K velocities of one pass, (K, B, C, H, W): S at τ_K, P batched. ``cond.added``: pooled_projections. Trailing
    zero text rows (SD3 without T5) run as one (:func:`~loopfree.method.repeated_tokens.compact_zero_rows`, exact)."""
    cond, attention = repeated_tokens.compact_zero_rows(model, cond)
    feats = run_shared(model, x, timesteps[0], cond.text, cond.added["pooled_projections"], shared_blocks, attention)
    return run_per_step(model, feats, timesteps, hoist)


def loop_free(
    model: SD3Transformer2DModel,
    x_T: torch.Tensor,
    sigmas: list[float],
    cond: Conditioning,
    uncond: Conditioning | None = None,
    guidance_scale: float = 1.0,
    shared_blocks: int | None = None,
    hoist: bool = True,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over the decoder σ's (``flow.decoder_sigmas``) with the Euler combination (``flow.euler_combine``):
    the model sees timesteps σ·num_train_timesteps. Returns (x_0, ε̂ (K, B, ...))."""
    timesteps = (torch.tensor(sigmas, dtype=torch.float32) * num_train_timesteps).tolist()  # as the scheduler's, in float32
    v = guided_outputs(lambda x, c: predict(model, x, timesteps, c, shared_blocks, hoist), x_T, cond, uncond, guidance_scale)
    return flow.euler_combine(x_T, v, sigmas)


@torch.no_grad()
def euler_loop(model: SD3Transformer2DModel, scheduler, x_T: torch.Tensor, num_steps: int, cond: Conditioning,
               uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """SD3's own sampler, a model call per step (the teacher's pairs): ``num_steps`` Euler steps of
    ``FlowMatchEulerDiscreteScheduler`` set as StableDiffusion3Pipeline sets it, with classifier-free guidance above 1
    (trailing zero text rows run as one, as in :func:`predict`). ``scheduler`` lends its configuration only."""
    guide = uncond is not None and guidance_scale > 1.0
    c, attention = repeated_tokens.compact_zero_rows(model, Conditioning.cat([uncond, cond]) if guide else cond)
    euler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    euler.set_timesteps(num_steps, device=x_T.device)
    x = x_T
    for t in euler.timesteps:
        xin = torch.cat([x, x]) if guide else x
        v = model(hidden_states=xin, timestep=t.expand(xin.shape[0]), encoder_hidden_states=c.text,
                  pooled_projections=c.added["pooled_projections"], joint_attention_kwargs=attention).sample
        if guide:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        x = euler.step(v, t, x).prev_sample
    return x


class Generator(torch.nn.Module):
    """The SD3 student as one module, x_T and text → (x_0, ε̂ (K, B, ...)), like :class:`loopfree.method.sampler.Generator`
    for UNets: :func:`loop_free` over its decoder σ's, N shared blocks, no guidance. The one-step student is K = 1,
    σ = [1]: x_0 = x_T − v."""

    def __init__(self, model: SD3Transformer2DModel, sigmas: list[float], shared_blocks: int | None = None,
                 num_train_timesteps: int = 1000, hoist: bool = True):
        super().__init__()
        self.model = model
        self.sigmas, self.shared_blocks = flow.check_sigmas(sigmas), shared_blocks
        self.num_train_timesteps, self.hoist = num_train_timesteps, hoist

    def forward(self, x_T: torch.Tensor, text: torch.Tensor, added: dict[str, torch.Tensor] | None = None):
        return loop_free(self.model, x_T, self.sigmas, Conditioning(text, added), shared_blocks=self.shared_blocks,
                         hoist=self.hoist, num_train_timesteps=self.num_train_timesteps)

    def sample(self, use):
        """``use()``, run as a forward of this module (as the UNet Generator's)."""
        return use()
