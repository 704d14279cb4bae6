"""The TiUE objective as callables: guidance, VSD gradient, KL weight, timestep ranges and prompt dropout."""

import pytest
import torch

from loopfree.method.objective import FakeScoreLoss, StudentLoss, kl_loss
from loopfree.method.schedule import NoiseSchedule
from tiny import make_scheduler

SCHEDULE = NoiseSchedule.from_scheduler(make_scheduler())


def fixed_scores(seen: list):
    """A ScorePair that records (x_t, t) and returns fixed [uncond; cond] predictions for teacher and fake."""
    g = torch.Generator().manual_seed(1)
    psi, phi = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)

    def scores(x_t, t):
        seen.append((x_t.clone(), t.clone()))
        return psi, phi

    return scores, psi, phi


@pytest.mark.parametrize("kl_weight, reduction", [(0.0, "sum"), (0.1, "sum"), (3.2, "mean")])
def test_student_loss_gradient_is_guided_vsd_plus_weighted_kl(kl_weight, reduction):
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
    eps_student = torch.randn(4, 3, 4, 5, 5, requires_grad=True)
    seen = []
    scores, psi, phi = fixed_scores(seen)
    loss = StudentLoss(SCHEDULE, guidance=4.5, t_min=20, t_max=980, kl_weight=kl_weight, kl_reduction=reduction)
    out = loss(x0, eps_student, scores)
    out["loss"].backward()
    (x_t, t), = seen
    ab = SCHEDULE.alpha_bar(t).float().reshape(-1, 1, 1, 1)
    # by hand: guided ε = ε_u + w (ε_c - ε_u); dL/dx0 = (1 - ā)(ε_ψ - ε_φ) / numel
    eps_teacher, eps_fake = psi[0] + 4.5 * (psi[1] - psi[0]), phi[0] + 4.5 * (phi[1] - phi[0])
    assert torch.allclose(x0.grad, (1 - ab) * (eps_teacher - eps_fake) / x0.numel(), atol=1e-6)
    # the KL term's gradient reaches the noise predictions with weight λ
    ref = eps_student.detach().clone().requires_grad_(True)
    (kl_weight * kl_loss(ref.flatten(0, 1), reduction)).backward()
    assert torch.allclose(eps_student.grad, ref.grad, atol=1e-7)
    assert torch.allclose(out["loss"], out["vsd"] + kl_weight * out["kl"])
    # x_t is a fresh noising of sg(x_0) at t ∈ [20, 980]
    assert ((t >= 20) & (t <= 980)).all() and not x_t.requires_grad


def test_vsd_timesteps_cover_the_configured_range_only():
    torch.manual_seed(0)
    seen = []
    scores, _, _ = fixed_scores(seen)
    loss = StudentLoss(SCHEDULE, t_min=100, t_max=102)
    for _ in range(30):
        loss(torch.randn(3, 4, 5, 5), torch.randn(4, 3, 4, 5, 5), scores)
    assert set(torch.cat([t for _, t in seen]).tolist()) == {100, 101, 102}


def test_fake_score_loss_by_hand_and_prompt_dropout_rate():
    torch.manual_seed(0)
    calls = []

    def fake(x_t, t, keep):
        calls.append((x_t, t, keep))
        return torch.zeros_like(x_t)

    x0 = torch.randn(64, 4, 5, 5)
    loss = FakeScoreLoss(SCHEDULE, prompt_dropout=0.25)
    torch.manual_seed(1)
    value = loss(x0, fake)
    # replay the draws: t ~ U{0..999}, ε ~ N(0, I), then the dropout mask
    torch.manual_seed(1)
    t = torch.randint(0, 1000, (64,))
    eps = torch.randn_like(x0)
    ab = SCHEDULE.alpha_bar(t).float().reshape(-1, 1, 1, 1)
    assert torch.equal(calls[0][1], t)
    assert torch.allclose(value, (ab * eps**2).mean(), rtol=1e-6)  # ε_φ = 0: mean((sqrt(ā)(0 - ε))²)
    for _ in range(40):
        loss(x0, fake)
    dropped = 1 - torch.cat([keep for _, _, keep in calls]).float().mean().item()
    assert abs(dropped - 0.25) < 0.03
