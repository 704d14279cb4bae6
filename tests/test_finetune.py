"""The shifted toy domain (night), the teacher's fine-tune on it (the whole UNet or a style LoRA), and style LoRAs
loaded onto a student at generate / eval / serve time with a scale."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from loopfree.cli import main
from loopfree.demo.demo import RowScorer
from loopfree.demo.finetune import FineTuneConfig, fine_tune
from loopfree.pipelines.loading import load_pipeline, style_weights
from loopfree.toy.assets import bundled
from loopfree.toy.world import BACKGROUND_RGB, ToyWorld, heldout_prompts, parse_prompt, render_for_prompt, shown
from loopfree.utils.errors import LoopfreeError

PROMPT = "a small red circle in the centre of a white image"


def test_the_night_domain_draws_the_same_stream_on_black():
    base, night = ToyWorld(3).sample(64), ToyWorld(3, "night").sample(64)
    assert base.captions == night.captions and np.array_equal(base.truth, night.truth)
    assert np.all(night.images[:, 0, 0] == BACKGROUND_RGB["black"])  # a corner: background in every toy image
    black = np.array([a.background == "black" for a in base.attrs])
    assert np.array_equal(base.images[black], night.images[black]) and black.any() and not black.all()
    assert shown(base.attrs[0], "night").background == "black" and shown(base.attrs[0]) == base.attrs[0]
    with pytest.raises(LoopfreeError, match="domain must be one of base, night"):
        ToyWorld(0, "dusk")


def test_night_scores_read_alignment_to_what_the_domain_shows_and_its_style():
    from loopfree.evaluation.toy import ToyExtractor, toy_scores

    prompts = [p for p in heldout_prompts(24)]
    extractor = ToyExtractor()
    night = np.stack([render_for_prompt(p, 1, i, "night").images[0] for i, p in enumerate(prompts)])
    base = np.stack([render_for_prompt(p, 1, i).images[0] for i, p in enumerate(prompts)])
    on_night, on_base = (toy_scores(extractor(images), prompts, domain="night") for images in (night, base))
    assert on_night["alignment"] == 1.0 and on_night["style"] == 1.0  # real night images: what the domain shows
    changed = [parse_prompt(p).background != "black" for p in prompts]
    assert on_base["style"] == 0.0 and on_base["alignment"] == pytest.approx(1 - np.mean(changed))
    assert toy_scores(extractor(base), prompts)["alignment"] == 1.0 and "style" not in toy_scores(extractor(base), prompts)
    scorer = RowScorer(heldout_prompts(8), 4, 4, 0, 64, "night")  # its fd is against night images
    assert scorer.scores(np.stack([night[0]] * 16), ("fid",))["style"] == 1.0  # a black background for every job


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    """A style LoRA of the bundled teacher: three steps on night images."""
    out = tmp_path_factory.mktemp("style")
    return fine_tune(FineTuneConfig(out=str(out), steps=3, batch=2, lora_rank=2, lr=1e-2))


def test_a_full_fine_tune_is_a_teacher_folder_and_leaves_the_bundled_teacher_alone(tmp_path):
    teacher_before = load_file(bundled("teacher") / "unet" / "diffusion_pytorch_model.safetensors")
    result = fine_tune(FineTuneConfig(out=str(tmp_path / "ft"), steps=2, batch=2))
    tuned = load_file(result / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(tuned[k], teacher_before[k]) for k in tuned)
    after = load_file(bundled("teacher") / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())
    pipe = load_pipeline(result)  # a teacher folder like any other
    assert pipe(PROMPT, num_inference_steps=2, mode="loop", output_type="pt").images.shape == (1, 3, 64, 64)
    record = json.loads((tmp_path / "ft" / "fine_tune.json").read_text())
    assert record["done"] and record["steps"] == 2
    with pytest.raises(LoopfreeError, match="holds a fine-tune with other settings"):
        fine_tune(FineTuneConfig(out=str(tmp_path / "ft"), steps=3, batch=2))
    with pytest.raises(LoopfreeError, match="base is the world the teacher was trained on"):
        FineTuneConfig(out=str(tmp_path / "x"), domain="base")


def _one_pass(pipe, seed: int = 0) -> torch.Tensor:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return pipe(PROMPT, latents=latents, output_type="latent").images


def test_a_style_lora_loads_in_plain_diffusers_and_onto_a_student_with_a_scale(style):
    teacher = str(bundled("teacher"))
    plain = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    before = plain.unet.conv_in.weight.clone()
    plain.load_lora_weights(str(style))  # diffusers' own format: a plain pipeline takes it
    assert torch.equal(plain.unet.conv_in.weight, before) and plain.get_active_adapters()

    student = str(bundled("student"))
    bare = _one_pass(load_pipeline(student))
    off = _one_pass(load_pipeline(student, style_lora=style, style_scale=0.0))
    half, full = (_one_pass(load_pipeline(student, style_lora=style, style_scale=s)) for s in (0.5, 1.0))
    assert torch.allclose(off, bare, atol=1e-4)  # a conv LoRA takes the plain (unhoisted) decoders: float rounding
    assert not torch.allclose(full, bare, atol=1e-4) and not torch.allclose(half, full, atol=1e-4)
    fused = _one_pass(load_pipeline(student, style_lora=style / "pytorch_lora_weights.safetensors", style_scale=0.5, fuse=True))
    assert torch.allclose(fused, half, atol=1e-4)  # folded at its scale: the same pass


def test_style_lora_refusals(style, tmp_path):
    with pytest.raises(LoopfreeError, match="is not a LoRA"):
        style_weights(tmp_path)
    record = tmp_path / "run"
    record.mkdir()
    (record / "pytorch_lora_weights.safetensors").write_bytes((style / "pytorch_lora_weights.safetensors").read_bytes())
    (record / "loopfree.json").write_text("{}")
    with pytest.raises(LoopfreeError, match="is a LoRA student .*give it as --lora"):
        style_weights(record)
    r = CliRunner().invoke(main, ["generate", PROMPT, "--out", str(tmp_path / "g"), "--fuse"])
    assert r.exit_code == 2 and "give --lora or --style-lora" in r.output and not (tmp_path / "g").exists()


def test_generate_eval_and_serve_take_a_style_lora(style, tmp_path):
    r = CliRunner().invoke(main, ["generate", PROMPT, "--out", str(tmp_path / "g"), "--style-lora", str(style), "--style-scale", "0.5"])
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "g" / "generate.json").read_text())
    assert settings["style_lora"] == str(style.resolve()) and settings["style_scale"] == 0.5

    from loopfree.serve.engine import check_serve_models

    spec = check_serve_models(None, None, "cpu", "fp32", style_lora=style, style_scale=0.5)
    assert spec.style_lora == style and spec.style_scale == 0.5

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(heldout_prompts(2)) + "\n")
    r = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "e"), "--prompts", str(prompts), "--num-prompts", "2",
                                  "--images-per-prompt", "1", "--metrics", "alignment", "--features", "toy",
                                  "--style-lora", str(style)])
    assert r.exit_code == 0, r.output
    identity = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "style_lora" in json.dumps(identity)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_fine_tunes_loss_is_the_teachers_for_its_prediction_type(prediction_type):
    """One loss for the teacher and its fine-tunes: zero exactly when the UNet predicts its scheduler's target (a
    v-prediction teacher's fine-tune once regressed onto ε), min-SNR weighted as a hand computation gives."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from loopfree.demo.teacher import SCHEDULER_CONFIG, denoising_loss, min_snr_weights

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type)
    z, noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
    weights = min_snr_weights(scheduler, 5.0)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    assert torch.allclose(weights, snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1))
    exact = lambda x, t, text: SimpleNamespace(sample=target)  # noqa: E731
    off = lambda x, t, text: SimpleNamespace(sample=target + 1.0)  # noqa: E731
    assert denoising_loss(exact, scheduler, weights, z, noise, t, None) == 0
    assert torch.isclose(denoising_loss(off, scheduler, weights, z, noise, t, None), weights[t].mean())
