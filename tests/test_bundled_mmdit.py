"""The bundled toy MMDiT teacher (``loopfree toy train-teacher --arch mmdit``): a plain SD3 folder within the size
budget that draws what its prompts name (its documented evaluation: docs/evals/teacher-mmdit.json, checked by
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
