"""Losses against hand computations (SPEC §3)."""

import itertools
import math

import pytest
import torch

from loopfree.method.guidance import guided
from loopfree.method.objective import fake_score_loss, kl_loss, vsd_loss
from loopfree.method.schedule import diffuse, sample_timesteps


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_vsd_gradient_is_g_over_numel():
    x0 = _rand(2, 3, 2, 2, seed=0).requires_grad_()
    eps_teacher, eps_fake = _rand(2, 3, 2, 2, seed=1), _rand(2, 3, 2, 2, seed=2)
    alpha_bar = torch.tensor([0.25, 0.64])
    vsd_loss(x0, eps_teacher, eps_fake, alpha_bar).backward()

    numel = 2 * 3 * 2 * 2
    expected = torch.empty_like(x0)
    for b, a in enumerate([0.25, 0.64]):
        for idx in itertools.product(range(3), range(2), range(2)):
            diff = eps_teacher[(b, *idx)].item() - eps_fake[(b, *idx)].item()
            expected[(b, *idx)] = (1 - a) * diff / numel
    torch.testing.assert_close(x0.grad, expected)


def test_vsd_non_finite_g_gives_zero_gradient():
    x0 = torch.zeros(1, 1, 2, 2, requires_grad=True)
    eps_teacher = torch.tensor([[[[float("nan"), float("inf")], [2.0, -float("inf")]]]])
    eps_fake = torch.zeros(1, 1, 2, 2)
    loss = vsd_loss(x0, eps_teacher, eps_fake, torch.tensor([0.5]))
    loss.backward()
    assert torch.isfinite(loss)
    # only the finite entry contributes: (1 - 0.5) * 2 / 4 elements
    torch.testing.assert_close(x0.grad, torch.tensor([[[[0.0, 0.0], [0.25, 0.0]]]]))


def test_kl_matches_hand_computation_for_both_reductions():
    # item 0 = [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    # item 1 = [0, 0, 2, 2]: mean 1,   unbiased var 4 / 3
    eps = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]).reshape(2, 1, 2, 2)
    kl0 = 0.5 * (2.5**2 + 5 / 3 - math.log(5 / 3) - 1)
    kl1 = 0.5 * (1.0**2 + 4 / 3 - math.log(4 / 3) - 1)
    assert kl_loss(eps, "sum").item() == pytest.approx(kl0 + kl1, rel=1e-6)
    assert kl_loss(eps, "mean").item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)


def test_kl_is_zero_for_mean_zero_unit_unbiased_variance():
    # [-1, 0, 1]: mean 0, unbiased var (1 + 0 + 1) / (3 - 1) = 1
    eps = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    assert kl_loss(eps, "sum").item() == pytest.approx(0.0, abs=1e-7)


def test_kl_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        kl_loss(torch.ones(1, 1, 2, 2), "max")  # type: ignore[arg-type]


def test_fake_score_loss_matches_hand_computation():
    eps_fake = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1, 1)
    eps = torch.tensor([0.0, 0.0, 1.0, 1.0]).reshape(2, 2, 1, 1)
    # ā = (0.25, 0.81): sqrt = (0.5, 0.9); scaled errors 0.5, 1.0, 1.8, 2.7
    expected = (0.5**2 + 1.0**2 + 1.8**2 + 2.7**2) / 4
    assert fake_score_loss(eps_fake, eps, torch.tensor([0.25, 0.81])).item() == pytest.approx(expected)


def test_guided_matches_hand_computation():
    out = guided(torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0]), 4.5)
    torch.testing.assert_close(out, torch.tensor([1.0 + 4.5 * 2.0, -2.0 + 4.5 * 2.0]))


def test_diffuse_matches_hand_computation():
    x0 = torch.full((2, 1, 1, 1), 2.0)
    eps = torch.full((2, 1, 1, 1), 1.0)
    # ā = 0.36 → 0.6·2 + 0.8·1; ā = 1 → x0
    torch.testing.assert_close(diffuse(x0, eps, torch.tensor([0.36, 1.0])).flatten(), torch.tensor([2.0, 2.0]))


def test_sample_timesteps_covers_inclusive_bounds_and_is_seeded():
    draw = sample_timesteps(2000, 20, 22, generator=torch.Generator().manual_seed(3))
    assert set(draw.tolist()) == {20, 21, 22}
    torch.testing.assert_close(draw, sample_timesteps(2000, 20, 22, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        sample_timesteps(1, 5, 4)
