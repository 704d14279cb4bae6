"""The transformer pipelines (PixArt-α, SD3 without T5, FLUX schnell and dev) on tiny random folders: saved folders
load in plain diffusers and through the loading gate as the right class; ``loop`` mode is the diffusers pipeline itself
on the same x_T; the one pass with K = 1 is the diffusers pipeline's one step; ``loopfree generate`` samples each
family, ``serve`` and ``eval`` take them, and ``loopfree distill`` refuses them before torch loads."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from diffusers import (DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, PixArtAlphaPipeline,
                       StableDiffusion3Pipeline)
from PIL import Image

from loopfree.cli import main
from loopfree.method.schedule import decoder_timesteps
from loopfree.pipelines.loading import inspect_pipeline, load_pipeline
from loopfree.pipelines.pipeline_flux import LoopFreeFluxPipeline
from loopfree.pipelines.pipeline_pixart import LoopFreePixArtPipeline
from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline
from loopfree.pipelines.transformer_pipeline import plan_transformer_steps
from loopfree.utils.errors import LoopfreeError
from tiny import PROMPTS as PROMPT_FILE
from tiny_transformer import KINDS, make_transformer_pipeline

PROMPTS = ["a red cat", "the blue dog"]
SIZE = dict(height=16, width=16)
CLASSES = {"pixart": (LoopFreePixArtPipeline, PixArtAlphaPipeline), "sd3": (LoopFreeSD3Pipeline, StableDiffusion3Pipeline),
           "flux": (LoopFreeFluxPipeline, FluxPipeline), "flux-dev": (LoopFreeFluxPipeline, FluxPipeline)}
ALL = [*KINDS, "flux-dev"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind → (the tiny pipeline, its saved folder), each built once."""
    made = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            pipe = make_transformer_pipeline(root, kind)
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(root / "pipe")
            made[kind] = pipe, root / "pipe"
        return made[kind]

    return get


def plain_kwargs(kind: str) -> dict:
    """How the plain pipeline is called for what ours does: PixArt without binning and caption cleaning."""
    return dict(use_resolution_binning=False, clean_caption=False) if kind == "pixart" else {}


def guidance(kind: str) -> dict:
    """Guidance in each family's own terms: CFG (PixArt, SD3); FLUX's true CFG with negative prompts, and for dev
    its embedded guidance scale."""
    if kind.startswith("flux"):
        return dict(guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt=["", "a green circle"])
    return dict(guidance_scale=3.0)


def as_plain(kind: str, pipe, x: torch.Tensor) -> torch.Tensor:
    """x_T as the plain pipeline takes it: FLUX's packed into 2×2 patches."""
    return pipe._pack(x) if kind.startswith("flux") else x


@pytest.mark.parametrize("kind", KINDS)
def test_saved_folder_loads_in_plain_diffusers_and_as_its_loop_free_class(family, kind):
    pipe, path = family(kind)
    ours, plain_cls = CLASSES[kind]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == plain_cls.__name__
    assert json.loads((path / "loopfree.json").read_text()) == {"shared_blocks": 2}  # L // 2 of 4 blocks by default
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if kind == "sd3" else {}  # diffusers' way to drop SD3's T5
    plain = DiffusionPipeline.from_pretrained(path, **no_t5)
    assert type(plain) is plain_cls
    assert all(torch.equal(a, b) for a, b in zip(plain.transformer.state_dict().values(), pipe.transformer.state_dict().values()))
    loaded = load_pipeline(path)
    assert type(loaded) is ours and loaded.num_shared_blocks == 2
    info = inspect_pipeline(path, transformers=True)
    assert info.family == kind and info.shared_blocks == 2 and info.absent == (("text_encoder_3", "tokenizer_3") if kind == "sd3" else ())


@pytest.mark.parametrize("kind", ALL)
def test_loop_mode_is_the_diffusers_pipeline_on_the_same_x_T(family, kind):
    pipe, _ = family(kind)
    plain = CLASSES[kind][1](**pipe.components)
    x = torch.randn(2, *pipe.latent_shape(16, 16), generator=torch.Generator().manual_seed(4))
    # SD3 without T5: our loop runs its 256 zero text rows as one (exact but for float rounding)
    tol = dict(atol=3e-5, rtol=1e-4) if kind == "sd3" else dict(atol=1e-6, rtol=1e-5)
    for output_type in ("latent", "np"):
        ours = pipe(PROMPTS, **SIZE, latents=x, mode="loop", num_inference_steps=3, output_type=output_type, **guidance(kind)).images
        ref = plain(PROMPTS, **SIZE, latents=as_plain(kind, pipe, x), num_inference_steps=3, output_type=output_type,
                    **guidance(kind), **plain_kwargs(kind)).images
        if output_type == "latent" and kind.startswith("flux"):
            ref = pipe._unpack(ref, 16, 16)
        assert torch.allclose(torch.as_tensor(ours), torch.as_tensor(ref), **tol)
    # and the same generator draws the same x_T as the plain pipeline
    ours = pipe(PROMPTS[:1], **SIZE, mode="loop", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(7)).images
    ref = plain(PROMPTS[:1], **SIZE, num_inference_steps=2, output_type="latent", guidance_scale=1.0,
                generator=torch.Generator().manual_seed(7), **plain_kwargs(kind)).images
    assert torch.allclose(ours, pipe._unpack(ref, 16, 16) if kind.startswith("flux") else ref, **tol)


