"""A rectified-flow teacher in the objectives' VP terms (method.schedule's flow view): ā_t, the forward process,
ε from velocities, the scores of an SD3 teacher and its fake score, VSD and SiD against hand computations, and the
SD3 student generator against its plain one pass."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig

from loopfree.method import flow, split_sd3
from loopfree.method.objective import SiD, VSD, StudentLoss, x0_from_eps
from loopfree.method.sampler import Conditioning
from loopfree.method.schedule import NoiseSchedule, diffuse
from loopfree.method.scores import TeacherAndFakeScore

SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
SCHEDULE = NoiseSchedule.from_scheduler(SCHEDULER)


def test_alpha_bar_and_model_timesteps_are_the_schedulers_training_sigmas():
    sigmas = SCHEDULER.sigmas.double().flip(0)  # diffusers' training σ's, descending from 1: t = 999 … 0
    assert SCHEDULE.prediction_type == "flow" and SCHEDULE.final_alpha_cumprod == 1.0
    torch.testing.assert_close(SCHEDULE.sigmas, sigmas, rtol=1e-6, atol=1e-7)
    hand = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
    torch.testing.assert_close(SCHEDULE.alpha_bar(torch.arange(1000)), hand, rtol=1e-6, atol=1e-7)
    t = torch.tensor([0, 250, 980, 999])
    torch.testing.assert_close(SCHEDULE.model_timestep(t), SCHEDULER.timesteps.flip(0)[t], rtol=1e-5, atol=1e-4)


def test_the_vp_latent_scaled_is_sd3s_forward_process_and_the_true_velocity_gives_the_noise():
    torch.manual_seed(0)
    x0, eps, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([10, 400, 700, 980])
    x_t = diffuse(x0, eps, SCHEDULE.alpha_bar(t))
    # diffusers' own noising for SD3 training: scale_noise at the scheduler's timesteps
    steps = SCHEDULER.timesteps.flip(0)[t]
    reference = torch.stack([SCHEDULER.scale_noise(x0[i : i + 1], steps[i : i + 1], eps[i : i + 1])[0]
                             for i in range(4)])
    torch.testing.assert_close(SCHEDULE.model_input(x_t, t), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(SCHEDULE.to_epsilon(eps - x0, x_t, t), eps, rtol=1e-5, atol=1e-5)
    # and the VP denoised estimate from that ε is x_0
    torch.testing.assert_close(x0_from_eps(x_t, eps, SCHEDULE.alpha_bar(t)), x0, rtol=1e-4, atol=1e-4)


def test_a_resolution_shifted_flow_scheduler_is_refused_for_now():
    with pytest.raises(Exception, match="shifts by resolution"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                 caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=4)


def conditioning(batch: int, seed: int) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 5, 12, generator=g), {"pooled_projections": torch.randn(batch, 6, generator=g)})


@pytest.mark.parametrize("batch_pair", [True, False])
def test_sd3_teacher_and_fake_scores_are_the_velocities_converted(batch_pair):
    teacher = tiny_sd3()
    plain = tiny_sd3()  # the same weights, never wrapped
    scores = TeacherAndFakeScore(teacher, SCHEDULE, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]),
                                 batch_pair=batch_pair)
    with torch.no_grad():  # a LoRA that does something
        for p in scores.params:
            p.normal_(0, 0.2)
    cond, uncond = conditioning(2, 1), conditioning(2, 2)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 900])
    with torch.no_grad():
        eps_psi, eps_phi = scores.pair(x_t, t, cond, uncond)
        sigma = SCHEDULE.sigmas[t].float()
        x_sigma = ((1 - sigma) ** 2 + sigma**2).sqrt().view(-1, 1, 1, 1) * x_t
        for half, c in enumerate((uncond, cond)):
            v = plain(hidden_states=x_sigma, timestep=sigma * 1000, encoder_hidden_states=c.text,
                      pooled_projections=c.added["pooled_projections"]).sample
            torch.testing.assert_close(eps_psi[half], flow.eps_from_v(x_sigma, sigma, v), rtol=1e-4, atol=1e-5)
    assert (eps_phi - eps_psi).abs().max() > 1e-3  # the fake score is the LoRA'd network


@pytest.mark.parametrize("loss", [VSD(), SiD(alpha=1.2)])
def test_vsd_and_sid_for_a_flow_teacher_equal_the_hand_computation(loss):
    """The student's gradient from a flow teacher's velocities v_ψ, v_φ: ε = x_σ + (1 − σ)v, then the paper's
    g = (1 − ā)(ε_ψ − ε_φ) (VSD) or SiD's loss on the x̂_0 = x_σ − σ v (written in flow terms here)."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    t, noise = torch.tensor([100, 500, 900]), torch.randn(3, 4, 8, 8)
    v_psi, v_phi = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    sigma = SCHEDULE.sigmas[t].float().view(-1, 1, 1, 1)
    c = ((1 - sigma) ** 2 + sigma**2).sqrt()

    def scores(x_t, t_):
        return SCHEDULE.to_epsilon(v_psi, x_t, t_), SCHEDULE.to_epsilon(v_phi, x_t, t_)

    objective = StudentLoss(SCHEDULE, loss, guidance=2.0, guidance_fake=1.5, kl_weight=0.0)
    from loopfree.method.objective import Noising

    out = objective(x0, torch.zeros(1, 3, 4, 8, 8), scores, Noising(t, noise))
    (grad,) = torch.autograd.grad(out["loss"], x0)

    x_sigma = (1 - sigma) * x0 + sigma * noise  # SD3's forward process
    v_t = v_psi[0] + 2.0 * (v_psi[1] - v_psi[0])
    v_f = v_phi[0] + 1.5 * (v_phi[1] - v_phi[0])
    if isinstance(loss, VSD):
        ab = (1 - sigma) ** 2 / c**2
        g = (1 - ab) * ((x_sigma + (1 - sigma) * v_t) - (x_sigma + (1 - sigma) * v_f))  # = (1 − ā)(1 − σ)(v_ψ − v_φ)
        torch.testing.assert_close(grad, g / x0.numel(), rtol=1e-4, atol=1e-7)
    else:
        x0_ = x0.detach().requires_grad_(True)
        xs = (1 - sigma) * x0_ + sigma * noise
        f_psi, f_phi = xs - sigma * v_t, xs - sigma * v_f  # x̂_0 of each velocity
        w = 1 / (x0_ - f_psi).abs().flatten(1).mean(1).detach()
        hand = (w * ((f_psi - f_phi) * ((f_psi - x0_) - 1.2 * (f_psi - f_phi))).flatten(1).mean(1)).mean()
        (g,) = torch.autograd.grad(hand, x0_)
        torch.testing.assert_close(grad, g, rtol=1e-4, atol=1e-6)


def test_the_sd3_generator_is_the_one_pass_and_its_one_step_case_is_x_T_minus_v():
    model, cond = tiny_sd3(), conditioning(2, 3)
    x_T = torch.randn(2, 4, 8, 8)
    sigmas = flow.decoder_sigmas(SCHEDULER.config, 4)
    with torch.no_grad():
        x0, eps = split_sd3.Generator(model, sigmas, shared_blocks=1)(x_T, cond.text, cond.added)
        ref_x0, ref_eps = split_sd3.loop_free(model, x_T, sigmas, cond, shared_blocks=1)
        torch.testing.assert_close(x0, ref_x0)
        torch.testing.assert_close(eps, ref_eps)
        one, _ = split_sd3.Generator(model, [1.0], shared_blocks=0)(x_T, cond.text, cond.added)
        v = model(hidden_states=x_T, timestep=torch.full((2,), 1000.0), encoder_hidden_states=cond.text,
                  pooled_projections=cond.added["pooled_projections"]).sample
        torch.testing.assert_close(one, x_T - v, rtol=1e-5, atol=1e-5)
