"""The TiUE objective as callables: guidance, VSD gradient, KL weight, timestep ranges and prompt dropout."""

import pytest
import torch

from loopfree.method.objective import SiD, VSD, FakeScoreLoss, StudentLoss, kl_loss, regression_loss
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
    out = loss(x0, eps_student, scores, loss.draw(x0))
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
    assert torch.allclose(out["loss"], out["score"] + kl_weight * out["kl"])
    # x_t is a fresh noising of sg(x_0) at t ∈ [20, 980]
    assert ((t >= 20) & (t <= 980)).all() and not x_t.requires_grad


def test_vsd_timesteps_cover_the_configured_range_only():
    torch.manual_seed(0)
    seen = []
    scores, _, _ = fixed_scores(seen)
    loss = StudentLoss(SCHEDULE, t_min=100, t_max=102)
    for _ in range(30):
        x0 = torch.randn(3, 4, 5, 5)
        loss(x0, torch.randn(4, 3, 4, 5, 5), scores, loss.draw(x0))
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
    value = loss(x0, fake, loss.draw(x0))
    # replay the draws: t ~ U{0..999}, ε ~ N(0, I), then the dropout mask
    torch.manual_seed(1)
    t = torch.randint(0, 1000, (64,))
    eps = torch.randn_like(x0)
    ab = SCHEDULE.alpha_bar(t).float().reshape(-1, 1, 1, 1)
    assert torch.equal(calls[0][1], t)
    assert torch.allclose(value, (ab * eps**2).mean(), rtol=1e-6)  # ε_φ = 0: mean((sqrt(ā)(0 - ε))²)
    for _ in range(40):
        loss(x0, fake, loss.draw(x0))
    dropped = 1 - torch.cat([keep for _, _, keep in calls]).float().mean().item()
    assert abs(dropped - 0.25) < 0.03


@pytest.mark.parametrize("kappa", [1.0, 2.0, -0.5])
def test_fake_score_is_trained_on_its_guided_prediction(kappa):
    """SiD-LSG's κ_1: the MSE of ε_φ^κ = ε_φ(∅) + κ (ε_φ(c) - ε_φ(∅)), one call of the unconditional and conditional rows,
    gradients through both; κ = 1 is the plain ε_φ (one call of B rows)."""
    g = torch.Generator().manual_seed(4)
    w = (torch.rand(1, 4, 1, 1, generator=g) + 0.5).requires_grad_(True)
    v = torch.randn(1, 4, 1, 1, generator=g).requires_grad_(True)
    rows = []

    def fake(x_t, t, keep):  # ε_φ(x_t, c) = w x_t + v for a kept prompt, w x_t for ""
        rows.append(len(x_t))
        return w * x_t + v * keep.float().reshape(-1, 1, 1, 1)

    x0 = torch.randn(6, 4, 5, 5, generator=g)
    loss = FakeScoreLoss(SCHEDULE, prompt_dropout=0.5, guidance=kappa)
    torch.manual_seed(0)
    noising = loss.draw(x0)
    loss(x0, fake, noising).backward()
    assert rows == [6 if kappa == 1 else 12]
    # by hand, in float64: ε_φ^κ = w x_t + κ v where the prompt is kept (a dropped one is "" in both halves: w x_t)
    ab = SCHEDULE.alpha_bar(noising.t).reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noising.eps.double()
    w64, v64 = w.detach().double().requires_grad_(True), v.detach().double().requires_grad_(True)
    pred = w64 * x_t + kappa * v64 * noising.keep.double().reshape(-1, 1, 1, 1)
    by_hand = (ab * (pred - noising.eps.double()) ** 2).mean()
    by_hand.backward()
    assert 0 < noising.keep.sum() < 6
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-5, atol=1e-7)
    assert torch.isclose(loss(x0, fake, noising).double(), by_hand, rtol=1e-5)