@pytest.mark.parametrize("kind", ALL)
def test_one_pass_with_one_decoder_is_the_pipelines_one_step(family, kind):
    """K = 1: the shared part and the one per-step part make the model's forward at τ_K, so the one pass (its text
    encoding, guidance, x_T and combination) must give the diffusers pipeline's one-step sample, at the default N."""
    pipe, _ = family(kind)
    components = pipe.components
    if kind == "pixart":  # DDIM from timestep 999 to ā = 1, where PixArt's one-step sample (its x̂_0) lands
        ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
        components = {**components, "scheduler": ddim}
    ours, plain = CLASSES[kind][0](**components), CLASSES[kind][1](**components)
    x = torch.randn(2, *pipe.latent_shape(16, 16), generator=torch.Generator().manual_seed(5))
    one_pass = ours(PROMPTS, **SIZE, latents=x, num_inference_steps=1, output_type="latent", **guidance(kind)).images
    ref = plain(PROMPTS, **SIZE, latents=as_plain(kind, pipe, x), num_inference_steps=1, output_type="latent",
                **guidance(kind), **plain_kwargs(kind)).images
    ref = pipe._unpack(ref, 16, 16) if kind.startswith("flux") else ref
    assert ((one_pass - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_shared_blocks_and_decoder_steps_are_recorded_and_used(family, kind, tmp_path):
    pipe, _ = family(kind)
    student = type(pipe)(**pipe.components)
    student.set_progress_bar_config(disable=True)
    student.shared_blocks = 1
    steps = [999, 666, 333] if kind == "pixart" else [1.0, 0.8, 0.5]
    setattr(student, "decoder_timesteps" if kind == "pixart" else "decoder_sigmas", steps)
    student.save_pretrained(tmp_path / "student")
    key = "decoder_timesteps" if kind == "pixart" else "decoder_sigmas"
    assert json.loads((tmp_path / "student" / "loopfree.json").read_text()) == {"shared_blocks": 1, key: steps}
    loaded = load_pipeline(tmp_path / "student")
    assert loaded.shared_blocks == 1 and getattr(loaded, key) == steps
    plan = loaded.plan_steps("loop_free")
    assert plan.num_steps == 3 and (plan.timesteps if kind == "pixart" else plan.sigmas) == steps
    x = torch.randn(1, *pipe.latent_shape(16, 16), generator=torch.Generator().manual_seed(6))
    at_1 = loaded(PROMPTS[:1], **SIZE, latents=x, output_type="latent").images
    assert torch.allclose(at_1, student(PROMPTS[:1], **SIZE, latents=x, output_type="latent").images, atol=1e-5, rtol=1e-5)
    student.shared_blocks = 3
    assert not torch.allclose(at_1, student(PROMPTS[:1], **SIZE, latents=x, output_type="latent").images, atol=1e-4)


def test_step_plans_of_flow_models_and_pixart():
    flux = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    plan = plan_transformer_steps("flux", "loop_free", None, None, None, flux, [1.0, 0.7, 0.3])
    assert plan.num_steps == 3 and plan.sigmas == [1.0, 0.7, 0.3] and plan.timesteps is None
    plan = plan_transformer_steps("flux", "loop_free", 2, None, None, flux, [1.0, 0.7, 0.3])
    assert plan.num_steps == 2 and plan.sigmas is None  # the pipeline's σ's for K = 2, at the call's resolution
    assert plan_transformer_steps("sd3", "loop_free", None, None, None, flux, None, [0.9, 0.2]).sigmas == [0.9, 0.2]
    assert plan_transformer_steps("sd3", "loop", None, None, None, flux, None).num_steps == 50
    pixart = DDIMScheduler().config
    assert plan_transformer_steps("pixart", "loop_free", 4, None, None, pixart, None).timesteps == decoder_timesteps(pixart, 4)
    for args, message in [
        (("flux", "loop_free", None, [751, 1], None, flux, None), "samples by σ"),
        (("sd3", "propagate", None, None, None, flux, None), "propagate mode"),
        (("pixart", "propagate", None, None, None, pixart, None), "propagate mode"),
        (("sd3", "loop", None, None, [0], flux, None), "key steps belong to the propagate mode"),
        (("sd3", "loop_free", None, None, None, flux, None, [0.5, 0.9]), "strictly decreasing"),
        (("sd3", "loop_free", 3, None, None, flux, None, [0.9, 0.5]), "2 sigmas given but steps is 3"),
        (("pixart", "loop_free", None, None, None, pixart, None, [0.9]), "PixArt takes timesteps"),
        (("flux", "sideways", None, None, None, flux, None), "mode must be one of"),
    ]:
        with pytest.raises(LoopfreeError, match=message):
            plan_transformer_steps(*args)


def _broken(family, tmp_path, kind: str, change) -> str:
    path = tmp_path / kind
    shutil.copytree(family(kind)[1], path)
    change(path)
    return str(path)


@pytest.mark.parametrize("kind, change, message", [
    ("sd3", lambda p: (p / "transformer" / "diffusion_pytorch_model.safetensors").unlink(),
     "transformer/diffusion_pytorch_model.safetensors is missing"),
    ("flux", lambda p: (p / "text_encoder_2" / "model.safetensors").write_bytes(b"12345678"), "is truncated"),
    ("flux", lambda p: shutil.rmtree(p / "text_encoder_2"), "is not a FLUX.1 pipeline (no text_encoder_2 component)"),
    ("pixart", lambda p: (p / "loopfree.json").write_text('{"shared_blocks": 9}'), "loopfree.json: shared blocks N=9 is out of range"),
    ("pixart", lambda p: (p / "model_index.json").write_text(
        (p / "model_index.json").read_text().replace("PixArtAlphaPipeline", "PixArtSigmaPipeline")), "which loopfree does not take"),
])
def test_the_gate_refuses_an_incomplete_folder_in_one_line(family, tmp_path, kind, change, message):
    path = _broken(family, tmp_path, kind, change)
    with pytest.raises(LoopfreeError, match=re.escape(message)) as error:
        load_pipeline(path)
    assert "\n" not in str(error.value)


def test_commands_for_unet_pipelines_refuse_a_transformer_folder(family):
    with pytest.raises(LoopfreeError, match="is a Stable Diffusion 3 pipeline .a transformer denoiser.: this command takes"):
        inspect_pipeline(family("sd3")[1])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("kind, mode", [("pixart", "loop_free"), ("sd3", "loop_free"), ("flux", "loop_free"), ("flux-dev", "loop")])
def test_generate_samples_each_family(family, kind, mode, tmp_path):
    _, path = family(kind)
    out = tmp_path / "images"
    r = run("generate", "a red cat", "--model", path, "--out", out, "--resolution", "16x12", "--steps", 2, "--guidance", 2,
            "--images-per-prompt", 2, "--mode", mode)
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "generate.json").read_text())
    assert settings["files"] == ["000.png", "001.png"] and settings["steps"] == 2 and settings["mode"] == mode
    if kind == "pixart":
        assert settings["timesteps"] == decoder_timesteps(inspect_pipeline(path, transformers=True).scheduler_config, 2)
    assert Image.open(out / "001.png").size == (16, 12)  # --resolution is WIDTHxHEIGHT


