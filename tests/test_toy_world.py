"""The toy world generator, its captions and parser, and its word-level tokenizer."""

import math

import numpy as np
import pytest
import torch

from loopfree.utils.errors import LoopfreeError
from loopfree.toy import world
from loopfree.toy.tokenizer import build_tokenizer
from loopfree.toy.world import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    CAPTION_TEMPLATES,
    COLOUR_RGB,
    CY_RANGE,
    POSITION_RANGE,
    SIZE_RANGE,
    VOCABULARY,
    Attributes,
    ToyWorld,
    heldout_prompts,
    parse_prompt,
    rasterise,
    render,
    render_for_prompt,
)


@pytest.fixture(scope="module")
def batch():
    return ToyWorld(11).sample(2000)


def _in_range(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def test_sampling_is_deterministic_and_well_formed(batch):
    again = ToyWorld(11).sample(2000)
    assert np.array_equal(batch.images, again.images) and batch.captions == again.captions
    assert not np.array_equal(ToyWorld(12).sample(50).images, batch.images[:50])
    assert batch.images.shape == (2000, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.truth.shape == (2000, 3)
    x = batch.tensor()
    assert x.shape == (2000, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert np.array_equal(world.to_uint8(x), batch.images)


def test_every_class_appears_and_truth_lies_in_its_class_range(batch):
    for name, classes in ATTRIBUTES.items():
        assert {getattr(a, name) for a in batch.attrs} == set(classes)
    for a, (cx, cy, size) in zip(batch.attrs, batch.truth):
        assert _in_range(cx, POSITION_RANGE[a.position])
        assert _in_range(cy, CY_RANGE)
        assert _in_range(size, SIZE_RANGE[a.size])


def test_parse_prompt_recovers_every_generated_caption(batch):
    for caption, attrs in zip(batch.captions, batch.attrs):
        assert parse_prompt(caption) == attrs
    used = {t for t in CAPTION_TEMPLATES for c, a in zip(batch.captions, batch.attrs) if t.format(**a.as_dict()) == c}
    assert used == set(CAPTION_TEMPLATES)


@pytest.mark.parametrize(
    "text", ["a photo of a cat", "a red circle on a white background", "a small red blue circle, left, on white"]
)
def test_parse_prompt_rejects_incomplete_or_ambiguous_text(text):
    with pytest.raises(LoopfreeError):
        parse_prompt(text)


def test_attributes_validate_values():
    with pytest.raises(LoopfreeError):
        Attributes("hexagon", "red", "small", "left", "white")


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_rendered_shape_matches_its_geometry(shape):
    cx, cy, size = 31.3, 33.8, 30.0
    attrs = Attributes(shape, "red", "large", "centre", "black")
    image = rasterise([attrs], np.array([[cx, cy, size]]))[0].astype(np.float64)
    red, black = COLOUR_RGB["red"][0], BACKGROUND_RGB["black"][0]
    alpha = (image[..., 0] - black) / (red - black)
    area = {"circle": math.pi * (size / 2) ** 2, "square": size**2, "triangle": math.sqrt(3) / 4 * size**2}[shape]
    assert alpha.sum() == pytest.approx(area, rel=0.01)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    # The triangle's centroid sits a sixth of its height below its bounding-box centre.
    centroid_y = cy + (math.sqrt(3) / 2 * size / 6 if shape == "triangle" else 0.0)
    assert (alpha * xs).sum() / alpha.sum() == pytest.approx(cx, abs=0.05)
    assert (alpha * ys).sum() / alpha.sum() == pytest.approx(centroid_y, abs=0.05)
    assert tuple(image[round(cy + 2), round(cx)]) == COLOUR_RGB["red"]
    assert tuple(image[2, 2]) == BACKGROUND_RGB["black"]


def test_render_single_image_is_seeded():
    attrs = Attributes("square", "blue", "small", "right", "gray")
    image, truth = render(attrs, np.random.default_rng(5))
    again, truth_again = render(attrs, np.random.default_rng(5))
    assert image.shape == (64, 64, 3) and np.array_equal(image, again) and truth == truth_again
    assert _in_range(truth.cx, POSITION_RANGE["right"]) and _in_range(truth.size, SIZE_RANGE["small"])


def test_heldout_prompts_are_fixed_and_distinct():
    prompts = heldout_prompts(40, seed=3)
    assert prompts == heldout_prompts(40, seed=3)
    assert len({parse_prompt(p) for p in prompts}) == 40
    assert len(heldout_prompts(len(world.all_attributes()))) == 216
    with pytest.raises(LoopfreeError):
        heldout_prompts(217)


def test_training_prompts_leave_out_the_evaluation_combinations():
    held_out = heldout_prompts(30, seed=2)
    train = world.training_prompts(500, held_out, seed=1)
    assert train == world.training_prompts(500, held_out, seed=1) and len(train) == 500
    named = {parse_prompt(p) for p in train}
    assert not named & {parse_prompt(p) for p in held_out}
    assert len(named) > 150  # most of the other 186 combinations appear
    with pytest.raises(LoopfreeError, match="every attribute combination"):
        world.training_prompts(5, heldout_prompts(216))


def test_render_for_prompt_draws_varied_images_of_that_prompt():
    prompt = "large yellow triangle, right, gray background"
    sample = render_for_prompt(prompt, 16, seed=4)
    assert sample.captions == [prompt] * 16 and set(sample.attrs) == {parse_prompt(prompt)}
    assert np.array_equal(sample.images, render_for_prompt(prompt, 16, seed=4).images)
    assert sample.truth.std(axis=0).min() > 0.5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_every_world_word_is_one_token(tokenizer):
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in VOCABULARY + (",", ":")]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ids)
    unk = tokenizer.unk_token_id
    assert unk not in {i[0] for i in ids}


def test_captions_fit_without_truncation(tokenizer, batch):
    for caption in batch.captions[:300]:
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(caption.replace(",", " , ").replace(":", " : ").split()) + 2
        assert len(ids) <= tokenizer.model_max_length == 16


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path, batch):
    from transformers import CLIPTokenizer

    build_tokenizer(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # only the offline vocab.json / merges.txt remain
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    texts = batch.captions[:50] + ["a purple hexagon!", ""]
    for other in (loaded, from_files):
        assert other.model_max_length == 16 and len(other) == len(tokenizer)
        for text in texts:
            assert other(text).input_ids == tokenizer(text).input_ids


def test_out_of_vocabulary_text_still_tokenizes(tokenizer):
    out = tokenizer("a zebra of 7 colours", padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert out.input_ids.shape == (1, 16)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("zebra", add_special_tokens=False).input_ids)
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>"
    assert tokenizer.decode(tokenizer("a zebra").input_ids, skip_special_tokens=True) == "a zebra"


def test_tokenizer_loads_as_a_diffusers_pipeline_component(tokenizer, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    prompt = "a small red circle in the left of a white image"
    embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    assert embeds.shape == (1, 16, 16)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids[: len(tokenizer(prompt).input_ids)] == tokenizer(prompt).input_ids