def linear_scores(seen: list):
    """A ScorePair whose predictions are affine in x_t (gradients flow), teacher and fake with other weights."""
    g = torch.Generator().manual_seed(2)
    w = torch.rand(4, 1, 4, 1, 1, generator=g) + 0.5  # psi_u, psi_c, phi_u, phi_c scales per channel
    b = torch.randn(4, 1, 4, 1, 1, generator=g)

    def scores(x_t, t):
        seen.append((x_t.detach().clone(), t.clone()))
        eps = w * x_t + b
        return eps[:2], eps[2:]

    return scores, w, b


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_equals_autograd_of_the_papers_x0_form(alpha):
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
    seen = []
    scores, w, b = linear_scores(seen)
    loss = StudentLoss(SCHEDULE, SiD(alpha), guidance=2.0, guidance_fake=0.5, kl_weight=0.0)
    loss(x0, torch.randn(4, 3, 4, 5, 5), scores, loss.draw(x0))["loss"].backward()
    (x_t_seen, t), = seen
    # the independent form: x_t = a x0 + s ε' with the recorded ε'; f = (x_t - s ε̂(x_t)) / a; SiD's loss on it
    ab = SCHEDULE.alpha_bar(t).double().reshape(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    ref = x0.detach().double().clone().requires_grad_(True)
    noise = (x_t_seen.double() - a * ref.detach()) / s
    x_t = a * ref + s * noise
    eps = w.double() * x_t + b.double()
    eps_psi = eps[0] + 2.0 * (eps[1] - eps[0])
    eps_phi = eps[2] + 0.5 * (eps[3] - eps[2])
    f_psi, f_phi = (x_t - s * eps_psi) / a, (x_t - s * eps_phi) / a
    per_item = ((f_psi - f_phi) * (f_psi - ref) - alpha * (f_psi - f_phi) ** 2).sum((1, 2, 3)) / 100
    weight = 1 / (ref - f_psi).abs().mean((1, 2, 3)).detach()
    (weight * per_item).mean().backward()
    torch.testing.assert_close(x0.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_sid_gradient_vanishes_where_the_fake_score_is_the_teacher():
    x0 = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(2, 1, 4, 1, 1, generator=g)

    def same(x_t, t):
        eps = w * x_t
        return eps, eps.clone()

    loss = StudentLoss(SCHEDULE, SiD(), kl_weight=0.0)
    loss(x0, torch.randn(4, 2, 4, 5, 5), same, loss.draw(x0))["loss"].backward()
    assert x0.grad.abs().max() == 0


@pytest.mark.parametrize("w_psi, w_phi", [(1.0, 0.0), (1.0, -1.0), (1.5, 1.5)])  # Zero-CFG, Anti-CFG, LSG
def test_teacher_and_fake_score_take_their_own_guidance(w_psi, w_phi):
    x0 = torch.randn(3, 4, 5, 5, requires_grad=True)
    seen = []
    scores, psi, phi = fixed_scores(seen)
    loss = StudentLoss(SCHEDULE, guidance=w_psi, guidance_fake=w_phi, kl_weight=0.0)
    loss(x0, torch.randn(4, 3, 4, 5, 5), scores, loss.draw(x0))["loss"].backward()
    ab = SCHEDULE.alpha_bar(seen[0][1]).float().reshape(-1, 1, 1, 1)
    by_hand = (1 - ab) * ((psi[0] + w_psi * (psi[1] - psi[0])) - (phi[0] + w_phi * (phi[1] - phi[0]))) / x0.numel()
    assert torch.allclose(x0.grad, by_hand, atol=1e-6)


def test_vsd_sees_no_gradient_through_the_scores_and_sid_does():
    for score_loss, through in ((VSD(), False), (SiD(), True)):
        seen_grad = []

        def scores(x_t, t):
            seen_grad.append(x_t.requires_grad and torch.is_grad_enabled())
            return torch.ones(2, *x_t.shape) * x_t, torch.zeros(2, *x_t.shape) * x_t

        loss, x0 = StudentLoss(SCHEDULE, score_loss), torch.randn(2, 4, 5, 5, requires_grad=True)
        loss(x0, torch.randn(4, 2, 4, 5, 5), scores, loss.draw(x0))
        assert seen_grad == [through]


def test_regression_loss_gradient_by_hand():
    x0, target = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3)
    regression_loss(x0, target).backward()
    assert torch.allclose(x0.grad, 2 * (x0.detach() - target) / x0.numel())
