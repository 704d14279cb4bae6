"""Scores for generated toy-world images, measured against the world's ground truth (the toy backend of
``loopfree eval --features toy``, and what ``loopfree demo`` and the teacher trainer report).

- alignment: fraction of images whose predicted attributes all equal those their prompt names,
  plus per-attribute accuracy (``accuracy_<attribute>``);
- fd, precision/recall/F1, density/coverage: in the classifier's feature space, against real images of
  the same prompts, same count per prompt (:func:`loopfree.evaluation.scores.distribution_scores`);
- diversity: per prompt, the standard deviation over its images of the predicted cx, cy and
  size (pixels), averaged over prompts (``diversity_cx`` etc., and their mean ``diversity``);
  the same figures for the real images, read the same way, as ``diversity_real*``.
"""

from __future__ import annotations

import numpy as np
import torch

from loopfree.utils.errors import LoopfreeError
from loopfree.evaluation.features import file_sha256
from loopfree.evaluation.scores import distribution_scores
from loopfree.toy.classifier import Prediction, ToyClassifier, default_path, load_classifier, matches
from loopfree.toy.world import ATTRIBUTES, IMAGE_SIZE, TRUTH_FIELDS, parse_prompt, render_for_prompt, shown, to_tensor


def real_reference(prompts: list[str], seed: int = 0, domain: str = "base") -> torch.Tensor:
    """Real images of ``domain`` in [-1, 1] aligned with ``prompts`` (image i shows prompt i); each distinct
    prompt draws its jitter from its own seed, derived from ``seed``."""
    unique = list(dict.fromkeys(prompts))
    seeds = np.random.SeedSequence(seed).generate_state(len(unique))
    reference = torch.empty(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)
    for prompt, prompt_seed in zip(unique, seeds):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        reference[rows] = render_for_prompt(prompt, len(rows), int(prompt_seed), domain).tensor()
    return reference


class ToyExtractor:
    """The attribute classifier as a feature extractor: features, predicted labels and (cx, cy, size) per image."""

    kind = "toy"
    resolution = IMAGE_SIZE

    def __init__(self, classifier: ToyClassifier | None = None):
        self.classifier = classifier if classifier is not None else load_classifier()
        self.sha256 = file_sha256(default_path() / "model.safetensors") if classifier is None else "in-memory"

    def outputs(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-image outputs of float images (N, 3, 64, 64) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise LoopfreeError(f"images must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        prediction = self.classifier.predict(images)
        return {"features": self.classifier.embed(images), "truth": prediction.truth,
                **{f"label_{name}": labels for name, labels in prediction.labels.items()}}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.outputs(to_tensor(images))


def _prediction(outputs: dict[str, np.ndarray]) -> Prediction:
    return Prediction({name: outputs[f"label_{name}"] for name in ATTRIBUTES}, outputs["truth"])


def _diversity(prediction: Prediction, prompts: list[str], prefix: str) -> dict[str, float]:
    """Mean over prompts with >= 2 images of the per-prompt std (ddof=1) of predicted cx, cy, size."""
    prompt_of = np.array(prompts)
    groups = [np.flatnonzero(prompt_of == p) for p in dict.fromkeys(prompts)]
    spreads = [prediction.truth[rows].std(axis=0, ddof=1) for rows in groups if rows.size >= 2]
    per_field = np.mean(spreads, axis=0) if spreads else np.full(len(TRUTH_FIELDS), np.nan)
    scores = {prefix: float(per_field.mean())}
    scores.update({f"{prefix}_{field}": float(v) for field, v in zip(TRUTH_FIELDS, per_field)})
    return scores


def toy_scores(outputs: dict[str, np.ndarray], prompts: list[str], real_outputs: dict[str, np.ndarray] | None = None,
               domain: str = "base") -> dict[str, float]:
    """Alignment, per-attribute accuracy and diversity of images (``outputs`` of :class:`ToyExtractor`, image i
    generated for ``prompts[i]``); the real images' diversity too if ``real_outputs`` are aligned with ``prompts``.
    In a shifted ``domain`` the attributes are those its images show for the prompt, and ``style`` is the fraction of
    the images the shift changes (night: prompts naming a white or gray background) that show the change."""
    if len(prompts) != len(outputs["features"]):
        raise LoopfreeError(f"{len(outputs['features'])} images but {len(prompts)} prompts")
    parsed = {p: parse_prompt(p) for p in dict.fromkeys(prompts)}
    expected = {p: shown(a, domain) for p, a in parsed.items()}
    prediction = _prediction(outputs)
    hits = matches(prediction, [expected[p] for p in prompts])
    scores = {"alignment": float(np.all(list(hits.values()), axis=0).mean())}
    if domain != "base":  # per changed image: does it show every attribute the domain changed?
        moved = [[n for n in ATTRIBUTES if getattr(expected[p], n) != getattr(parsed[p], n)] for p in prompts]
        shows = [all(hits[n][i] for n in names) for i, names in enumerate(moved) if names]
        scores["style"] = float(np.mean(shows)) if shows else float("nan")
    scores.update({f"accuracy_{name}": float(h.mean()) for name, h in hits.items()})
    scores.update(_diversity(prediction, prompts, "diversity"))
    if real_outputs is not None:
        scores.update(_diversity(_prediction(real_outputs), prompts, "diversity_real"))
    scores["n_images"] = float(len(prompts))
    scores["n_prompts"] = float(len(parsed))
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
    extractor = ToyExtractor(classifier)
    fake = extractor.outputs(images)
    if len(prompts) != images.shape[0]:
        raise LoopfreeError(f"{images.shape[0]} images but {len(prompts)} prompts")
    for p in dict.fromkeys(prompts):
        parse_prompt(p)
    reference = reference if reference is not None else real_reference(prompts, seed)
    if reference.shape != images.shape:
        raise LoopfreeError(f"reference shape {tuple(reference.shape)} differs from the images' {tuple(images.shape)}")
    real = extractor.outputs(reference)
    return {**toy_scores(fake, prompts, real), **distribution_scores(real["features"], fake["features"], ("fid", "pr", "dc"), k=k)}
