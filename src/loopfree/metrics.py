"""Feature-space distribution metrics: Fréchet distance and precision/recall/density/coverage.

Both work on features from any extractor (numpy arrays or torch tensors, shape (N, D)) and
return plain floats. PRDC follows Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics
for Generative Models": each point's k-NN radius excludes the point itself, and "inside a
ball" is a strict inequality.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

from loopfree.errors import LoopfreeError

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(feats: ArrayLike, name: str) -> np.ndarray:
    array = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    array = array.astype(np.float64)
    if array.ndim != 2:
        raise LoopfreeError(f"{name} must be a 2-D (N, D) feature array, got shape {array.shape}")
    return array


def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, N >= 2."""
    array = _as_float64(feats, "feats")
    if array.shape[0] < 2:
        raise LoopfreeError(f"need at least 2 feature vectors for a covariance, got {array.shape[0]}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _sqrtm_product(s1: np.ndarray, s2: np.ndarray, eps: float) -> np.ndarray:
    """sqrtm(s1 @ s2); when that is singular or not finite, sqrtm of the product with ``eps`` on both diagonals."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            covmean = scipy.linalg.sqrtm(s1 @ s2)
            if np.isfinite(covmean).all():
                return covmean
        except scipy.linalg.LinAlgWarning:
            pass
    offset = np.eye(s1.shape[0]) * eps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Singular covariances get ``eps`` added to both diagonals (see :func:`_sqrtm_product`);
    imaginary parts left by rounding are dropped, large ones are an error.
    """
    m1, m2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.size, m1.size):
        raise LoopfreeError(f"mismatched statistics: means {m1.shape}/{m2.shape}, covariances {s1.shape}/{s2.shape}")
    covmean = _sqrtm_product(s1, s2, eps)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise LoopfreeError(f"Fréchet distance: sqrtm has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances (no matmul shortcut, so ties and near-ties are not rounded away)."""
    return torch.cdist(
        torch.from_numpy(a), torch.from_numpy(b), compute_mode="donot_use_mm_for_euclid_dist"
    ).numpy()


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point."""
    distances = _pairwise(feats, feats)
    # Column 0 of the sorted rows is the point itself (distance 0).
    return np.partition(distances, k, axis=1)[:, k]


def prdc(real: ArrayLike, fake: ArrayLike, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of ``fake`` against ``real``."""
    r, f = _as_float64(real, "real"), _as_float64(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise LoopfreeError(f"real and fake features differ in dimension: {r.shape[1]} vs {f.shape[1]}")
    if k < 1 or min(len(r), len(f)) <= k:
        raise LoopfreeError(f"PRDC needs k >= 1 and more than k={k} points per set, got {len(r)} real, {len(f)} fake")
    real_radii = _knn_radii(r, k)
    fake_radii = _knn_radii(f, k)
    cross = _pairwise(r, f)  # (N_real, N_fake)
    in_real_ball = cross < real_radii[:, None]
    return {
        "precision": float(in_real_ball.any(axis=0).mean()),
        "recall": float((cross < fake_radii[None, :]).any(axis=1).mean()),
        "density": float(in_real_ball.sum(axis=0).mean() / k),
        "coverage": float((cross.min(axis=1) < real_radii).mean()),
    }
