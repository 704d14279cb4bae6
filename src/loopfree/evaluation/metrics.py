"""Feature-space distribution metrics: Fréchet distance, kernel distance (KID), precision/recall/density/coverage.

All take features from any extractor (numpy arrays or torch tensors, shape (N, D)), compute in float64 and
return plain floats.

- FD is torchmetrics' FID formula ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the
  trace of the square root taken as ``sum sqrt(eig(F^T S1 F))`` for any factor ``S2 = F F^T``: the centred
  features themselves when a set has fewer points than dimensions (exact, and cheap for small sets), else
  the symmetric square root of ``S2``.
- KID is torchmetrics' ``KernelInceptionDistance``: the unbiased MMD² with the kernel ``(x·y / D + 1)^3``,
  mean and (population) standard deviation over random subsets drawn by ``torch.randperm``.
- PRDC follows Naeem et al. 2020 and the ``prdc`` package: each point's k-NN radius excludes the point
  itself, "inside a ball" is a strict inequality. Distances are computed in row chunks, so two sets of
  30,000 Inception features never hold a 30,000 × 30,000 matrix (peak memory: the features plus
  ``chunk × N`` distances).
"""

from __future__ import annotations

import numpy as np
import torch

from loopfree.utils.errors import LoopfreeError

ArrayLike = np.ndarray | torch.Tensor
PRDC_CHUNK = 1024  # rows of the distance matrix computed at once (1024 × 40,000 float64: 330 MB)


def _as_float64(feats: ArrayLike, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    tensor = feats if isinstance(feats, torch.Tensor) else torch.from_numpy(np.asarray(feats))
    tensor = tensor.detach().to(device, torch.float64)
    if tensor.ndim != 2:
        raise LoopfreeError(f"{name} must be a 2-D (N, D) feature array, got shape {tuple(tensor.shape)}")
    return tensor


def _same_dimension(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise LoopfreeError(f"the two feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")


def _symmetric_sqrt(s: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(s)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _trace_sqrt_product(s1: torch.Tensor, factor: torch.Tensor) -> float:
    """tr((S1 S2)^(1/2)) for ``S2 = factor @ factor.T``: the eigenvalues of S1 S2 are those of factorᵀ S1 factor."""
    inner = factor.T @ s1 @ factor
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum())


def frechet_distance_from_stats(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) of two Gaussians."""
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    s1, s2 = (s.reshape(1, 1) if s.ndim < 2 else s for s in (s1, s2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.numel(), m1.numel()):
        raise LoopfreeError(f"mismatched statistics: means {tuple(m1.shape)}/{tuple(m2.shape)}, covariances {tuple(s1.shape)}/{tuple(s2.shape)}")
    return _fd(m1 - m2, s1, s2, _symmetric_sqrt(s2))


def _fd(diff: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, factor: torch.Tensor) -> float:
    return float(diff @ diff + s1.trace() + s2.trace()) - 2.0 * _trace_sqrt_product(s1, factor)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (unbiased covariances)."""
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    _same_dimension(a, b)
    if min(len(a), len(b)) < 2:
        raise LoopfreeError(f"need at least 2 feature vectors per set for a covariance, got {len(a)} and {len(b)}")
    if len(a) < len(b):  # factor the smaller set's covariance (FD is symmetric)
        a, b = b, a
    s1 = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    centred = (b - b.mean(0)) / (len(b) - 1) ** 0.5
    s2 = centred.T @ centred
    factor = centred.T if len(b) <= b.shape[1] else _symmetric_sqrt(s2)
    return _fd(a.mean(0) - b.mean(0), s1, s2, factor)


def kernel_distance(real: ArrayLike, fake: ArrayLike, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation over ``subsets`` random subsets of ``subset_size`` points per set
    (each subset: a permutation of the real set, then one of the fake set, from a generator seeded ``seed``)."""
    r, f = _as_float64(real, "real"), _as_float64(fake, "fake")
    _same_dimension(r, f)
    if not 2 <= subset_size <= min(len(r), len(f)):
        raise LoopfreeError(f"KID subset size {subset_size} must be in 2..{min(len(r), len(f))} (the smaller set)")
    generator = torch.Generator().manual_seed(seed)
    m, scores = subset_size, []
    for _ in range(subsets):
        x = r[torch.randperm(len(r), generator=generator)[:m]]
        y = f[torch.randperm(len(f), generator=generator)[:m]]
        k_xx, k_yy, k_xy = ((p @ q.T / r.shape[1] + 1.0) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        scores.append(float(within - 2.0 * k_xy.sum() / m**2))
    return float(np.mean(scores)), float(np.std(scores))


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def _knn_radii(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the k+1-th smallest counts the point itself)."""
    return torch.cat([_distances(rows, feats).kthvalue(k + 1, dim=1).values for rows in feats.split(chunk)])


def prdc(real: ArrayLike, fake: ArrayLike, k: int = 5, chunk: int = PRDC_CHUNK,
         device: torch.device | str = "cpu") -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of ``fake`` against ``real``, distances
    computed ``chunk`` rows at a time on ``device``; also ``f1`` = 2PR / (P + R)."""
    r, f = _as_float64(real, "real", device), _as_float64(fake, "fake", device)
    _same_dimension(r, f)
    if k < 1 or min(len(r), len(f)) <= k:
        raise LoopfreeError(f"PRDC needs k >= 1 and more than k={k} points per set, got {len(r)} real, {len(f)} fake")
    real_radii, fake_radii = _knn_radii(r, k, chunk), _knn_radii(f, k, chunk)
    in_real_balls = torch.empty(len(f), dtype=torch.long, device=device)  # per fake point: real balls holding it
    recalled = torch.zeros(len(r), dtype=torch.bool, device=device)  # per real point: inside some fake ball
    nearest_fake = torch.full((len(r),), float("inf"), dtype=torch.float64, device=device)
    start = 0
    for rows in f.split(chunk):
        d = _distances(rows, r)  # (chunk of fake, real)
        in_real_balls[start : start + len(rows)] = (d < real_radii[None, :]).sum(dim=1)
        recalled |= (d < fake_radii[start : start + len(rows), None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
        start += len(rows)
    precision, recall = float((in_real_balls > 0).double().mean()), float(recalled.double().mean())
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1_score(precision, recall),
        "density": float(in_real_balls.double().mean() / k),
        "coverage": float((nearest_fake < real_radii).double().mean()),
    }


def f1_score(precision: float, recall: float) -> float:
    """2PR / (P + R); 0 when both are 0."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
