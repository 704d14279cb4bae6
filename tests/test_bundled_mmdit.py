"""The bundled toy MMDiT teacher (``loopfree toy train-teacher --arch mmdit``) and its TiUE student: plain SD3 folders
within the size budget that draw what their prompts name (its documented evaluation: docs/evals/teacher-mmdit.json, checked by
test_docs_tables)."""

import torch
from diffusers import StableDiffusion3Pipeline

from loopfree.toy.assets import bundled
from loopfree.toy.classifier import load_classifier, matches
from loopfree.toy.world import heldout_prompts, parse_prompt


def test_the_bundled_mmdit_teacher_is_a_plain_sd3_folder_of_at_most_25_mb():
    folder = bundled("teacher-mmdit")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}
    assert sum(p.stat().st_size for p in files) / 1e6 <= 25
    plain = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert plain.vae.config.shift_factor is not None and plain.transformer.config.num_layers == 8


def test_it_draws_what_held_out_prompts_name_through_plain_diffusers():
    plain = StableDiffusion3Pipeline.from_pretrained(bundled("teacher-mmdit"), text_encoder_3=None, tokenizer_3=None)
    plain.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(4, seed=5)
    images = plain(prompts, num_inference_steps=20, guidance_scale=4.5, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images * 2 - 1
    hits = matches(load_classifier().predict(images), [parse_prompt(p) for p in prompts])
    assert sum(h.mean() for h in hits.values()) / len(hits) >= 0.9  # most attributes of 4 unseen prompts right


def test_the_bundled_mmdit_student_is_a_plain_sd3_folder_that_generate_names(tmp_path):
    """The TiUE-MMDiT student (studies/mmdit.yaml, docs/toy-world.md): plain diffusers loads it, loopfree samples it
    in one pass with its recorded σ's and shared blocks, and ``generate --model student-mmdit`` names it."""
    from click.testing import CliRunner

    from loopfree.cli import main
    from loopfree.pipelines.loading import load_pipeline
    from loopfree.pipelines.pipeline_sd3 import LoopFreeSD3Pipeline

    folder = bundled("student-mmdit")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"} and sum(p.stat().st_size for p in files) / 1e6 <= 25
    assert StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None).transformer.config.num_layers == 8
    pipe = load_pipeline(folder)
    assert isinstance(pipe, LoopFreeSD3Pipeline) and len(pipe.decoder_sigmas) == 4 and pipe.shared_blocks is not None
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(4, seed=5)
    images = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    hits = matches(load_classifier().predict(images), [parse_prompt(p) for p in prompts])
    assert sum(h.mean() for h in hits.values()) / len(hits) >= 0.9  # one pass, no guidance: what 4 unseen prompts name
    r = CliRunner().invoke(main, ["generate", "a red circle", "--model", "student-mmdit", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g" / "000.png").is_file()
