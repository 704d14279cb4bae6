"""Scores for generated toy-world images, measured against the world's ground truth.

- alignment: fraction of images whose predicted attributes all equal those their prompt names,
  plus per-attribute accuracy (``accuracy_<attribute>``);
- fd and precision/recall/density/coverage: in the classifier's feature space, against real
  images of the same prompts, same count per prompt;
- diversity: per prompt, the standard deviation over its images of the predicted cx, cy and
  size (pixels), averaged over prompts (``diversity_cx`` etc., and their mean ``diversity``);
  the same figures for the real images, read the same way, as ``diversity_real*``.
"""

from __future__ import annotations

import numpy as np
import torch

from loopfree.errors import LoopfreeError
from loopfree.metrics import frechet_distance, prdc
from loopfree.toy.classifier import Prediction, ToyClassifier, load_classifier, matches
from loopfree.toy.world import IMAGE_SIZE, TRUTH_FIELDS, parse_prompt, render_for_prompt


def real_reference(prompts: list[str], seed: int = 0) -> torch.Tensor:
    """Real images in [-1, 1] aligned with ``prompts`` (image i shows prompt i); each distinct
    prompt draws its jitter from its own seed, derived from ``seed``."""
    unique = list(dict.fromkeys(prompts))
    seeds = np.random.SeedSequence(seed).generate_state(len(unique))
    reference = torch.empty(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)
    for prompt, prompt_seed in zip(unique, seeds):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        reference[rows] = render_for_prompt(prompt, len(rows), int(prompt_seed)).tensor()
    return reference


def _diversity(prediction: Prediction, prompts: list[str], prefix: str) -> dict[str, float]:
    """Mean over prompts with >= 2 images of the per-prompt std (ddof=1) of predicted cx, cy, size."""
    prompt_of = np.array(prompts)
    groups = [np.flatnonzero(prompt_of == p) for p in dict.fromkeys(prompts)]
    spreads = [prediction.truth[rows].std(axis=0, ddof=1) for rows in groups if rows.size >= 2]
    per_field = np.mean(spreads, axis=0) if spreads else np.full(len(TRUTH_FIELDS), np.nan)
    scores = {prefix: float(per_field.mean())}
    scores.update({f"{prefix}_{field}": float(v) for field, v in zip(TRUTH_FIELDS, per_field)})
    return scores


def evaluate_images(
    images: torch.Tensor,
    prompts: list[str],
    classifier: ToyClassifier | None = None,
    reference: torch.Tensor | None = None,
    k: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Score generated ``images`` (N, 3, 64, 64) in [-1, 1], image i generated for ``prompts[i]``.

    ``classifier`` defaults to the shipped one. ``reference`` are real images aligned with
    ``prompts``; by default they are rendered by :func:`real_reference` with ``seed``. ``k`` is
    the PRDC neighbourhood size. Diversity is NaN when no prompt has two images.
    """
    if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise LoopfreeError(f"images must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise LoopfreeError(f"{images.shape[0]} images but {len(prompts)} prompts")
    parsed = {p: parse_prompt(p) for p in dict.fromkeys(prompts)}
    classifier = classifier if classifier is not None else load_classifier()
    reference = reference if reference is not None else real_reference(prompts, seed)
    if reference.shape != images.shape:
        raise LoopfreeError(f"reference shape {tuple(reference.shape)} differs from the images' {tuple(images.shape)}")

    prediction = classifier.predict(images)
    hits = matches(prediction, [parsed[p] for p in prompts])
    scores = {"alignment": float(np.all(list(hits.values()), axis=0).mean())}
    scores.update({f"accuracy_{name}": float(h.mean()) for name, h in hits.items()})
    real_feats, fake_feats = classifier.embed(reference), classifier.embed(images)
    scores["fd"] = frechet_distance(real_feats, fake_feats)
    scores.update(prdc(real_feats, fake_feats, k=k))
    scores.update(_diversity(prediction, prompts, "diversity"))
    scores.update(_diversity(classifier.predict(reference), prompts, "diversity_real"))
    scores["n_images"] = float(len(prompts))
    scores["n_prompts"] = float(len(parsed))
    return scores
