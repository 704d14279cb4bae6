"""LoopFreePipeline: deterministic, saves/loads (also in plain diffusers), loop mode equals diffusers' own DDIM."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from loopfree.pipeline import LoopFreePipeline, LoopFreeXLPipeline, load_pipeline
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
    with pytest.raises(ValueError, match="at least 1"):
        pipe("a red cat", num_inference_steps=0)


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
