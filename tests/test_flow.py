"""Rectified-flow maths against diffusers' FlowMatchEulerDiscreteScheduler and hand computations (SPEC §6)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from loopfree.method import flow
from loopfree.utils.errors import LoopfreeError

SD3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's scheduler config
FLUX_DEV = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def _shift(s: float, sigma: np.ndarray) -> np.ndarray:
    return s * sigma / (1 + (s - 1) * sigma)  # σ' = s σ / (1 + (s − 1) σ)


@pytest.mark.parametrize("K", [1, 4, 28])
def test_sd3_decoder_sigmas_are_the_shifted_schedule(K):
    """SD3's pipeline sets K steps with K alone: K σ's spaced evenly between the shifted training schedule's ends,
    shifted (s = 3)."""
    ends = _shift(3.0, np.array([1.0, 1 / 1000]))
    expected = _shift(3.0, np.linspace(ends[0], ends[1], K))
    assert flow.decoder_sigmas(SD3, K) == pytest.approx(expected.tolist(), rel=1e-6)


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("seq", [256, 1024, 4096])
def test_flux_decoder_sigmas_shift_by_resolution(K, seq):
    """FluxPipeline: sigmas linspace(1, 1/K, K), shifted by μ(image tokens): e^μ / (e^μ + 1/σ − 1)."""
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)  # diffusers' own formula
    assert flow.flux_mu(FLUX_DEV, seq) == pytest.approx(mu, rel=1e-12)
    base = np.linspace(1.0, 1 / K, K)
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    assert flow.decoder_sigmas(FLUX_DEV, K, image_seq_len=seq, pipeline="flux") == pytest.approx(expected.tolist(), rel=1e-6)
    assert flow.decoder_sigmas(FLUX_SCHNELL, K, pipeline="flux") == pytest.approx(base.tolist(), rel=1e-6)


@pytest.mark.parametrize("config,kwargs", [(SD3, {}), (FLUX_DEV, dict(image_seq_len=1024, pipeline="flux")),
                                           (FLUX_SCHNELL, dict(pipeline="flux"))])
@pytest.mark.parametrize("K", [1, 4])
def test_euler_combination_equals_chained_scheduler_steps(config, kwargs, K):
    sigmas = flow.decoder_sigmas(config, K, **kwargs)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    v = torch.randn(K, 2, 4, 8, 8, generator=g)

    ref = FlowMatchEulerDiscreteScheduler(**config)
    if kwargs:  # as FluxPipeline
        mu = calculate_shift(1024) if config is FLUX_DEV else None
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / K, K), mu=mu)
    else:
        ref.set_timesteps(K)
    x = x_T
    for k, t in enumerate(ref.timesteps):
        x = ref.step(v[k], t, x).prev_sample

    x0, eps = flow.euler_combine(x_T, v, sigmas)
    assert torch.allclose(x0, x, rtol=1e-5, atol=1e-5)
    assert eps.shape == v.shape


def test_euler_noise_estimates_use_the_running_sample():
    """ε̂_k = x_k + (1 − σ_k) v_k with x_k the running sample: two steps by hand."""
    x_T, v = torch.randn(1, 3, dtype=torch.float64), torch.randn(2, 1, 3, dtype=torch.float64)
    x0, eps = flow.euler_combine(x_T, v, [0.8, 0.3])
    x1 = x_T + (0.3 - 0.8) * v[0]
    assert torch.allclose(eps[0], x_T + 0.2 * v[0]) and torch.allclose(eps[1], x1 + 0.7 * v[1])
    assert torch.allclose(x0, x1 - 0.3 * v[1])


@pytest.mark.parametrize("per_item", [False, True])
def test_conversions_invert_the_forward_process(per_item):
    """x_σ = (1 − σ) x_0 + σ ε and v = ε − x_0 (written out here); every conversion recovers its target."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64) if per_item else 0.7
    s = sigma.reshape(-1, 1, 1, 1) if per_item else sigma
    x, v = (1 - s) * x0 + s * eps, eps - x0
    assert torch.allclose(flow.diffuse(x0, eps, sigma), x)
    assert torch.allclose(flow.x0_from_v(x, sigma, v), x0) and torch.allclose(flow.eps_from_v(x, sigma, v), eps)
    assert torch.allclose(flow.v_from_x0(x, sigma, x0), v) and torch.allclose(flow.v_from_eps(x, sigma, eps), v)
    assert torch.allclose(flow.x0_from_eps(x, sigma, eps), x0) and torch.allclose(flow.eps_from_x0(x, sigma, x0), eps)


def test_bad_inputs_are_refused():
    with pytest.raises(LoopfreeError, match="pass image_seq_len"):
        flow.decoder_sigmas(FLUX_DEV, 4, pipeline="flux")
    with pytest.raises(LoopfreeError, match="deterministic"):
        flow.decoder_sigmas(dict(SD3, stochastic_sampling=True), 4)
    with pytest.raises(LoopfreeError, match="steps must be in 1..1000"):
        flow.decoder_sigmas(SD3, 0)
    with pytest.raises(LoopfreeError, match="pipeline must be"):
        flow.decoder_sigmas(SD3, 4, pipeline="sdxl")
    for bad in ([], [0.5, 0.7], [1.2, 0.5], [0.5, 0.0]):
        with pytest.raises(LoopfreeError, match="strictly decreasing"):
            flow.euler_combine(torch.zeros(1), torch.zeros(max(len(bad), 1), 1), bad)
    with pytest.raises(LoopfreeError, match="3 velocities for 2"):
        flow.euler_combine(torch.zeros(1), torch.zeros(3, 1), [0.9, 0.1])
