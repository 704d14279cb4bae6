"""Distribution metrics of one generated feature set against a reference set: the numbers of Tables 1-3.

    distribution_scores(real, fake, ("fid", "kid", "pr", "dc"))
    → {"fd", "kid", "kid_std", "kid_subset_size", "precision", "recall", "f1", "density", "coverage"}
"""

from __future__ import annotations

import numpy as np
import torch

from loopfree.evaluation.settings import KID_SUBSET_SIZE, KID_SUBSETS, PRDC_K
from loopfree.evaluation.metrics import frechet_distance, kernel_distance, prdc


def distribution_scores(real: np.ndarray, fake: np.ndarray, metrics: tuple[str, ...], k: int = PRDC_K, seed: int = 0,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """FD ("fid"), KID ("kid": subsets of min(1000, both set sizes) points), precision/recall/F1 ("pr") and
    density/coverage ("dc", k nearest neighbours) of ``fake`` features against ``real`` ones."""
    scores: dict[str, float] = {}
    if "fid" in metrics:
        scores["fd"] = frechet_distance(real, fake)
    if "kid" in metrics:
        size = min(KID_SUBSET_SIZE, len(real), len(fake))
        scores["kid"], scores["kid_std"] = kernel_distance(real, fake, KID_SUBSETS, size, seed)
        scores["kid_subset_size"] = size
    if "pr" in metrics or "dc" in metrics:
        found = prdc(real, fake, k=k, device=device)
        keys = (("precision", "recall", "f1") if "pr" in metrics else ()) + (("density", "coverage") if "dc" in metrics else ())
        scores.update({key: found[key] for key in keys})
    return scores
