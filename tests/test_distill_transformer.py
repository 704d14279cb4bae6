"""The Distiller on an SD3 (rectified-flow) teacher: its student's decoder σ's, one step that trains only the
student and the fake score's LoRA, and its checkpointed weights loading back."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler

from loopfree.method import flow
from loopfree.training.config import load_config
from loopfree.training.distiller import Batch, Distiller
from loopfree.utils.errors import LoopfreeError
from test_flow_objective import conditioning, tiny_sd3

SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def config(tmp_path, **kw):
    base = dict(teacher=str(tmp_path / "teacher"), prompts=str(tmp_path / "prompts.txt"), out=str(tmp_path / "out"),
                batch_size=2, steps=2, lora_rank=4, lora_targets=["to_q", "to_k", "to_v", "to_out.0"], log_with="none",
                lr_student=1e-3, shared_blocks=1)
    return load_config(None, {**base, **kw})


def distiller(tmp_path, **kw) -> Distiller:
    return Distiller(config(tmp_path, **kw), tiny_sd3(), SCHEDULER, Accelerator(cpu=True), latent_size=8)


def test_the_students_plan_is_the_schedulers_decoder_sigmas(tmp_path):
    assert distiller(tmp_path).timesteps == flow.decoder_sigmas(SCHEDULER.config, 2)
    assert distiller(tmp_path, student="one-step").timesteps == [1.0]
    with pytest.raises(LoopfreeError, match="not --timesteps"):
        distiller(tmp_path, timesteps=[751, 1])


@pytest.mark.parametrize("objective", ["vsd", "sid"])
def test_one_step_trains_the_student_and_the_lora_and_leaves_the_teacher(tmp_path, objective):
    torch.manual_seed(0)
    d = distiller(tmp_path, objective=objective)
    base = {n: p.detach().clone() for n, p in d.scores.base.named_parameters() if "lora" not in n}
    student = [p.detach().clone() for p in d.student_params]
    lora = [p.detach().clone() for p in d.lora_params]
    batch = Batch(conditioning(2, 1), conditioning(2, 2))
    logs = d.step([batch])
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(torch.equal(p, base[n]) for n, p in d.scores.base.named_parameters() if "lora" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(student, d.student_params))
    assert any(not torch.equal(a, b) for a, b in zip(lora, d.lora_params))


def test_checkpointed_weights_load_back(tmp_path):
    torch.manual_seed(0)
    d = distiller(tmp_path)
    d.step([Batch(conditioning(2, 1), conditioning(2, 2))])
    d.save_weights(tmp_path)
    fresh = distiller(tmp_path)
    fresh.load_weights(tmp_path, ema_step=1)
    assert all(torch.equal(a, b) for a, b in zip(d.student_params, fresh.student_params))
    assert all(torch.equal(a, b) for a, b in zip(d.lora_params, fresh.lora_params))
    assert all(torch.equal(a, b) for a, b in zip(d.ema.shadow_params, fresh.ema.shadow_params))




# -- loopfree distill end to end on a tiny SD3 folder (two toy CLIPs, no T5)

@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory):
    from diffusers import AutoencoderKL

    from loopfree.demo.teacher import save_teacher
    from loopfree.demo.teacher_mmdit import build_pipeline
    from loopfree.toy.assets import bundled
    from loopfree.toy.settings import MMDiTTeacherConfig
    from loopfree.toy.tokenizer import build_tokenizer
    from loopfree.toy.world import heldout_prompts

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd3-teacher")
    cfg = MMDiTTeacherConfig(text_width=16, text_layers=2, text_heads=2, text_projection=8, layers=2, heads=2, head_dim=8)
    pipe = build_pipeline(cfg, AutoencoderKL.from_pretrained(bundled("teacher") / "vae"), build_tokenizer())
    pipe.vae.register_to_config(shift_factor=0.1)
    save_teacher(root / "pipe", pipe)
    (root / "prompts.txt").write_text("\n".join(heldout_prompts(8, seed=1)) + "\n")
    return root


def distill_args(root, out, *extra):
    return ["distill", "--teacher", str(root / "pipe"), "--prompts", str(root / "prompts.txt"), "--out", str(out),
            "--batch-size", "2", "--steps", "2", "--lora-rank", "4", "--max-steps", "2", "--checkpoint-every", "1",
            "--log-with", "none", "--shared-blocks", "1", *extra]


def test_distill_publishes_an_sd3_student_that_plain_diffusers_loads(sd3_teacher, tmp_path):
    import json

    from click.testing import CliRunner
    from diffusers import StableDiffusion3Pipeline

    from loopfree.cli import main
    from loopfree.pipelines.loading import load_pipeline
    from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline

    out = tmp_path / "run"
    r = CliRunner().invoke(main, distill_args(sd3_teacher, out, "--validate-every", "1"))
    assert r.exit_code == 0, r.output
    recorded = json.loads((out / "loopfree.json").read_text())
    assert recorded["shared_blocks"] == 1
    assert recorded["decoder_sigmas"] == pytest.approx(flow.decoder_sigmas(SCHEDULER.from_pretrained(
        sd3_teacher / "pipe" / "scheduler").config, 2))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-00000001.png", "step-00000002.png"]
    plain = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    teacher = StableDiffusion3Pipeline.from_pretrained(sd3_teacher / "pipe", text_encoder_3=None, tokenizer_3=None)
    moved = [not torch.equal(a, b) for a, b in zip(plain.transformer.parameters(), teacher.transformer.parameters())]
    assert any(moved)  # the student's weights, not the teacher's
    student = load_pipeline(out)
    assert isinstance(student, LoopFreeSD3Pipeline) and student.decoder_sigmas == recorded["decoder_sigmas"]
    image = student("a red circle", output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64)
    # resumed to 3 steps from its last checkpoint
    r = CliRunner().invoke(main, distill_args(sd3_teacher, out, "--resume", "latest", "--max-steps", "3"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "timing.json").read_text())["steps"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--student-init", "somewhere"], "--student-init is not built for an SD3"),
    (["--timesteps", "751,1"], "not --timesteps"),
])
def test_distill_refuses_what_an_sd3_student_lacks_in_one_line(sd3_teacher, tmp_path, extra, message):
    from click.testing import CliRunner

    from loopfree.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, distill_args(sd3_teacher, out, *extra))
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (out / "model_index.json").exists()


def test_distill_with_teacher_pairs_regresses_on_sd3s_own_euler_samples(sd3_teacher, tmp_path):
    from click.testing import CliRunner
    from diffusers import StableDiffusion3Pipeline

    from loopfree.cli import main
    from loopfree.training.pairs import PairCache

    pairs = tmp_path / "pairs"
    r = CliRunner().invoke(main, distill_args(sd3_teacher, tmp_path / "run", "--regression-weight", "1",
                                              "--regression-pairs", "3", "--regression-steps", "2",
                                              "--regression-cache", str(pairs)))
    assert r.exit_code == 0, r.output
    (folder,) = [p for p in pairs.iterdir() if p.is_dir()]
    cache = PairCache(pairs, {}, 3)
    cache.path = folder
    x_T, x0 = cache.load()
    # pair 0 is the teacher's 2-step guided Euler from its x_T, as StableDiffusion3Pipeline samples it
    plain = StableDiffusion3Pipeline.from_pretrained(sd3_teacher / "pipe", text_encoder_3=None, tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    prompt = (sd3_teacher / "prompts.txt").read_text().splitlines()[0]
    ref = plain(prompt, num_inference_steps=2, guidance_scale=4.5, latents=x_T[:1], output_type="latent").images
    torch.testing.assert_close(x0[:1], ref, rtol=1e-4, atol=1e-5)
