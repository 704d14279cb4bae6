"""The shipped metric classifier and the toy-world evaluation built on it."""

import random

import numpy as np
import pytest
import torch

from loopfree.utils.errors import LoopfreeError
from loopfree.toy.classifier import (
    ToyClassifier,
    accuracy,
    augment,
    default_path,
    load_classifier,
    save_classifier,
    train_classifier,
)
from loopfree.evaluation.toy import evaluate_images, real_reference
from loopfree.toy.world import ToyWorld, heldout_prompts


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def fresh():
    return ToyWorld(2024).sample(500)  # training used seed 0


def test_shipped_classifier_is_small_safetensors_only():
    files = sorted(p.name for p in default_path().iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert (default_path() / "model.safetensors").stat().st_size < 2_000_000


def test_shipped_classifier_reads_fresh_samples(classifier, fresh):
    prediction = classifier.predict(fresh.tensor())
    assert min(accuracy(prediction, fresh.attrs).values()) >= 0.95
    rmse = np.sqrt(((prediction.truth - fresh.truth) ** 2).mean(axis=0))
    assert rmse.max() < 1.5  # pixels, for cx, cy and size


def test_shipped_classifier_tolerates_mild_corruption(classifier, fresh):
    corrupted = augment(fresh.tensor(), torch.Generator().manual_seed(0))
    assert min(accuracy(classifier.predict(corrupted), fresh.attrs).values()) >= 0.95


def test_features_are_batched_consistently(classifier, fresh):
    x = fresh.tensor()[:40]
    feats = classifier.embed(x, batch_size=16)
    assert feats.shape == (40, 64)
    with torch.no_grad():
        np.testing.assert_allclose(feats, classifier.features(x).double().numpy(), rtol=1e-5, atol=1e-4)  # fp32 roundoff of features up to ~40
    with pytest.raises(LoopfreeError):
        classifier.features(torch.zeros(2, 3, 32, 32))


def test_save_load_round_trip_and_missing_folder(tmp_path):
    model = ToyClassifier().eval()
    save_classifier(model, tmp_path, training={})
    loaded = load_classifier(tmp_path)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    assert torch.equal(model.features(x), loaded.features(x))
    with pytest.raises(LoopfreeError):
        load_classifier(tmp_path / "absent")


def test_training_runs_and_saves(tmp_path):
    train_classifier(steps=2, seed=1, out_dir=tmp_path, batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert load_classifier(tmp_path).config["feature_dim"] == 64


@pytest.fixture(scope="module")
def heldout():
    prompts = [p for p in heldout_prompts(24, seed=1) for _ in range(6)]
    return prompts, real_reference(prompts, seed=99)


def test_real_images_of_their_prompts_score_well(classifier, heldout):
    prompts, images = heldout
    scores = evaluate_images(images, prompts, classifier)
    assert scores["alignment"] >= 0.95
    assert scores["precision"] >= 0.8 and scores["recall"] >= 0.8
    # "Small": far below the distance to the same images corrupted by strong noise.
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert scores["fd"] < 0.1 * evaluate_images(noisy, prompts, classifier)["fd"]
    # Diversity: real jitter, read the same way on both sides.
    assert scores["diversity"] == pytest.approx(scores["diversity_real"], rel=0.3)
    assert scores["diversity"] > 1.0


def test_mismatched_prompts_and_collapsed_samples_score_badly(classifier, heldout):
    prompts, images = heldout
    shuffled = prompts[:]
    random.Random(0).shuffle(shuffled)
    assert evaluate_images(images, shuffled, classifier)["alignment"] < 0.3
    collapsed = images[::6].repeat_interleave(6, dim=0)  # one image per prompt, repeated
    scores = evaluate_images(collapsed, prompts, classifier)
    assert scores["alignment"] >= 0.95 and scores["diversity"] == 0.0 and scores["recall"] < 0.5


def test_evaluate_rejects_bad_input(classifier, heldout):
    prompts, images = heldout
    with pytest.raises(LoopfreeError):
        evaluate_images(images[:10], prompts, classifier)
    with pytest.raises(LoopfreeError):
        evaluate_images(images[:2], ["a photo of a cat"] * 2, classifier)


def test_reference_is_aligned_and_seeded(heldout):
    prompts, images = heldout
    again = real_reference(prompts, seed=99)
    assert torch.equal(images, again)
    assert not torch.equal(images, real_reference(prompts, seed=100))
