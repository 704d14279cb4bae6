"""LoopFreePipeline: deterministic, saves/loads (also in plain diffusers), loop mode equals diffusers' own DDIM."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from loopfree.pipelines.loading import load_pipeline
from loopfree.pipelines.pipeline import LoopFreePipeline, LoopFreeXLPipeline
from tiny import make_pipeline

PROMPTS = ["a red cat", "a photo of the blue dog"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    pipe = make_pipeline(root, request.param)
    pipe.decoder_timesteps = [751, 501, 251, 1]
    pipe.save_pretrained(root / "pipe")
    return request.param, pipe, root / "pipe"


def test_same_seed_same_images_and_save_load_roundtrip(saved):
    kind, pipe, path = saved
    a = pipe(PROMPTS, generator=_gen(), output_type="pt").images
    b = pipe(PROMPTS, generator=_gen(), output_type="pt").images
    assert torch.equal(a, b)
    loaded = load_pipeline(path)
    assert type(loaded) is (LoopFreeXLPipeline if kind == "sdxl" else LoopFreePipeline)
    assert loaded.decoder_timesteps == [751, 501, 251, 1]
    assert torch.equal(loaded(PROMPTS, generator=_gen(), output_type="pt").images, a)
    assert not torch.equal(pipe(PROMPTS, generator=_gen(1), output_type="pt").images, a)


def test_plain_diffusers_loads_the_saved_directory(saved):
    kind, pipe, path = saved
    plain = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == plain.__name__
    assert type(DiffusionPipeline.from_pretrained(path)) is plain
    loaded = plain.from_pretrained(path)
    for a, b in zip(loaded.unet.state_dict().values(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_loop_mode_equals_diffusers_ddim_pipeline(saved, guidance):
    kind, pipe, path = saved
    plain_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    plain = plain_cls(**pipe.components)
    plain.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=_gen(5))
    ours = pipe(PROMPTS, num_inference_steps=5, guidance_scale=guidance, latents=latents, output_type="latent", mode="loop").images
    ref = plain(PROMPTS, num_inference_steps=5, guidance_scale=guidance, latents=latents, output_type="latent").images
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_v_prediction_loop_mode_equals_diffusers(tmp_path):
    pipe = make_pipeline(tmp_path, "sd", "v_prediction")
    plain = StableDiffusionPipeline(**pipe.components)
    plain.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(1, 4, 8, 8, generator=_gen(2))
    ours = pipe("a red cat", num_inference_steps=3, guidance_scale=2.0, latents=latents, output_type="latent", mode="loop").images
    ref = plain("a red cat", num_inference_steps=3, guidance_scale=2.0, latents=latents, output_type="latent").images
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_output_types_and_images_per_prompt(saved):
    kind, pipe, _ = saved
    out = pipe(PROMPTS, num_images_per_prompt=2, generator=_gen(), output_type="pil")
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    assert pipe("a red cat", output_type="np").images.shape == (1, 16, 16, 3)
    assert pipe("a red cat", output_type="pt", height=18, width=16).images.shape == (1, 3, 18, 16)  # odd latent height 9


def test_bad_arguments_raise(saved):
    _, pipe, _ = saved
    with pytest.raises(ValueError, match="multiple of 2"):
        pipe("a red cat", height=15)
    with pytest.raises(ValueError, match="mode"):
        pipe("a red cat", mode="fast")
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps must be in 1..1000"):
            pipe("a red cat", num_inference_steps=steps)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        pipe("a red cat", guidance_scale=float("nan"))
    for bad, why in [([501, 751], "strictly decreasing"), ([751, 751], "strictly decreasing"), ([1000, 1], r"\[0, 999\]"),
                     ([5, -1], r"\[0, 999\]"), ([], "empty"), ([7.5], "integers")]:
        with pytest.raises(ValueError, match=why):
            pipe("a red cat", timesteps=bad)
    with pytest.raises(ValueError, match="2 timesteps given but steps is 3"):
        pipe("a red cat", timesteps=[751, 1], num_inference_steps=3)


def test_recorded_timesteps_are_the_default_and_other_k_is_explicit(saved, caplog):
    """Defect 1: a student that recorded its own decoder timesteps (a one-step student: [999], ā_final 1) is sampled
    with them by default; another K uses the scheduler's DDIM timesteps and says so."""
    _, pipe, _ = saved
    one_step = type(pipe)(**pipe.components)
    one_step.decoder_timesteps, one_step.final_alpha_cumprod = [999], 1.0
    plan = one_step.plan_steps("loop_free")
    assert (plan.num_steps, plan.timesteps, plan.final_alpha_cumprod) == (1, [999], 1.0)
    assert one_step.plan_steps("loop_free", 1) == plan and one_step.plan_steps("loop_free", None, [999]) == plan
    default = one_step("a red cat", generator=_gen(), output_type="latent").images
    explicit = one_step("a red cat", generator=_gen(), output_type="latent", timesteps=[999]).images
    assert torch.equal(default, explicit)
    caplog.clear()
    other = one_step.plan_steps("loop_free", 4)
    assert other.timesteps == [751, 501, 251, 1] and other.final_alpha_cumprod is None
    assert "distilled for decoder timesteps [999]" in caplog.text
    teacher = type(pipe)(**pipe.components)  # records nothing: K = 4 of the scheduler (paper), loops 50 steps
    assert teacher.plan_steps("loop_free").timesteps == [751, 501, 251, 1]
    assert teacher.plan_steps("loop").num_steps == 50 and teacher.plan_steps("loop", 8).num_steps == 8


def test_initial_noise_is_unit_gaussian_whatever_the_shipped_scheduler(saved):
    from diffusers import EulerDiscreteScheduler

    _, pipe, _ = saved
    ddim_out = pipe("a red cat", generator=_gen(), output_type="latent").images
    euler = type(pipe)(**{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config)})
    assert euler.scheduler.init_noise_sigma > 1
    euler.decoder_timesteps = pipe.decoder_timesteps
    assert torch.allclose(euler("a red cat", generator=_gen(), output_type="latent").images, ddim_out)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("a red cat", latents=torch.zeros(1, 4, 3, 3))


@pytest.mark.parametrize("force_upcast", [True, False])
def test_an_fp16_vae_decodes_in_fp32_when_its_config_forces_the_upcast(tmp_path, force_upcast):
    pipe = make_pipeline(tmp_path, "sdxl")
    pipe.vae.register_to_config(force_upcast=force_upcast)
    pipe.vae.to(torch.float16)
    seen = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    image = pipe.decode(torch.randn(1, 4, 8, 8, generator=_gen()), "pt")
    hook.remove()
    assert seen == [torch.float32 if force_upcast else torch.float16] and torch.isfinite(image).all()
    assert pipe.vae.dtype == torch.float16  # handed back as it was
