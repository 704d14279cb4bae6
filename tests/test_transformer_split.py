"""The transformer splits (PixArt, SD3/SD3.5, FLUX schnell/dev) reproduce the model's own forward, and their one
pass equals diffusers' scheduler stepped over the model's own outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from loopfree.method import flow, split_flux, split_pixart, split_sd3
from loopfree.method.sampler import Conditioning, ddim_combine
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.utils.errors import LoopfreeError
from tiny import make_scheduler

B = 2
KINDS = ["pixart", "pixart-sizes", "sd3", "sd35", "flux", "flux-dev"]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its initialisation, so every block and modulation matters to the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind.startswith("pixart"):  # inner dim 12: the size embedding takes a third of it per axis
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8,
                                         num_layers=4, cross_attention_dim=12, sample_size=8, patch_size=2,
                                         caption_channels=10, use_additional_conditions=kind == "pixart-sizes")
    elif kind.startswith("sd3"):  # sd35: a dual-attention block and q/k RMS norms, as SD3.5
        extra = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if kind == "sd35" else {}
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=4,
                                      num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=8,
                                      pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8, **extra)
    else:  # 2 double-stream + 2 single-stream blocks; rotary axes sum to the head dim
        model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                       pooled_projection_dim=6, guidance_embeds=kind == "flux-dev", axes_dims_rope=(2, 2, 4))
    return _perturbed(model)


def image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline's latent positions: (0, row, column) per packed token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@dataclass
class Case:
    """One tiny model with its inputs, the split's two calls and the model's own forward on the same inputs."""

    kind: str
    model: torch.nn.Module
    split: object  # the family's module
    num_blocks: int
    x: torch.Tensor
    cond: Conditioning
    timesteps: list  # τ_K > … > τ_1 in the model's own units
    extra: dict  # family inputs besides (x, t, text): FLUX positions and guidance

    def shared(self, n: int | None, cond: Conditioning | None = None, x: torch.Tensor | None = None):
        c, x = cond or self.cond, self.x if x is None else x
        a = dict(c.added)
        if self.split is split_pixart:
            mask = a.pop("attention_mask")
            return split_pixart.run_shared(self.model, x, self.timesteps[0], c.text, a or None, mask, n)
        if self.split is split_sd3:
            return split_sd3.run_shared(self.model, x, self.timesteps[0], c.text, a["pooled_projections"], n)
        return split_flux.run_shared(self.model, x, self.timesteps[0], c.text, a["pooled_projections"],
                                     shared_blocks=n, **self.extra)

    def per_step(self, feats, timesteps, hoist: bool = True) -> torch.Tensor:
        return self.split.run_per_step(self.model, feats, timesteps, hoist)

    def forward(self, t, cond: Conditioning | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
        c, x = cond or self.cond, self.x if x is None else x
        a, ts = dict(c.added), torch.tensor([t] * x.shape[0])
        if self.split is split_pixart:
            mask = a.pop("attention_mask")
            return self.model(x, c.text, timestep=ts, added_cond_kwargs=a or None, encoder_attention_mask=mask).sample
        if self.split is split_sd3:
            return self.model(x, c.text, a["pooled_projections"], ts).sample
        g = self.extra["guidance"]
        g = None if g is None else torch.full((x.shape[0],), float(g))
        return self.model(x, c.text, a["pooled_projections"], ts, self.extra["img_ids"], self.extra["txt_ids"], g).sample


def conditioning(kind: str, seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    if kind.startswith("pixart"):
        mask = torch.ones(B, 5)
        mask[0, 3:] = 0  # a short prompt: its padding tokens masked out
        added = {"attention_mask": mask}
        if kind == "pixart-sizes":
            added |= {"resolution": torch.tensor([[64.0, 64.0], [64.0, 48.0]]), "aspect_ratio": torch.tensor([[1.0], [0.75]])}
        return Conditioning(torch.randn(B, 5, 10, generator=g), added)
    return Conditioning(torch.randn(B, 5, 12, generator=g), {"pooled_projections": torch.randn(B, 6, generator=g)})


def make_case(kind: str) -> Case:
    model = make_model(kind)
    g = torch.Generator().manual_seed(1)
    if kind.startswith("pixart"):
        return Case(kind, model, split_pixart, 4, torch.randn(B, 4, 8, 8, generator=g), conditioning(kind, 2),
                    [751, 501, 251, 1], {})
    if kind.startswith("sd3"):
        return Case(kind, model, split_sd3, 4, torch.randn(B, 4, 8, 6, generator=g), conditioning(kind, 2),
                    [1000.0, 908.9, 751.5, 500.25], {})
    extra = dict(img_ids=image_ids(4, 3), txt_ids=torch.zeros(5, 3), guidance=3.5 if kind == "flux-dev" else None)
    return Case(kind, model, split_flux, 4, torch.randn(B, 12, 8, generator=g), conditioning(kind, 2),
                [1.0, 0.9, 0.75, 0.5], extra)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", ["none", "one", "half", "all"])
def test_split_at_tau_K_everywhere_equals_the_forward(kind, n):
    """Any N, every decoder at τ_K: each of the K per-step outputs is the model's own forward at (x_T, τ_K)."""
    case = make_case(kind)
    shared = {"none": 0, "one": 1, "half": case.num_blocks // 2, "all": case.num_blocks}[n]
    tau = case.timesteps[0]
    with torch.no_grad():
        ref = case.forward(tau)
        out = case.per_step(case.shared(shared), [tau] * 3)
    assert out.shape == (3, *ref.shape)
    for k in range(3):
        assert rel_err(out[k], ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("hoist", [True, False])
def test_no_shared_blocks_gives_the_forward_at_each_timestep(kind, hoist):
    """N = 0: S is only the τ-free embedding, so per-step output k is the forward at (x_T, τ_k)."""
    case = make_case(kind)
    with torch.no_grad():
        out = case.per_step(case.shared(0), case.timesteps, hoist)
        refs = [case.forward(t) for t in case.timesteps]
    for k, ref in enumerate(refs):
        assert rel_err(out[k], ref) <= 1e-5
    assert rel_err(refs[0], refs[-1]) > 1e-3  # the timesteps really differ in what they give


@pytest.mark.parametrize("kind", KINDS)
def test_hoisted_per_step_equals_plain_and_separate_calls(kind):
    """The hoisted embeddings equal the plain K·B-row ones, and the K decoders batched equal K separate calls."""
    case = make_case(kind)
    with torch.no_grad():
        feats = case.shared(None)
        hoisted = case.per_step(feats, case.timesteps)
        plain = case.per_step(feats, case.timesteps, hoist=False)
        separate = torch.stack([case.per_step(feats, [t])[0] for t in case.timesteps])
        unshared = case.per_step(case.shared(0), case.timesteps)
    assert feats.shared_blocks == case.num_blocks // 2
    assert rel_err(hoisted, plain) <= 1e-6
    assert rel_err(hoisted, separate) <= 1e-5
    assert rel_err(hoisted[-1], unshared[-1]) > 1e-3  # sharing blocks at τ_K changes what the τ_1 decoder sees


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux"])
def test_shared_blocks_out_of_range_is_refused(kind):
    case = make_case(kind)
    for bad in (-1, case.num_blocks + 1):
        with pytest.raises(LoopfreeError, match=f"N={bad} is out of range: this model has 4 blocks"):
            case.shared(bad)
    with pytest.raises(LoopfreeError, match="must be an integer"):
        case.shared(1.5)


def test_flux_guidance_must_match_the_model():
    dev, schnell = make_case("flux-dev"), make_case("flux")
    with pytest.raises(LoopfreeError, match="embeds the guidance scale"):
        split_flux.run_shared(dev.model, dev.x, 1.0, dev.cond.text, dev.cond.added["pooled_projections"],
                              **{**dev.extra, "guidance": None})
    with pytest.raises(LoopfreeError, match="has no guidance embedding"):
        split_flux.run_shared(schnell.model, schnell.x, 1.0, schnell.cond.text, schnell.cond.added["pooled_projections"],
                              **{**schnell.extra, "guidance": 3.5})


def test_size_conditioned_pixart_needs_the_sizes_and_the_512_pipelines_none_sizes_pass():
    case = make_case("pixart-sizes")
    for sizes in (None, {"resolution": None, "aspect_ratio": None}):
        with pytest.raises(LoopfreeError, match="size-conditioned"):
            split_pixart.run_shared(case.model, case.x, 751, case.cond.text, sizes)
    case = make_case("pixart")  # PixArtAlphaPipeline passes None sizes to models that aren't size-conditioned
    nones = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        feats = split_pixart.run_shared(case.model, case.x, 751, case.cond.text, nones)
        out = split_pixart.run_per_step(case.model, feats, [751])
        ref = case.model(case.x, case.cond.text, timestep=torch.tensor([751, 751]), added_cond_kwargs=nones).sample
    assert rel_err(out[0], ref) <= 1e-5


@pytest.mark.parametrize("kind", ["sd35", "flux-dev"])
def test_gradients_reach_the_shared_blocks_from_every_decoder_and_checkpointing_keeps_them(kind):
    grads = []
    for checkpointing in (False, True):
        case = make_case(kind)
        case.model.train()
        if checkpointing:
            case.model.enable_gradient_checkpointing()
        first_shared = next(iter(case.model.transformer_blocks[0].parameters()))
        out = case.per_step(case.shared(3), case.timesteps)
        for k in range(len(case.timesteps)):
            (g,) = torch.autograd.grad(out[k].square().mean(), first_shared, retain_graph=True)
            assert g.abs().sum() > 0
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in case.model.parameters() if p.grad is not None]))
    assert rel_err(grads[1], grads[0]) <= 1e-5


