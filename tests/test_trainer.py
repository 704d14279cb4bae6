"""Distillation: one step trains student and LoRA only, resume is exact, bad input exits 2 writing nothing."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from PIL import Image
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from loopfree.cli import main
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.distiller import Batch, Distiller
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.trainer import distill
from tiny import distill_config as config
from tiny import make_teacher_folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


def test_one_step_trains_student_and_lora_and_leaves_teacher_bit_identical(teacher, tmp_path):
    cfg = config(teacher, tmp_path)
    pipe = load_pipeline(teacher / "pipe")
    teacher_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    d = Distiller(cfg, pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    student_before = [p.detach().clone() for p in d.student_params]
    lora_before = [p.detach().clone() for p in d.lora_params]
    cond, uncond = PromptEncoder(pipe, torch.device("cpu"), 16)(["a red cat", "a blue dog"])
    logs = d.step([Batch(cond, uncond)])
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, d.student_params))
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, d.lora_params))
    base = {k.replace(".base_layer", ""): v for k, v in d.scores.base.state_dict().items() if "lora_" not in k}
    assert base.keys() == teacher_before.keys()
    assert all(torch.equal(base[k], v) for k, v in teacher_before.items())


def test_several_fake_score_updates_per_student_update(teacher, tmp_path):
    pipe = load_pipeline(teacher / "pipe")
    d = Distiller(config(teacher, tmp_path, fake_updates=3), pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    cond, uncond = PromptEncoder(pipe, torch.device("cpu"), 16)(["a red cat", "a blue dog"])
    d.step([Batch(cond, uncond)])
    steps = {id(p): int(s["step"]) for opt in (d.opt_student, d.opt_fake) for p, s in opt.state.items()}
    assert {steps[id(p)] for p in d.student_params} == {1} and {steps[id(p)] for p in d.lora_params} == {3}


@pytest.mark.parametrize("kind, prediction_type", [("sdxl", "epsilon"), ("sd", "v_prediction")])
def test_sdxl_and_v_prediction_teachers_distill(tmp_path, kind, prediction_type):
    make_teacher_folder(tmp_path, kind, prediction_type)
    out = distill(config(tmp_path, tmp_path / "out", max_steps=1, checkpoint_every=0, guidance=2.0))
    student = load_pipeline(out)
    assert student.decoder_timesteps == [751, 501, 251, 1]
    assert torch.isfinite(student("a red cat", output_type="pt").images).all()


@pytest.mark.parametrize("targets", [["to_q", "to_v"], ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]])
def test_batched_teacher_and_fake_pass_equals_separate_passes(teacher, tmp_path, targets):
    pipe = load_pipeline(teacher / "pipe")
    d = Distiller(config(teacher, tmp_path, lora_targets=targets), pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    with torch.no_grad():
        for p in d.lora_params:  # a LoRA that really changes the fake score
            p.normal_(0, 0.2)
    cond, uncond = PromptEncoder(pipe, torch.device("cpu"), 16)(["a red cat", "a blue dog"])
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    d.scores.batch_pair = False
    plain_teacher, plain_fake = d.scores.pair(x_t, t, cond, uncond)
    with d.scores.teacher():
        assert torch.equal(d.scores.eps(x_t, t, cond), pipe.unet(x_t, t, cond.text).sample)  # adapters off = teacher
    d.scores.batch_pair = True
    fast_teacher, fast_fake = d.scores.pair(x_t, t, cond, uncond)
    assert (plain_fake - plain_teacher).abs().max() > 1e-3
    assert torch.allclose(fast_teacher, plain_teacher, atol=1e-5) and torch.allclose(fast_fake, plain_fake, atol=1e-5)


def test_prompt_cache_gives_the_same_conditioning_and_stays_within_its_bound(teacher):
    pipe = load_pipeline(teacher / "pipe")
    prompts = ["a red cat", "a blue dog", "a red cat", "a green bird"]
    plain = PromptEncoder(pipe, torch.device("cpu"), 16)(prompts)
    cached = PromptEncoder(pipe, torch.device("cpu"), 16, cache_mb=1)
    cached(prompts[:1])
    for a, b in zip(plain, cached(prompts)):
        assert torch.equal(a.text, b.text)  # bit for bit: a cached run is the run
    one = cached.bytes / len(cached.cache)
    small = PromptEncoder(pipe, torch.device("cpu"), 16, cache_mb=2.5 * one / 2**20)  # room for two prompts
    small(prompts[:2])
    small(prompts[2:])  # "a red cat" is a hit, "a green bird" new: "a blue dog" is the least recently used
    assert list(small.cache) == ["a red cat", "a green bird"] and small.bytes <= small.limit  # "a blue dog" was least recent
    assert all(t.device.type == "cpu" for t in (c.text for c in small.cache.values()))
    for a, b in zip(plain, small(prompts)):
        assert torch.equal(a.text, b.text)


def _weights(directory):
    return load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def test_resume_is_exact_and_skips_partial_checkpoints(teacher, tmp_path):
    straight = distill(config(teacher, tmp_path / "a"))
    first = distill(config(teacher, tmp_path / "b", max_steps=2))
    ckpts = first / "checkpoints"
    # a crash mid-write leaves a partial directory; a complete-looking name without state is not complete either
    (ckpts / ".tmp-checkpoint-00000003" / "student").mkdir(parents=True)
    (ckpts / "checkpoint-00000003").mkdir()
    resumed = distill(config(teacher, tmp_path / "b", resume="latest"))
    a, b = _weights(straight / "unet"), _weights(resumed / "unet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = straight / "checkpoints" / "checkpoint-00000004", resumed / "checkpoints" / "checkpoint-00000004"
    for f in ["fake_lora.safetensors", "ema.safetensors", "student/diffusion_pytorch_model.safetensors"]:
        a, b = load_file(last_a / f), load_file(last_b / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert json.loads((last_b / "trainer_state.json").read_text())["step"] == 4


def test_final_pipeline_loads_everywhere_and_records_timesteps(teacher, tmp_path):
    out = distill(config(teacher, tmp_path, max_steps=1, save_ema=False, checkpoint_every=1, validate_every=1,
                         log_with="tensorboard", validation_prompts=["a red cat", "a blue dog"]))
    assert json.loads((out / "loopfree.json").read_text())["decoder_timesteps"] == [751, 501, 251, 1]
    assert Image.open(out / "validation" / "step-00000001.png").size == (4 * 16, 2 * 16)  # seeds × prompts
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    student = load_pipeline(out)
    assert student.decoder_timesteps == [751, 501, 251, 1]
    raw = _weights(out / "checkpoints" / "checkpoint-00000001" / "student")
    assert all(torch.equal(raw[k], v) for k, v in student.unet.state_dict().items())
    assert isinstance(StableDiffusionPipeline.from_pretrained(out), StableDiffusionPipeline)
    assert len(student("a red cat", generator=torch.Generator().manual_seed(0)).images) == 1


def test_one_step_student_records_its_reparameterisation(teacher, tmp_path):
    out = distill(config(teacher, tmp_path, max_steps=1, student="one-step", checkpoint_every=0))
    assert json.loads((out / "loopfree.json").read_text()) == {"decoder_timesteps": [999], "final_alpha_cumprod": 1.0}


def test_sigterm_saves_a_checkpoint_and_exits_143(teacher, tmp_path):
    out = tmp_path / "run"
    args = ["--teacher", teacher / "pipe", "--prompts", teacher / "prompts.txt", "--out", out, "--batch-size", "2",
            "--lora-rank", "4", "--log-with", "none", "--max-steps", "100000", "--checkpoint-every", "0"]
    p = subprocess.Popen([sys.executable, "-m", "loopfree", "distill", *map(str, args)], stderr=subprocess.PIPE, text=True)
    buf = ""
    while "2/100000" not in buf:  # wait for a couple of steps: the handler is installed by then
        buf += p.stderr.read(1)
        assert p.poll() is None, buf
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted: checkpoint saved at step" in err
    assert any((c / "trainer_state.json").is_file() for c in (out / "checkpoints").iterdir())


def test_two_process_cpu_run_keeps_replicas_identical(teacher, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU: two real DDP ranks (gloo), same weights."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "loopfree", "distill",
           "--teacher", str(teacher / "pipe"), "--prompts", str(teacher / "prompts.txt"), "--out", str(out),
           "--batch-size", "2", "--lora-rank", "4", "--log-with", "none", "--max-steps", "2", "--checkpoint-every", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes hold identical student weights" in p.stdout
    ckpt = out / "checkpoints" / "checkpoint-00000002"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert load_pipeline(out).decoder_timesteps == [751, 501, 251, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "{tmp}/missing"], "does not exist"),
        (["--teacher", "{tmp}"], "not a diffusers pipeline"),
        (["--prompts", "{tmp}/empty.txt"], "no prompts in"),
        (["--prompts", "{tmp}/bad.jsonl"], "line 2"),
        (["--prompts", "{tmp}/nofile.txt"], "nofile.txt"),
        (["--config", "{tmp}/unknown.yaml"], "lora_rnk"),
        (["--steps", "1"], "one-step"),
        (["--steps", "0"], "steps"),
        (["--batch-size", "0"], "batch_size"),
        (["--resolution", "13"], "multiple of 2"),
        (["--resolution", "1000000"], "over this model's limit"),
        (["--resume", "{tmp}/nockpt"], "not a complete loopfree checkpoint"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(teacher, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red cat"}\n{"prompt": \n')
    (tmp_path / "unknown.yaml").write_text("lora_rnk: 4\n")
    (tmp_path / "nockpt").mkdir()
    defaults = {"--teacher": str(teacher / "pipe"), "--prompts": str(teacher / "prompts.txt")}
    given = dict(zip(args[::2], [a.replace("{tmp}", str(tmp_path)) for a in args[1::2]]))
    out = tmp_path / "out"
    argv = ["distill", "--out", str(out), "--max-steps", "1", *sum(({**defaults, **given}).items(), ())]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()
