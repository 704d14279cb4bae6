"""Encoder propagation (Faster Diffusion): every step a key step is diffusers' DDIM loop, key steps [0] the one-pass
sampler over all N timesteps, and any key-step schedule equals a plain step-by-step reference."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler
from PIL import Image

from loopfree.cli import main
from loopfree.method.sampler import FASTER_DIFFUSION_KEY_STEPS, Conditioning, check_key_steps, default_key_steps, loop_free, propagate
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.method.split import run_decoders, run_encoder
from tiny import make_pipeline, make_scheduler, make_unet, sdxl_added_cond

PROMPTS = ["a red cat", "a photo of the blue dog"]


@pytest.fixture(scope="module", params=[("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon"), ("sdxl", "v_prediction")],
                ids=lambda p: "-".join(p))
def pipe(request, tmp_path_factory):
    kind, prediction = request.param
    pipe = make_pipeline(tmp_path_factory.mktemp(kind), kind, prediction)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, mode, steps=6, **kw):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=kw.pop("guidance", 3.0), latents=x_T, output_type="latent",
                mode=mode, **kw).images


def test_every_step_a_key_step_is_the_ddim_loop(pipe):
    loop = _latents(pipe, "loop")
    assert torch.allclose(_latents(pipe, "propagate", key_steps=list(range(6))), loop, atol=1e-5, rtol=1e-5)
    unguided = _latents(pipe, "loop", guidance=1.0)
    assert torch.allclose(_latents(pipe, "propagate", key_steps=list(range(6)), guidance=1.0), unguided, atol=1e-5, rtol=1e-5)


def test_first_step_only_is_the_shared_encoder_loop(pipe):
    """Key steps [0]: the encoder once at τ_N, all N decoders on its features = the loop-free pass with K = N."""
    shared = _latents(pipe, "propagate", key_steps=[0])
    assert torch.allclose(shared, _latents(pipe, "loop_free"), atol=1e-6)  # loop_free with K = 6 DDIM timesteps
    assert not torch.allclose(shared, _latents(pipe, "loop"), atol=1e-3)  # the encoder really is shared


def _reference(unet, scheduler, x_T, n, keys, text, added=None):
    """Step by step with diffusers: unet(x, t) at key steps, at the others the decoder alone on the last key
    step's encoder features; diffusers' DDIMScheduler.step after every step."""
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(n)
    x, feats = x_T, None
    for i, t in enumerate(sched.timesteps):
        if i in keys:
            out = unet(x, t, text, added_cond_kwargs=added).sample
            feats = run_encoder(unet, x, t, text, added)
        else:
            out = run_decoders(unet, feats, [int(t)])[0]
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("kind, prediction, spacing", [("sd", "epsilon", "leading"), ("sd", "v_prediction", "trailing"),
                                                       ("sdxl", "epsilon", "trailing"), ("sdxl", "v_prediction", "leading")])
def test_any_key_steps_equal_the_step_by_step_reference(kind, prediction, spacing):
    unet, sched = make_unet(kind), make_scheduler(prediction, timestep_spacing=spacing)
    g = torch.Generator().manual_seed(0)
    x_T, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    added = sdxl_added_cond(2) if kind == "sdxl" else None
    n, keys = 10, default_key_steps(10)
    calls = []
    with torch.no_grad():
        ours = propagate(unet, NoiseSchedule.from_scheduler(sched), x_T, decoder_timesteps(sched.config, n), keys,
                         Conditioning(text, added), callback=lambda i, eps: calls.append((i, eps.shape)))
        ref = _reference(unet, sched, x_T, n, keys, text, added)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert calls == [(i, x_T.shape) for i in range(n)]


def test_callback_gets_the_noise_predictions_of_the_one_pass():
    unet, sched = make_unet(), make_scheduler("v_prediction")
    schedule, ts = NoiseSchedule.from_scheduler(sched), decoder_timesteps(sched.config, 4)
    x_T, cond = torch.randn(1, 4, 8, 8), Conditioning(torch.randn(1, 5, 16))
    seen = {}
    with torch.no_grad():
        propagate(unet, schedule, x_T, ts, [0], cond, callback=lambda i, eps: seen.setdefault(i, eps))
        _, eps = loop_free(unet, schedule, x_T, ts, cond)
    assert torch.allclose(torch.stack([seen[i] for i in range(4)]), eps)


def test_default_key_steps_are_faster_diffusions():
    assert default_key_steps(50) == list(FASTER_DIFFUSION_KEY_STEPS) == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert default_key_steps(100) == [0, 2, 4, 6, 10, 20, 30, 50, 70]
    assert default_key_steps(10) == [0, 1, 2, 3, 5, 7] and default_key_steps(1) == [0]


@pytest.mark.parametrize("keys, why", [([], "empty"), ([0, 6], "key step 6 is not in the 6-step schedule"), ([-1, 0], "key step -1"),
                                       ([1, 3], "must include the first step"), ([0, 3, 2], "strictly increasing"),
                                       ([0, 0], "strictly increasing"), ([0, 1.5], "integers")])
def test_bad_key_steps_raise(keys, why):
    with pytest.raises(ValueError, match=why):
        check_key_steps(keys, 6)


def test_pipeline_plans_propagate(tmp_path):
    pipe = make_pipeline(tmp_path, "sd")
    plan = pipe.plan_steps("propagate")
    assert plan.num_steps == 50 and plan.timesteps == decoder_timesteps(pipe.scheduler.config, 50)
    assert plan.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert pipe.plan_steps("propagate", 8, key_steps=[0, 4]).key_steps == [0, 4]
    assert pipe.plan_steps("propagate", None, [900, 500, 100], [0, 2]).timesteps == [900, 500, 100]
    with pytest.raises(ValueError, match="key step 8 is not in the 8-step schedule"):
        pipe.plan_steps("propagate", 8, key_steps=[0, 8])
    with pytest.raises(ValueError, match="key steps belong to the propagate mode"):
        pipe.plan_steps("loop", 8, key_steps=[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    make_pipeline(tmp_path_factory.mktemp("tiny"), "sd").save_pretrained(folder := tmp_path_factory.mktemp("model"))
    return folder


def test_generate_mode_propagate(model_dir, tmp_path):
    args = ["generate", "a red cat", "--model", str(model_dir), "--mode", "propagate", "--steps", "5", "--seed", "1"]
    r = CliRunner().invoke(main, [*args, "--key-steps", "0,2", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "a" / "generate.json").read_text())
    assert settings["mode"] == "propagate" and settings["key_steps"] == [0, 2] and settings["steps"] == 5
    assert CliRunner().invoke(main, [*args, "--key-steps", "0,1,2,3,4", "--out", str(tmp_path / "b")]).exit_code == 0
    assert CliRunner().invoke(main, [*args[:5], "loop", *args[6:], "--out", str(tmp_path / "c")]).exit_code == 0
    every_step, loop = (np.asarray(Image.open(tmp_path / d / "000.png"), dtype=int) for d in "bc")
    assert np.abs(every_step - loop).max() <= 1  # the same image up to float rounding


@pytest.mark.parametrize("extra, message", [(["--mode", "propagate", "--key-steps", "0,9"], "key step 9 is not in the 5-step schedule"),
                                            (["--mode", "propagate", "--key-steps", "2,3"], "must include the first step"),
                                            (["--mode", "loop", "--key-steps", "0"], "key steps belong to the propagate mode"),
                                            (["--mode", "propagate", "--key-steps", ""], "the list is empty")])
def test_generate_bad_key_steps_exit_2_and_write_nothing(model_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["generate", "a red cat", "--model", str(model_dir), "--steps", "5", *extra, "--out", str(out)])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()
