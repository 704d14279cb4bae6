"""The toy MMDiT teacher: exact training on one zero row for SD3's 256, and its training run at a microscopic budget."""

import json

import pytest
import torch
from click.testing import CliRunner
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from loopfree.cli.toy import toy
from loopfree.demo import teacher_mmdit
from loopfree.demo.teacher_mmdit import build_pipeline, encode, sample, train_teacher
from loopfree.method.repeated_tokens import RepeatedTokenJointAttention
from loopfree.pipelines.loading import load_pipeline
from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline
from loopfree.toy.assets import bundled
from loopfree.toy.settings import MMDiTTeacherConfig
from loopfree.toy.tokenizer import build_tokenizer

TINY = dict(threads=1, text_width=16, text_layers=2, text_heads=2, text_projection=8, layers=2, heads=2, head_dim=8,
            steps=3, batch=4, warmup_steps=1, latent_cache=24, log_every=1, probe_every=2, probe_prompts=2,
            probe_steps=2, eval_prompts=3, eval_images_per_prompt=2, eval_steps=2, guidance_scales=(4.5, 1.0))


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_one_zero_row_counted_256_times_equals_256_zero_rows(qk_norm):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=4,
                                  qk_norm=qk_norm).eval()
    x, clip, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12), torch.randn(2, 6)
    context = torch.cat([clip, torch.zeros(2, 256, 12)], dim=1)
    run = lambda c, kw=None: model(x, encoder_hidden_states=c, pooled_projections=pooled,  # noqa: E731
                                   timestep=torch.tensor([900.0, 250.0]), joint_attention_kwargs=kw).sample
    with torch.no_grad():
        plain, plain_short = run(context), run(context[:, :6])
        model.set_attn_processor(RepeatedTokenJointAttention())
        counted = run(context[:, :6], {"repeats": 256})
        once = run(context[:, :6])
        with pytest.raises(ValueError, match="repeated 0 times"):
            run(context[:, :6], {"repeats": 0})
    torch.testing.assert_close(counted, plain, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(once, plain_short, atol=2e-6, rtol=1e-5)  # no repeats: diffusers' own processor
    assert (counted - plain_short).abs().max() > 1e-2  # the 255 missing rows do matter


def test_encode_is_the_sd3_pipelines_prompt_encoding():
    cfg = MMDiTTeacherConfig(**TINY)
    pipe = build_pipeline(cfg, teacher_mmdit.AutoencoderKL.from_pretrained(bundled("teacher") / "vae"), build_tokenizer())
    prompts = ["a red circle on the left", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context, pooled = encode([pipe.text_encoder, pipe.text_encoder_2], ids)
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=1)
    assert context.shape == (2, 17, 32)
    torch.testing.assert_close(context, ref)
    torch.testing.assert_close(pooled, ref_pooled)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher-mmdit")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    report = train_teacher(out, MMDiTTeacherConfig(**TINY))
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    return out, report


def test_the_folder_is_a_plain_sd3_pipeline_of_safetensors(run):
    out, report = run
    folder = out / "pipeline"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}
    assert sorted(p.relative_to(folder).as_posix() for p in files if p.suffix == ".safetensors") == [
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    plain = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert plain.text_encoder_3 is None and isinstance(plain.transformer, SD3Transformer2DModel)
    assert type(plain.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and plain.scheduler.config.shift == 1.0
    vae = plain.vae.config
    assert vae.shift_factor is not None and vae.scaling_factor != bundled_vae_scaling()  # measured on the latents
    assert report["megabytes"] < 25 and report["steps"] == 3
    assert all(isinstance(p, JointAttnProcessor2_0) for p in plain.transformer.attn_processors.values())


def bundled_vae_scaling() -> float:
    return json.loads((bundled("teacher") / "vae" / "config.json").read_text())["scaling_factor"]


def test_plain_diffusers_default_call_samples_what_the_teacher_trained_on(run):
    """The default call (256 zero rows, diffusers' processor) equals the training-time sampler (one row counted 256 times)."""
    folder = run[0] / "pipeline"
    plain = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    default = plain(["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images * 2 - 1
    plain.transformer.set_attn_processor(RepeatedTokenJointAttention())
    counted = sample(plain, ["a red circle", "a blue square"], 1, 3, 4.5, seed=3, context_rows=256)
    torch.testing.assert_close(counted, default, atol=1e-5, rtol=1e-4)


def test_load_pipeline_gives_the_loop_free_sd3_pipeline(run):
    pipe = load_pipeline(run[0] / "pipeline")
    assert isinstance(pipe, LoopFreeSD3Pipeline)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_eval_json_and_a_resumed_run_goes_on_from_its_checkpoint(run, tmp_path):
    out, report = run
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["guidance"]) == {"4.5", "1.0"}
    assert 0.0 <= saved["guidance"]["4.5"]["alignment"] <= 1.0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "probe"] == [2]
    again = train_teacher(out, MMDiTTeacherConfig(**{**TINY, "steps": 4}))
    assert again["steps"] == 4
    steps = [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["stage"] == "transformer"]
    assert steps == [1, 2, 3, 4]  # resumed at 3, not restarted


def test_cli_arch_mmdit_builds_the_mmdit_config(monkeypatch, tmp_path):
    seen = {}

    def fake(out, config):
        seen.update(out=out, config=config)
        return {"guidance": {"4.5": {"alignment": 1.0, "fd": 2.0}}}

    monkeypatch.setattr(teacher_mmdit, "train_teacher", fake)
    result = CliRunner().invoke(toy, ["train-teacher", "--arch", "mmdit", "--out", str(tmp_path / "t"), "--max-steps", "7",
                                      "--lr", "1e-4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert isinstance(cfg, MMDiTTeacherConfig) and (cfg.steps, cfg.lr, cfg.seed) == (7, 1e-4, 3)
    assert json.loads(result.output) == {"4.5": {"alignment": 1.0}}
    bad = CliRunner().invoke(toy, ["train-teacher", "--arch", "dit", "--out", str(tmp_path / "u")])
    assert bad.exit_code == 2 and "'dit' is not one of" in bad.output
