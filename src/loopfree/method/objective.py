"""The TiUE distillation objective (SPEC §3), in the paper's symbols. The trainer owns everything else.

Each iteration the student ε_θ makes x_0 in one pass, with its K·B noise predictions ε^k (SPEC §2). Then

    L_θ = L_score + λ_KL · L_KL [+ λ_reg · L_reg] [+ w_s · L_clip]  (StudentLoss: paper Eqs. 5, 12-13)
    L_φ = mean((sqrt(ā_t) (ε_φ^κ(x_t, t, c) - ε))²)                   (FakeScoreLoss, on sg(x_0))

L_score is ``VSD`` (the paper's) or ``SiD`` (Zhou et al. 2024), each with its own guidance of the teacher (w_ψ) and
of the fake score (w_φ): the paper's w_ψ = w_φ = 4.5, SiD-LSG's equal lower scales, few-step SiD's Zero-CFG
(w_ψ = 1, w_φ = 0) and Anti-CFG (w_ψ = 1, w_φ < 0). L_reg is DMD's regression on cached teacher pairs;
L_clip the CLIP hinge the authors fine-tune their released students with, under their decaying weight w_s.
ε_φ^κ is the fake score's own guided prediction (κ = 1: plain ε_φ, the paper's; SiD-LSG trains it guided).

The losses' random draws (:class:`Noising`) are made apart (``draw``), so a step can draw them for all of its
prompts at once and hand each micro-batch its rows (gradient accumulation: the step of one large batch).

``ScorePair`` is what the objective needs of the two frozen-base networks: given (x_t, t), the teacher's and
the fake score's noise predictions, each as [unconditional; conditional] along a leading axis of 2 — the
objective applies the guidance itself. ā_t is per item, (B,); every loss is computed in float32.

    python -m pytest tests/test_objective.py     # each loss's gradient against a hand computation
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from loopfree.method.guidance import guided
from loopfree.method.schedule import NoiseSchedule, diffuse, sample_timesteps

#: (x_t, t) -> (ε_ψ, ε_φ), each (2, B, C, H, W) = [unconditional; conditional]
ScorePair = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: (x_t, t, keep_prompt) -> ε_φ (N, C, H, W): the fake score; row n takes the batch's prompt n mod B, "" where not kept
FakeScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_item(alpha_bar_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) in float32, to broadcast against ``like``."""
    return alpha_bar_t.float().reshape(-1, *([1] * (like.ndim - 1)))


