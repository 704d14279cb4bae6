"""The toy teacher's training pipeline end to end, at a microscopic budget."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline

from loopfree.utils.errors import LoopfreeError
from loopfree.pipelines.loading import load_pipeline
from loopfree.pipelines.pipeline import LoopFreePipeline
from loopfree.cli.toy import toy
from loopfree.demo.teacher import TeacherConfig, train_teacher

TINY = dict(
    threads=1, vae_channels=(8, 8, 8), vae_groups=4, vae_steps=2, vae_batch=4,
    text_width=16, text_layers=1, text_heads=2, unet_channels=(16, 16), unet_cross_attention=(True, False),
    unet_groups=4, unet_heads=2, unet_steps=3, unet_batch=4, warmup_steps=1, latent_cache=24,
    log_every=1, probe_every=2, probe_prompts=2, probe_steps=2,
    eval_prompts=3, eval_images_per_prompt=2, eval_steps=2, guidance_scales=(4.5, 1.0),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    report = train_teacher(out, TeacherConfig(**{**TINY, "threads": 1}))
    # the process's thread count and random state are as they were (they were left changed before)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    return out, report


def test_pipeline_directory_loads_and_holds_safetensors_only(run):
    out, report = run
    folder = out / "pipeline"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}
    assert sorted(p.relative_to(folder).as_posix() for p in files if p.suffix == ".safetensors") == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert report["megabytes"] < 30
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert plain.scheduler.config.steps_offset == 1 and plain.scheduler.config.timestep_spacing == "leading"
    assert plain.text_encoder.config.vocab_size == 595 and plain.text_encoder.config.max_position_embeddings == 16
    assert plain.vae.config.scaling_factor != 0.18215  # measured, not the default
    assert plain.tokenizer("a red circle").input_ids[:3] == [593, plain.tokenizer.convert_tokens_to_ids("a</w>"), plain.tokenizer.convert_tokens_to_ids("red</w>")]
    pipe = load_pipeline(folder)
    assert isinstance(pipe, LoopFreePipeline)
    image = pipe("a red circle", num_inference_steps=2, mode="loop", output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_evaluation_json_has_per_attribute_accuracy(run):
    out, report = run
    saved = json.loads((out / "eval.json").read_text())
    assert saved["unet_steps"] == 3
    assert set(saved["guidance"]) == {"4.5", "1.0"}
    for scores in saved["guidance"].values():
        for name in ("shape", "colour", "size", "position", "background"):
            assert 0.0 <= scores[f"accuracy_{name}"] <= 1.0
        assert scores["n_images"] == 6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"vae", "unet", "probe"}


def test_rerun_resumes_from_checkpoints(run):
    out, _ = run
    report = train_teacher(out, TeacherConfig(**{**TINY, "unet_steps": 4, "guidance_scales": (2.0,)}))
    assert report["unet_steps"] == 4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4]  # only step 4 was new
    with pytest.raises(LoopfreeError, match="autoencoder"):  # its latents would no longer match the UNet
        train_teacher(out, TeacherConfig(**{**TINY, "vae_steps": 3}))


def test_config_rejects_oversized_models(tmp_path):
    with pytest.raises(LoopfreeError, match="max_megabytes"):
        train_teacher(tmp_path, TeacherConfig(**{**TINY, "max_megabytes": 0.01}))


def test_cli_exposes_train_teacher():
    result = CliRunner().invoke(toy, ["train-teacher", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--max-steps", "--minutes", "--seed", "--threads"):
        assert option in result.output
