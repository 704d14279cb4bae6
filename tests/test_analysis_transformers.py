"""``loopfree analyze features`` on a transformer: per block, the adjacent-step similarity of its image tokens over
the diffusers pipeline's own sampling loop, checked against a brute-force recomputation; the command's files."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from loopfree.analysis.capture import cosine_rows
from loopfree.analysis.common import analysis_latents
from loopfree.analysis.features import similarity_rows
from loopfree.analysis.settings import AnalysisSetup
from loopfree.cli import main
from loopfree.demo.teacher import save_teacher
from loopfree.demo.teacher_mmdit import build_pipeline
from loopfree.pipelines.loading import load_pipeline
from loopfree.toy.assets import bundled
from loopfree.toy.settings import MMDiTTeacherConfig
from loopfree.toy.tokenizer import build_tokenizer

LAYERS = 3


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """An untrained toy-sized SD3 folder (two CLIPs, no T5) on the toy tokenizer and the bundled VAE."""
    torch.manual_seed(0)
    cfg = MMDiTTeacherConfig(text_width=16, text_layers=2, text_heads=2, text_projection=8, layers=LAYERS, heads=2, head_dim=8)
    pipe = build_pipeline(cfg, AutoencoderKL.from_pretrained(bundled("teacher") / "vae"), build_tokenizer())
    pipe.vae.register_to_config(shift_factor=0.1)
    save_teacher(folder := tmp_path_factory.mktemp("sd3") / "pipeline", pipe)
    return folder


def test_block_similarity_equals_brute_force_over_the_sd3_loop(sd3_dir):
    setup = AnalysisSetup(num_prompts=2, images_per_prompt=1, guidance=2.0, batch_size=1)
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    pipe = load_pipeline(sd3_dir)
    pipe.shared_blocks = 1
    n1, n3 = similarity_rows(pipe, [1, 3], setup, prompts)
    assert n1["block_similarity"] is None and n3["shared_blocks"] == 1 and len(n3["block_similarity"]) == LAYERS

    plain = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    calls: list[list[torch.Tensor]] = []  # per transformer call, each block's image tokens

    def record(module, args, out):
        if module is plain.transformer.transformer_blocks[0]:
            calls.append([])
        calls[-1].append(out[1])

    hooks = [b.register_forward_hook(record) for b in plain.transformer.transformer_blocks]
    x_T = analysis_latents(pipe, 2, setup)
    sims = []
    for p, prompt in enumerate(prompts):
        calls.clear()
        plain(prompt, num_inference_steps=3, guidance_scale=2.0, latents=x_T[p : p + 1], output_type="latent")
        sims.append([[cosine_rows(a, b).mean().item() for a, b in zip(calls[k], calls[k - 1])] for k in (1, 2)])
    for h in hooks:
        h.remove()
    assert n3["block_similarity"] == pytest.approx(np.mean(sims, axis=(0, 1)).tolist(), rel=1e-4)
    assert n3["encoder_similarity"] == pytest.approx(np.mean(np.array(sims)[..., :1]), rel=1e-4)
    assert n3["decoder_similarity"] == pytest.approx(np.mean(np.array(sims)[..., 1:]), rel=1e-4)


def test_analyze_features_on_a_transformer_writes_its_figure_and_rows(sd3_dir, tmp_path):
    out = tmp_path / "f"
    r = CliRunner().invoke(main, ["analyze", "features", "--model", str(sd3_dir), "--steps", "1,2", "--num-prompts", "3",
                                  "--images-per-prompt", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["features.json", "features.png"]
    rows = json.loads((out / "features.json").read_text())["rows"]
    assert [row["steps"] for row in rows] == [1, 2] and rows[0]["block_similarity"] is None
    assert len(rows[1]["block_similarity"]) == LAYERS and rows[1]["shared_blocks"] == LAYERS // 2
    assert 0 <= rows[1]["quality"]["alignment"] <= 1  # a toy-world model: scored by the toy world
