"""TiUE as a LoRA (``distill --student-lora-rank``): only the adapter trains (the base and the teacher unchanged bit for
bit), resume is exact, and the published adapter loads in plain diffusers and in ``load_pipeline(base, lora=run)``,
which reproduces the run's validation images; generate, eval and serve take it with ``--lora``."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from loopfree.cli import main
from loopfree.pipelines.loading import load_pipeline
from loopfree.training.config import load_config
from loopfree.training.distiller import Batch, Distiller
from loopfree.training.prompt_encoder import PromptEncoder
from loopfree.training.trainer import distill
from loopfree.utils.errors import LoopfreeError
from loopfree.utils.images import image_grid
from tiny import distill_config as config
from tiny import make_teacher_folder

# on attention and convolutions, as the toy recipe's: diffusers' key conversion once dropped the attention half on loading
LORA = dict(student_lora_rank=4, student_lora_alpha=8.0, lr_student=1e-2,
            student_lora_targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_folder(tmp_path_factory.mktemp("teacher"))


def test_one_step_trains_the_adapter_only(teacher, tmp_path):
    pipe = load_pipeline(teacher / "pipe")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    d = Distiller(config(teacher, tmp_path, **LORA), pipe.unet, pipe.scheduler, Accelerator(cpu=True), latent_size=8)
    names = d._trained_names()
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # the adapter's, nothing else
    assert {id(p) for g in d.opt_student.param_groups for p in g["params"]} == {id(p) for p in d.student_params}
    adapter = [p.detach().clone() for p in d.student_params]
    cond, uncond = PromptEncoder(pipe, torch.device("cpu"), 16)(["a red cat", "a blue dog"])
    d.step([Batch(cond, uncond)])
    assert any(not torch.equal(a, b) for a, b in zip(adapter, d.student_params))
    for network in (d.student, d.scores.base):  # the student's frozen base and the teacher: unchanged bit for bit
        base = {k.replace(".base_layer", ""): v for k, v in network.state_dict().items() if "lora_" not in k}
        assert base.keys() == before.keys() and all(torch.equal(base[k], v) for k, v in before.items())


def test_resume_is_exact(teacher, tmp_path):
    straight = distill(config(teacher, tmp_path / "a", **LORA))
    distill(config(teacher, tmp_path / "b", max_steps=2, **LORA))
    resumed = distill(config(teacher, tmp_path / "b", resume="latest", **LORA))
    a, b = (load_file(run / "pytorch_lora_weights.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_published_adapter_loads_in_plain_diffusers_and_reproduces_the_validation_images(teacher, tmp_path):
    prompts = ["a red cat", "a blue dog"]
    out = distill(config(teacher, tmp_path, max_steps=2, save_ema=False, validate_every=2, validation_prompts=prompts,
                         checkpoint_every=0, **LORA))
    recorded = json.loads((out / "loopfree.json").read_text())
    assert recorded["decoder_timesteps"] == [751, 501, 251, 1] and len(recorded["base_sha256"]) == 64
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()  # the adapter alone
    # plain diffusers: the base plus the adapter is a different network from the base
    plain = StableDiffusionPipeline.from_pretrained(teacher / "pipe", safety_checker=None)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    with torch.no_grad():
        before = plain.unet(x, t, text).sample
        plain.load_lora_weights(out)
        assert (plain.unet(x, t, text).sample - before).abs().max() > 1e-4
    loaded = {n.split(".lora_A")[0] for n, _ in plain.unet.named_parameters() if ".lora_A." in n}
    assert loaded == {k[len("unet."):].split(".lora_A")[0] for k in load_file(out / "pytorch_lora_weights.safetensors") if ".lora_A." in k}
    assert any("attn" in n for n in loaded) and any("conv1" in n for n in loaded)  # every adapted layer, both kinds
    # loopfree: the loop-free student of its recorded steps, the run's validation grid again
    student = load_pipeline(teacher / "pipe", lora=out)
    assert student.decoder_timesteps == [751, 501, 251, 1]
    student.set_progress_bar_config(disable=True)
    rows = [student([p] * 4, generator=[torch.Generator().manual_seed(s) for s in range(4)], height=16, width=16).images
            for p in prompts]
    saved = np.asarray(Image.open(out / "validation" / "step-00000002.png"))
    assert np.abs(np.asarray(image_grid(rows)).astype(int) - saved.astype(int)).max() <= 1
    assert "lora=" in (out / "README.md").read_text()  # the card says how to load it, and on which base
    # loopfree generate --lora: the same student, its recorded steps
    r = CliRunner().invoke(main, ["generate", "a red cat", "--model", str(teacher / "pipe"), "--lora", str(out), "--out",
                                  str(tmp_path / "g"), "--resolution", "16"])
    assert r.exit_code == 0, r.output
    made = json.loads((tmp_path / "g" / "generate.json").read_text())
    assert made["steps"] == 4 and made["lora"] == str(out)


def test_a_lora_student_trains_data_parallel_on_two_processes(teacher, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "loopfree",
           "distill", "--teacher", str(teacher / "pipe"), "--prompts", str(teacher / "prompts.txt"), "--out", str(out),
           "--batch-size", "2", "--lora-rank", "4", "--log-with", "none", "--max-steps", "2", "--checkpoint-every", "2",
           "--student-lora-rank", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 processes hold identical student weights" in p.stdout
    assert load_pipeline(teacher / "pipe", lora=out).decoder_timesteps == [751, 501, 251, 1]


def test_a_lora_folder_is_checked_before_loading(teacher, tmp_path):
    with pytest.raises(LoopfreeError, match="holds no LoRA student"):
        load_pipeline(teacher / "pipe", lora=tmp_path)
    with pytest.raises(LoopfreeError, match="drop --shard"):
        load_config(None, dict(teacher="t", prompts="p", out="o", student_lora_rank=4, shard=True))


@pytest.fixture(scope="module")
def toy_lora(tmp_path_factory):
    """A LoRA student of the bundled toy teacher, two steps."""
    from loopfree.toy.assets import bundled

    root = tmp_path_factory.mktemp("toy-lora")
    (root / "prompts.txt").write_text("a red circle\na blue square on the left\n")
    cfg = load_config(None, dict(teacher=str(bundled("teacher")), prompts=str(root / "prompts.txt"), out=str(root / "run"),
                                 batch_size=2, lora_rank=4, log_with="none", checkpoint_every=0, max_steps=2,
                                 student_lora_rank=4))
    return bundled("teacher"), distill(cfg)


def test_eval_and_serve_take_a_lora_student(toy_lora, tmp_path):
    from loopfree.serve.engine import check_serve_models, load_engine

    base, run = toy_lora
    r = CliRunner().invoke(main, ["eval", "--features", "toy", "--num-prompts", "2", "--images-per-prompt", "2",
                                  "--metrics", "alignment", "--model", str(base), "--lora", str(run), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["settings"]["lora"] == str(run) and results["sampling"]["timesteps"] == [751, 501, 251, 1]
    assert "lora/pytorch_lora_weights.safetensors" in results["weights"]
    spec = check_serve_models(base, None, "cpu", "fp32", lora=run)
    assert spec.models[0][0] == run.name and spec.models[0][1].decoder_timesteps == [751, 501, 251, 1]
    engine = load_engine(spec)
    assert engine.student.pipe.decoder_timesteps == [751, 501, 251, 1] and engine.teacher is None


def test_a_fused_lora_student_samples_as_the_unfused_one(toy_lora, tmp_path):
    from peft.tuners.lora import LoraLayer

    base, run = toy_lora
    plain, fused = load_pipeline(base, lora=run), load_pipeline(base, lora=run, fuse=True)
    assert any(isinstance(m, LoraLayer) for m in plain.unet.modules())
    assert not any(isinstance(m, LoraLayer) for m in fused.unet.modules()) and fused.decoder_timesteps == plain.decoder_timesteps
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = (p(["a red circle", "a blue square"], latents=x_T, output_type="latent").images for p in (plain, fused))
    assert (a - b).abs().max() < 1e-4 and (a - plain(["a red circle", "a blue square"], latents=x_T, output_type="latent",
                                                      mode="loop", num_inference_steps=4).images).abs().max() > 1e-3
    r = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(base), "--fuse", "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "give --lora" in r.output


def test_runs_made_before_lora_students_existed_still_resume(teacher, tmp_path):
    """Their saved identity lacks the student-LoRA settings: a full student's identity must match it (a default of 0
    for the rank refused every older run's resume)."""
    from loopfree.training.trainer import run_identity
    from loopfree.utils.outputs import changed_keys

    now = run_identity(config(teacher, tmp_path))
    older = {k: v for k, v in now.items() if not k.startswith("student_lora")}
    assert changed_keys(older, now) == []