def vsd_loss(x0: torch.Tensor, eps_teacher: torch.Tensor, eps_fake: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Variational score distillation: a loss whose gradient on x_0 is g / x0.numel(). Its value means nothing."""
    # SPEC §3.2: g = (1 - ā_t)(ε_ψ - ε_φ), non-finite → 0
    g = (1 - _per_item(alpha_bar_t, x0)) * (eps_teacher.float() - eps_fake.float())
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    # SPEC §3.2: L_vsd = 0.5 · mean((x_0 - sg(x_0 - g))²)
    return 0.5 * ((x0.float() - (x0.float() - g).detach()) ** 2).mean()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The denoised estimate f(x_t) = (x_t - sqrt(1 - ā_t) ε) / sqrt(ā_t) (DDIM, Song et al. 2021, Eq. 12)."""
    a = _per_item(alpha_bar_t, x_t)
    return (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def sid_loss(x0: torch.Tensor, x_t: torch.Tensor, eps_teacher: torch.Tensor, eps_fake: torch.Tensor,
             alpha_bar_t: torch.Tensor, alpha: float = 1.2) -> torch.Tensor:
    """Score identity Distillation's generator loss; gradients flow through x_0, x_t and both networks' outputs."""
    f_psi, f_phi = x0_from_eps(x_t, eps_teacher, alpha_bar_t), x0_from_eps(x_t, eps_fake, alpha_bar_t)
    # SiD (Zhou et al. 2024) Alg. 1, generator loss: (f_ψ - f_φ)ᵀ((f_ψ - x_0) - α (f_ψ - f_φ)), weighted by 1 / sg(mean|x_0 - f_ψ|)
    weight = 1 / (x0.float() - f_psi).abs().flatten(1).mean(1).detach().clamp(min=1e-5)
    per_item = ((f_psi - f_phi) * ((f_psi - x0.float()) - alpha * (f_psi - f_phi))).flatten(1).mean(1)
    loss = weight * per_item
    return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).mean()


def regression_loss(x0: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """DMD's regression term on a teacher pair (x_T, x_0^teacher), as mean squared latent distance."""
    # DMD (Yin et al. 2024) Eq. 4, with latent MSE for LPIPS: L_reg = mean((G_θ(x_T) - x_0^teacher)²)
    return ((x0.float() - x0_teacher.float()) ** 2).mean()


def clip_weight_at(step: int, start: float, steps: int) -> float:
    """The CLIP hinge's weight w_s at ``step`` (0-based): ``start`` falling linearly to 0 at ``steps``, 0 after."""
    # the authors' get_clip_weight (train_loopfree.py): w_s = max(0, w_0 - w_0 · s / S)
    return max(0.0, start - start * step / steps)


def clip_hinge_loss(text_embeds: torch.Tensor, image_embeds: torch.Tensor, tau: float) -> torch.Tensor:
    """The CLIP alignment hinge of the authors' released students: zero once the batch's mean cosine reaches τ."""
    # the authors' fine-tuning (--lambda_textcliploss τ = 0.35): relu(τ - mean_i cos(text_i, image_i))
    cos = torch.nn.functional.cosine_similarity(text_embeds.float(), image_embeds.float(), dim=-1)
    return torch.relu(tau - cos.mean())


def kl_loss(eps: torch.Tensor, reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """KL(N(μ, s²) ‖ N(0, 1)) of a scalar Gaussian fitted to each of the N = K·B noise predictions (N, C, H, W).

    ``sum`` over the N items is the authors' form (λ = 0.1), whose weight grows with K·B; ``mean`` is
    batch-independent: sum with λ equals mean with λ·N, so the paper's setting (λ 0.1, K 4, 8 prompts per
    device) is mean with λ = 3.2.
    """
    flat = eps.float().flatten(1)
    mu, s2 = flat.mean(dim=1), flat.var(dim=1, correction=1)
    # SPEC §3.3: KL = 0.5 (μ² + s² - log s² - 1)
    kl = 0.5 * (mu**2 + s2 - s2.log() - 1)
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def fake_score_loss(eps_fake: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Denoising loss of the fake score on the detached student latents."""
    # SPEC §3.5: L_mse = mean((sqrt(ā_t)(ε_φ(x_t, t, c) - ε))²)
    return ((_per_item(alpha_bar_t, eps_fake).sqrt() * (eps_fake.float() - eps.float())) ** 2).mean()


@dataclass
class Noising:
    """The random draws of one noising of a batch: timesteps t (B,), noise ε (B, C, H, W) and, for the fake score's
    step, which prompts are kept (B,) (the others become "")."""

    t: torch.Tensor
    eps: torch.Tensor
    keep: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "Noising":
        return Noising(self.t[start:stop], self.eps[start:stop], None if self.keep is None else self.keep[start:stop])


@dataclass
class VSD:
    """Variational score distillation (paper Eq. 5): the scores see a detached x_t."""

    through_scores = False  # no gradient through the teacher and fake score

    def __call__(self, x0, x_t, eps_teacher, eps_fake, alpha_bar_t) -> torch.Tensor:
        return vsd_loss(x0, eps_teacher, eps_fake, alpha_bar_t)


@dataclass
class SiD:
    """Score identity Distillation (Zhou et al. 2024): its gradient runs through both networks."""

    alpha: float = 1.2  # SiD: α = 1.2 (its best on every benchmark)
    through_scores = True

    def __call__(self, x0, x_t, eps_teacher, eps_fake, alpha_bar_t) -> torch.Tensor:
        return sid_loss(x0, x_t, eps_teacher, eps_fake, alpha_bar_t, self.alpha)


@dataclass
class StudentLoss:
    """L_score + λ_KL · L_KL for a student sample x_0 and its noise predictions ε^k."""

    schedule: NoiseSchedule
    score_loss: VSD | SiD = dataclasses.field(default_factory=VSD)  # paper: VSD
    guidance: float = 4.5  # w_ψ, the teacher's guidance (paper: 4.5)
    guidance_fake: float = 4.5  # w_φ, the fake score's guidance (paper: 4.5, the teacher's)
    t_min: int = 20  # score-loss timesteps t ~ U{t_min, …, t_max} (paper: 20, 980)
    t_max: int = 980
    kl_weight: float = 0.1  # λ_KL (paper: 0.1 with reduction "sum"; 0: the w/o-KL ablation)
    kl_reduction: Literal["sum", "mean"] = "sum"

    def draw(self, like: torch.Tensor) -> Noising:
        """t ~ U{t_min, …, t_max} and a fresh ε' (SPEC §3.2) for latents shaped like ``like`` (B, C, H, W)."""
        t = sample_timesteps(like.shape[0], self.t_min, self.t_max, device=like.device)
        return Noising(t, torch.randn(like.shape, device=like.device))

    def __call__(self, x0: torch.Tensor, eps_student: torch.Tensor, scores: ScorePair, noising: Noising,
                 share: float = 1.0) -> dict[str, torch.Tensor]:
        """``x0`` (B, C, H, W) with gradient, ``eps_student`` (K, B, C, H, W); returns loss, score and kl.

        ``share``: the batch is that part of the step's prompts (1/N of N micro-batches): ``loss`` weighs the batch
        means by it and a summed KL whole, so the step's N losses add up to the loss of its N·B prompts as one batch.
        """
        alpha_bar = self.schedule.alpha_bar(noising.t).float()
        through = self.score_loss.through_scores
        x_t = diffuse(x0 if through else x0.detach(), noising.eps, alpha_bar)
        with torch.set_grad_enabled(through and torch.is_grad_enabled()):
            eps_psi, eps_phi = scores(x_t, noising.t)
        eps_teacher, eps_fake = guided(*eps_psi, self.guidance), guided(*eps_phi, self.guidance_fake)
        score = self.score_loss(x0, x_t, eps_teacher, eps_fake, alpha_bar)
        kl = kl_loss(eps_student.flatten(0, 1), self.kl_reduction)
        kl_share = 1.0 if self.kl_reduction == "sum" else share
        return {"loss": share * score + self.kl_weight * kl_share * kl, "score": score, "kl": kl}


@dataclass
class FakeScoreLoss:
    """The fake score's denoising loss on sg(x_0), with the prompt dropped to "" at a rate (for guidance)."""

    schedule: NoiseSchedule
    prompt_dropout: float = 0.1  # p of the empty prompt (paper: 0.1)
    guidance: float = 1.0  # κ, guidance of the prediction it is trained on (paper: 1, plain ε_φ; SiD-LSG: κ_1)

    def draw(self, like: torch.Tensor) -> Noising:
        """t ~ U{0, …, 999} (SPEC §3.5), fresh ε and the kept prompts, for latents shaped like ``like``."""
        B = like.shape[0]
        t = sample_timesteps(B, 0, self.schedule.num_train_timesteps - 1, device=like.device)
        eps = torch.randn(like.shape, device=like.device)
        return Noising(t, eps, torch.rand(B, device=like.device) >= self.prompt_dropout)

    def __call__(self, x0: torch.Tensor, fake: FakeScore, noising: Noising) -> torch.Tensor:
        alpha_bar = self.schedule.alpha_bar(noising.t).float()
        x_t = diffuse(x0.detach(), noising.eps, alpha_bar)
        if self.guidance == 1:
            return fake_score_loss(fake(x_t, noising.t, noising.keep), noising.eps, alpha_bar)
        # SiD-LSG (Zhou et al. 2024), κ_1 = its cfg_train_fake: ε_φ^κ = ε_φ(x_t, ∅) + κ (ε_φ(x_t, c) - ε_φ(x_t, ∅)), one call
        keep = torch.cat([torch.zeros_like(noising.keep), noising.keep])
        both = fake(torch.cat([x_t, x_t]), torch.cat([noising.t, noising.t]), keep)
        return fake_score_loss(guided(*both.chunk(2), self.guidance), noising.eps, alpha_bar)