# The one pass against diffusers' schedulers stepped over the model's own forward at (x_T, τ_k) — what the per-step
# outputs are when N = 0 — with classifier-free guidance over [uncond; cond] where the scale isn't 1.


@pytest.mark.parametrize("kind", ["pixart", "pixart-sizes"])
@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_pixart_one_pass_is_ddim_stepped_over_its_noise_predictions(kind, scale):
    case, sched = make_case(kind), make_scheduler()
    uncond = conditioning(kind, 3)
    ts = decoder_timesteps(sched.config, 4)
    ref = DDIMScheduler.from_config(sched.config)
    ref.set_timesteps(4)
    x = case.x
    with torch.no_grad():
        for t in ref.timesteps:
            out = case.forward(int(t))
            if scale != 1.0:
                out_u = case.forward(int(t), uncond)
                out = out_u + scale * (out - out_u)
            x = ref.step(out.chunk(2, dim=1)[0], t, x, eta=0.0).prev_sample  # learned variance: ε is the first half
        x0, eps = split_pixart.loop_free(case.model, NoiseSchedule.from_scheduler(sched), case.x, ts, case.cond, uncond,
                                         scale, shared_blocks=0)
    assert eps.shape == (4, *case.x.shape)
    assert rel_err(x0, x) <= 1e-5


