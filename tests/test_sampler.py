"""The DDIM combination against diffusers' DDIMScheduler, and the one-pass sampler against the split."""

import pytest
import torch

from loopfree.method.sampler import Conditioning, ddim_combine, loop_free
from loopfree.method.schedule import NoiseSchedule, decoder_timesteps
from loopfree.method.split import run_decoders, run_encoder
from tiny import make_scheduler, make_unet


def test_sd21_base_default_decoder_timesteps():
    assert decoder_timesteps(make_scheduler().config, 4) == [751, 501, 251, 1]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be in 1..1000"):
            decoder_timesteps(make_scheduler().config, bad)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("K", [1, 4])
def test_combination_equals_chained_ddim_step(spacing, alpha_to_one, prediction_type, K):
    sched = make_scheduler(prediction_type, timestep_spacing=spacing, set_alpha_to_one=alpha_to_one)
    ts = decoder_timesteps(sched.config, K)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    outputs = torch.randn(K, 2, 4, 8, 8, generator=g)

    ref = make_scheduler(prediction_type, timestep_spacing=spacing, set_alpha_to_one=alpha_to_one)
    ref.set_timesteps(K)
    x = x_T
    for k, t in enumerate(ref.timesteps):
        x = ref.step(outputs[k], t, x, eta=0.0).prev_sample

    x0, eps = ddim_combine(NoiseSchedule.from_scheduler(sched), x_T, outputs, ts)
    assert torch.allclose(x0, x, rtol=1e-5, atol=1e-5)
    assert eps.shape == outputs.shape
    if prediction_type == "epsilon":
        assert torch.equal(eps, outputs)


def test_unrolled_weights_match_hand_computation():
    """x_0 = sqrt(ā_f/ā_K) x_T + Σ c_k ε^k, c_k = sqrt(ā_f)(sqrt(1/ā_{k-1}-1) - sqrt(1/ā_k-1)) (SPEC §2)."""
    sched = make_scheduler()
    ac, af = sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod)
    ts = [751, 501, 251, 1]
    abar = [ac[t].item() for t in ts] + [af]
    s = NoiseSchedule.from_scheduler(sched)
    x0, _ = ddim_combine(s, torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.zeros(4, 1, 1, 1, 1, dtype=torch.float64), ts)
    assert x0.item() == pytest.approx((af / abar[0]) ** 0.5, rel=1e-12)
    for k in range(4):
        onehot = torch.zeros(4, 1, 1, 1, 1, dtype=torch.float64)
        onehot[k] = 1.0
        x0, _ = ddim_combine(s, torch.zeros(1, 1, 1, 1, dtype=torch.float64), onehot, ts)
        c_k = af**0.5 * ((1 / abar[k + 1] - 1) ** 0.5 - (1 / abar[k] - 1) ** 0.5)
        assert x0.item() == pytest.approx(c_k, rel=1e-12)
    assert abs(c_k) == pytest.approx(0.01, abs=0.005)  # the τ=1 decoder barely matters


def test_explicit_timesteps_follow_their_own_list():
    s = NoiseSchedule.from_scheduler(make_scheduler())
    x_T, out = torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(2, 1, 4, 2, 2, dtype=torch.float64)
    x0, _ = ddim_combine(s, x_T, out, [900, 300])
    a900, a300, af = (s.alpha_bar(t).item() for t in (900, 300, -1))
    x = (a300 / a900) ** 0.5 * x_T + a300**0.5 * ((1 / a300 - 1) ** 0.5 - (1 / a900 - 1) ** 0.5) * out[0]
    x = (af / a300) ** 0.5 * x + af**0.5 * ((1 / af - 1) ** 0.5 - (1 / a300 - 1) ** 0.5) * out[1]
    assert torch.allclose(x0, x, rtol=1e-12)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_loop_free_is_encoder_once_then_decoders(guidance):
    unet, sched = make_unet("sd"), make_scheduler()
    s = NoiseSchedule.from_scheduler(sched)
    ts = [751, 501, 251, 1]
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = Conditioning(torch.randn(2, 5, 16, generator=g)), Conditioning(torch.randn(2, 5, 16, generator=g))
    with torch.no_grad():
        x0, eps = loop_free(unet, s, x_T, ts, cond, uncond, guidance)
        e_c = run_decoders(unet, run_encoder(unet, x_T, 751, cond.text), ts)
        e_u = run_decoders(unet, run_encoder(unet, x_T, 751, uncond.text), ts)
    ref_eps = e_u + guidance * (e_c - e_u)
    assert torch.allclose(eps, ref_eps, atol=1e-5)
    assert torch.allclose(x0, ddim_combine(s, x_T, ref_eps, ts)[0], atol=1e-5)


def test_one_step_generator_is_the_swiftbrush_reparameterisation():
    """K = 1, τ = [999], ā_final = 1 gives x_0 = (x_T - sqrt(1-ā_T) ε_θ(x_T, T)) / sqrt(ā_T) (SPEC §3)."""
    from loopfree.method.sampler import Generator

    unet, sched = make_unet("sd"), make_scheduler()
    x_T, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        x0, eps = Generator(unet, NoiseSchedule.from_scheduler(sched, 1.0), [999])(x_T, c)
        e = unet(x_T, 999, c).sample
    ab = sched.alphas_cumprod[999].double().item()
    assert torch.allclose(eps[0], e, atol=1e-5)
    assert torch.allclose(x0, (x_T - (1 - ab) ** 0.5 * e) / ab**0.5, atol=1e-5)


def test_ddim_loop_leaves_the_callers_scheduler_untouched():
    """bench shared one scheduler between rows and ddim_loop re-set its timesteps (module-level mutable state)."""
    from loopfree.method.sampler import ddim_loop

    scheduler = make_scheduler()
    scheduler.set_timesteps(4)
    before = scheduler.timesteps.clone()
    unet = make_unet()
    with torch.no_grad():
        ddim_loop(unet, scheduler, torch.randn(1, 4, 8, 8), 3, Conditioning(torch.randn(1, 4, 16)))
    assert torch.equal(scheduler.timesteps, before)
