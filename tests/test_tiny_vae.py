"""A tiny autoencoder (diffusers' AutoencoderTiny, TAESD's class) decodes instead of the model's VAE."""

import json

import torch
from click.testing import CliRunner
from diffusers import AutoencoderTiny
from PIL import Image

from loopfree.cli import main
from loopfree.pipelines.loading import load_pipeline
from loopfree.toy.assets import bundled
from evalkit import make_tiny_vae


def test_tiny_vae_decodes_in_generate_and_the_pipeline(tmp_path):
    tiny = make_tiny_vae(tmp_path / "taesd")
    pipe = load_pipeline(bundled("student"), tiny_vae=tiny)
    assert isinstance(pipe.vae, AutoencoderTiny)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # what the pipeline must hand over
    assert torch.allclose(pipe.decode(latents, "pt") * 2 - 1, expected.clamp(-1, 1), atol=1e-6)
    runner = CliRunner()
    plain = runner.invoke(main, ["generate", "a red circle", "--out", str(tmp_path / "plain")])
    fast = runner.invoke(main, ["generate", "a red circle", "--out", str(tmp_path / "fast"), "--tiny-vae", str(tiny)])
    assert plain.exit_code == fast.exit_code == 0, fast.output
    assert Image.open(tmp_path / "fast" / "000.png").size == (64, 64)
    assert (tmp_path / "fast" / "000.png").read_bytes() != (tmp_path / "plain" / "000.png").read_bytes()
    assert json.loads((tmp_path / "fast" / "generate.json").read_text())["tiny_vae"] == str(tiny)


def test_a_folder_that_is_no_tiny_vae_is_refused_in_one_line(tmp_path):
    r = CliRunner().invoke(main, ["generate", "a red circle", "--out", str(tmp_path / "o"), "--tiny-vae", str(bundled("teacher") / "vae")])
    assert r.exit_code == 2 and "not an AutoencoderTiny" in r.stderr and not (tmp_path / "o").exists()


def test_eval_decodes_with_the_tiny_vae_and_records_it(tmp_path):
    tiny = make_tiny_vae(tmp_path / "taesd")
    runner = CliRunner()
    args = ["eval", "--features", "toy", "--metrics", "alignment", "--num-prompts", "2", "--images-per-prompt", "1"]
    plain = runner.invoke(main, [*args, "--out", str(tmp_path / "plain")])
    fast = runner.invoke(main, [*args, "--out", str(tmp_path / "fast"), "--tiny-vae", str(tiny)])
    assert plain.exit_code == fast.exit_code == 0, fast.output
    images = sorted((tmp_path / "fast" / "images").glob("*.png"))
    assert len(images) == 2 and images[0].read_bytes() != (tmp_path / "plain" / "images" / images[0].name).read_bytes()
    bad = runner.invoke(main, [*args, "--out", str(tmp_path / "bad"), "--tiny-vae", str(tmp_path)])
    assert bad.exit_code == 2 and "tiny VAE" in bad.stderr and not (tmp_path / "bad").exists()


def test_serve_engine_decodes_with_the_tiny_vae(tmp_path):
    from loopfree.serve.engine import check_serve_models, load_engine
    from loopfree.utils.errors import LoopfreeError

    spec = check_serve_models(None, None, "cpu", "fp32", make_tiny_vae(tmp_path / "taesd"))
    engine = load_engine(spec)
    assert all(isinstance(m.pipe.vae, AutoencoderTiny) for m in engine.models.values())
    try:
        check_serve_models(None, None, "cpu", "fp32", tmp_path)
    except LoopfreeError as e:
        assert "tiny VAE" in str(e)
    else:
        raise AssertionError("a folder without config.json was taken as a tiny VAE")