def flow_reference(kind: str, case: Case, num_steps: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler set for K steps the way StableDiffusion3Pipeline / FluxPipeline set it."""
    if kind.startswith("sd3"):
        ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
        ref.set_timesteps(num_steps)
        return ref
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1's config
    seq = case.x.shape[1]
    ref.set_timesteps(sigmas=[1.0 - i / num_steps for i in range(num_steps)], mu=calculate_shift(seq))
    return ref


@pytest.mark.parametrize("kind", ["sd3", "sd35", "flux", "flux-dev"])
@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_flow_one_pass_is_euler_stepped_over_its_velocities(kind, scale):
    case = make_case(kind)
    uncond = conditioning(kind, 3)
    ref = flow_reference(kind, case, 4)
    model_t = (lambda t: float(t)) if kind.startswith("sd3") else (lambda t: float(t) / 1000)  # as each pipeline passes it
    x = case.x
    with torch.no_grad():
        for t in ref.timesteps:
            out = case.forward(model_t(t))
            if scale != 1.0:
                out_u = case.forward(model_t(t), uncond)
                out = out_u + scale * (out - out_u)
            x = ref.step(out, t, x).prev_sample
        if kind.startswith("sd3"):
            sigmas = flow.decoder_sigmas(ref.config, 4)
            x0, eps = split_sd3.loop_free(case.model, case.x, sigmas, case.cond, uncond, scale, shared_blocks=0)
        else:
            sigmas = flow.decoder_sigmas(ref.config, 4, image_seq_len=case.x.shape[1], pipeline="flux")
            x0, eps = split_flux.loop_free(case.model, case.x, sigmas, case.cond, case.extra["img_ids"],
                                           case.extra["txt_ids"], case.extra["guidance"], uncond, scale, shared_blocks=0)
    assert eps.shape == (4, *case.x.shape)
    assert rel_err(x0, x) <= 1e-5


@pytest.mark.parametrize("kind", ["pixart-sizes", "sd35", "flux-dev"])
def test_one_pass_with_shared_blocks_combines_the_split_outputs(kind):
    """At the default N (L/2) the one pass is the per-step outputs of S at τ_K, guided, then combined."""
    case, uncond = make_case(kind), conditioning(kind, 3)
    with torch.no_grad():
        out_c = case.per_step(case.shared(2), case.timesteps)
        out_u = case.per_step(case.shared(2, uncond), case.timesteps)
        guided = out_u + 2.0 * (out_c - out_u)
        if kind == "pixart-sizes":
            schedule = NoiseSchedule.from_scheduler(make_scheduler())
            x0, _ = split_pixart.loop_free(case.model, schedule, case.x, case.timesteps, case.cond, uncond, 2.0)
            ref, _ = ddim_combine(schedule, case.x, guided[:, :, :4], case.timesteps)
        elif kind == "sd35":
            sigmas = [t / 1000 for t in case.timesteps]
            x0, _ = split_sd3.loop_free(case.model, case.x, sigmas, case.cond, uncond, 2.0)
            ref, _ = flow.euler_combine(case.x, guided, sigmas)
        else:
            x0, _ = split_flux.loop_free(case.model, case.x, case.timesteps, case.cond, case.extra["img_ids"],
                                         case.extra["txt_ids"], case.extra["guidance"], uncond, 2.0)
            ref, _ = flow.euler_combine(case.x, guided, case.timesteps)
    assert rel_err(x0, ref) <= 1e-5
