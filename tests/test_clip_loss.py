"""The CLIP alignment loss of the authors' released students (--clip-margin τ, weight w_s): the hinge against a hand
gradient, the weight against the authors' schedule and in the student's gradient, CLIP's preparation against its own
processor, the loss falling through a tiny decoder and CLIP, and ``loopfree distill`` training with it (or refusing,
in one line, before anything is loaded)."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from safetensors.torch import load_file

from evalkit import make_clip, make_tiny_vae
from loopfree.cli import main
from loopfree.method.objective import clip_hinge_loss, clip_weight_at
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.clip_loss import ClipAlignment
from loopfree.training.distiller import Batch, Distiller
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.trainer import distill
from tiny import distill_config as config
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    return dict(teacher=make_teacher_folder(root / "teacher"), clip=make_clip(root / "clip"),
                tiny_vae=str(make_tiny_vae(root / "taesd")))


def test_hinge_gradient_equals_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    image.requires_grad_(True)
    loss = clip_hinge_loss(text, image, tau=2.0)  # cos ≤ 1 < τ: active
    loss.backward()
    t_hat, i_hat = text / text.norm(dim=1, keepdim=True), image.detach() / image.detach().norm(dim=1, keepdim=True)
    cos = (t_hat * i_hat).sum(1)
    assert loss.item() == pytest.approx(2.0 - cos.mean().item(), abs=1e-6)  # computed in float32, as every loss
    # d/d image_i of -(1/B) cos_i = -(1/B) (t̂_i - cos_i î_i) / |image_i|
    hand = -(t_hat - cos[:, None] * i_hat) / image.detach().norm(dim=1, keepdim=True) / 3
    assert torch.allclose(image.grad, hand, atol=1e-6)
    image.grad = None
    off = clip_hinge_loss(text, image, tau=-1.0)  # every mean cosine ≥ -1: the hinge is satisfied
    off.backward()
    assert off.item() == 0 and torch.count_nonzero(image.grad) == 0


def test_clip_weight_falls_linearly_to_zero_as_in_the_authors_code():
    # their get_clip_weight(step, total, 0.1, 0.0) = max(0, 0.1 - 0.1 · step / total), by hand for total = 8
    weights = [clip_weight_at(step, 0.1, 8) for step in (0, 1, 4, 7, 8, 20)]
    assert weights == pytest.approx([0.1, 0.0875, 0.05, 0.0125, 0.0, 0.0], abs=1e-12)
    assert clip_weight_at(5, 0.3, 10) == pytest.approx(0.15)


def test_the_student_gradient_takes_the_hinge_times_the_weight_of_its_step(parts, tmp_path):
    prompts = ["a red cat", "a blue dog"]
    clip = dict(clip_margin=0.9, clip=parts["clip"], tiny_vae=parts["tiny_vae"], clip_weight_steps=4)

    def distiller(**kw) -> Distiller:  # gradients unclipped, so they add up
        pipe = load_pipeline(parts["teacher"] / "pipe")
        return Distiller(config(parts["teacher"], tmp_path, max_grad_norm=1e9, **kw), pipe.unet, pipe.scheduler,
                         Accelerator(cpu=True), latent_size=8)

    pipe = load_pipeline(parts["teacher"] / "pipe")
    cond, uncond = PromptEncoder(pipe, torch.device("cpu"), 16)(prompts)
    # the hinge alone on the student's x_0 of the step's x_T (its first draw)
    d = distiller(**clip)
    torch.manual_seed(0)
    x0, _ = d.generator(torch.randn(2, 4, 8, 8), cond.text)
    hinge = d.clip(x0, d.clip.text_embeds(prompts))
    hinge.backward()
    hinge_grads = [p.grad.clone() for p in d.student_params]

    def step_grads(iteration: int, **kw) -> tuple[list[torch.Tensor], dict]:
        d = distiller(**kw)
        d.iteration = iteration
        seen = []
        d.opt_student.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in d.student_params]))
        torch.manual_seed(0)
        logs = d.step([Batch(cond, uncond, prompts)])
        return seen[0], logs

    plain, _ = step_grads(0)
    for iteration, weight in [(0, 0.1), (3, 0.025)]:  # w_s = 0.1 (1 - s / 4)
        grads, logs = step_grads(iteration, **clip)
        assert logs["loss/clip"] == pytest.approx(hinge.item(), rel=1e-6) and hinge.item() > 0
        for g, g0, h in zip(grads, plain, hinge_grads):
            # g − g0 cancels: its rounding is that of g0's size (a few ulps, by the thread count's summation order)
            torch.testing.assert_close(g - g0, weight * h, rtol=1e-3, atol=4e-6 * g0.abs().max().item() + 1e-9)


def test_clip_preparation_equals_the_processor_on_a_smooth_image(parts):
    align = ClipAlignment(parts["clip"], parts["tiny_vae"], 0.3, torch.device("cpu"))
    from transformers import CLIPImageProcessor

    y, x = np.mgrid[0:48, 0:80]
    image = np.stack([x / 79, y / 47, (x + y) / 126], -1)  # not square: the shortest edge and the centre crop count
    uint8 = (image * 255).round().astype(np.uint8)
    theirs = CLIPImageProcessor.from_pretrained(parts["clip"])(images=[uint8], return_tensors="pt").pixel_values
    ours = align.pixels(torch.from_numpy(uint8 / 255).permute(2, 0, 1)[None].float())
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max() < 0.05  # PIL's bicubic and uint8 rounding against torch's antialiased bicubic


def test_the_loss_falls_through_the_tiny_decoder_and_clip_with_both_frozen(parts):
    align = ClipAlignment(parts["clip"], parts["tiny_vae"], 1.0, torch.device("cpu"))
    text = align.text_embeds(["a red circle", "a blue square"])
    x0 = torch.nn.Parameter(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam([x0], lr=0.2)
    values = []
    for _ in range(30):
        loss = align(x0, text)
        opt.zero_grad()
        loss.backward()
        values.append(loss.item())
        opt.step()
    assert values[-1] < values[0] - 0.05, values
    assert all(p.grad is None for p in [*align.model.parameters(), *align.vae.parameters()])


def test_distill_trains_with_the_clip_loss_logs_it_and_records_its_folders(parts, tmp_path):
    base = config(parts["teacher"], tmp_path / "plain", max_steps=2, checkpoint_every=0)
    clip = dict(clip_margin=0.9, clip=parts["clip"], tiny_vae=parts["tiny_vae"], log_with="tensorboard")
    plain, with_clip = distill(base), distill(config(parts["teacher"], tmp_path / "clip", max_steps=2, checkpoint_every=0, **clip))
    a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (plain, with_clip))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the hinge's gradient reached the student
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((with_clip / "logs").rglob("events.out.*")).parent)).Reload()
    assert "loss/clip" in events.Tags()["scalars"]
    assert all(0 <= e.value <= 1.9 for e in events.Scalars("loss/clip"))  # relu(0.9 - mean cos), cos ∈ [-1, 1]
    import yaml

    saved = yaml.safe_load((with_clip / "distill_config.yaml").read_text())
    assert saved["clip"] == parts["clip"] and saved["clip_margin"] == 0.9


@pytest.mark.parametrize("extra, message", [
    ([], "needs a CLIP folder (--clip DIR) and a tiny VAE"),
    (["--clip", "{missing}", "--tiny-vae", "{tiny_vae}"], "--clip {missing} does not exist"),
    (["--clip", "{clip}", "--tiny-vae", "{clip}"], "--tiny-vae: tiny VAE"),
])
def test_distill_refuses_missing_clip_parts_in_one_line_before_loading(parts, tmp_path, extra, message):
    names = dict(parts, missing=str(tmp_path / "missing"))
    teacher = parts["teacher"]
    args = ["distill", "--teacher", str(teacher / "pipe"), "--prompts", str(teacher / "prompts.txt"), "--out",
            str(tmp_path / "out"), "--clip-margin", "0.35", *[a.format(**names) for a in extra]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message.format(**names) in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