@pytest.mark.parametrize("args, message", [
    (["--timesteps", "751,1"], "samples by σ"),
    (["--mode", "propagate"], "propagate mode"),
    (["--compile"], "--compile compiles a UNet"),
    (["--resolution", "18x16"], "multiple of 4"),
])
def test_generate_refuses_what_transformers_do_not_take(family, tmp_path, args, message):
    out = tmp_path / "o"
    r = run("generate", "a red cat", "--model", family("flux")[1], "--out", out, *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_distill_refuses_a_transformer_teacher_before_torch_loads(family, tmp_path):
    (tmp_path / "prompts.txt").write_text(PROMPT_FILE)
    args = ["distill", "--teacher", str(family("pixart")[1]), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "run")]
    code = ("import sys\nfrom loopfree.cli import main\ntry:\n    main(sys.argv[1:], standalone_mode=False)\n"
            "except Exception as e:\n    print(type(e).__name__, e.exit_code, 'torch' in sys.modules)\n    print(e.format_message())")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "_UsageError 2 False", p.stdout + p.stderr  # exit 2, and nothing heavy was imported
    assert "is a PixArt-α pipeline (a transformer denoiser): distillation takes Stable Diffusion (UNet)" in lines[1]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "transformer denoiser" in r.output
    assert not (tmp_path / "run").exists()


def test_serve_renders_a_transformer_student(family):
    from loopfree.serve.engine import Item, Settings, check_serve_models, load_engine

    _, path = family("sd3")
    engine = load_engine(check_serve_models(path, None, "cpu", "fp32"))  # warms up at the native 16 px
    pictures = engine.render(Settings(engine.student.id, 16, 16, "loop_free", 2, 2.0), [Item("a red cat", 3), Item("a blue dog", 4)])
    assert len(pictures) == 2 and Image.open(io.BytesIO(pictures[1].png)).size == (16, 16)


def test_eval_scores_a_transformer_student(family, tmp_path):
    _, path = family("sd3")
    r = run("eval", "--model", path, "--features", "toy", "--metrics", "alignment", "--num-prompts", 2, "--steps", 2,
            "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "eval" / "images").glob("*.png"))) == 2
