"""Fréchet distance against closed forms and torchmetrics' FID, KID against torchmetrics, PRDC (chunked) against a
brute-force reading of Naeem et al. 2020."""

import math

import numpy as np
import pytest
import torch

from loopfree.utils.errors import LoopfreeError
from loopfree.evaluation.metrics import f1_score, frechet_distance, frechet_distance_from_stats, kernel_distance, prdc


def test_fd_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(0)
    n = 20_000
    a = rng.normal(size=(n, 3)) * np.sqrt([1.0, 4.0, 9.0])
    b = rng.normal(size=(n, 3)) * np.sqrt([4.0, 4.0, 1.0]) + [1.0, 2.0, 3.0]
    # ||mu||^2 = 1 + 4 + 9; traces 14 + 9; sqrt(S1 S2) = diag(2, 4, 3).
    closed_form = 14.0 + 14.0 + 9.0 - 2.0 * (2.0 + 4.0 + 3.0)
    assert frechet_distance(a, b) == pytest.approx(closed_form, abs=0.3)


def test_fd_from_stats_is_exact_for_commuting_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    d1, d2 = rng.uniform(0.5, 3.0, size=5), rng.uniform(0.5, 3.0, size=5)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)
    diag = frechet_distance_from_stats(np.zeros(3), np.diag([1.0, 4, 9]), np.array([1.0, 2, 3]), np.diag([4.0, 4, 1]))
    assert diag == pytest.approx(19.0, abs=1e-6)


def test_fd_of_identical_sets_is_zero_and_inputs_may_be_tensors():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) + 0.5
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(
        frechet_distance(x, y), rel=1e-5
    )
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-8)


def test_fd_survives_singular_covariances():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 32)), rng.normal(size=(20, 32))  # N < D: rank-deficient
    assert abs(frechet_distance(x, x)) < 1e-3
    assert math.isfinite(frechet_distance(x, y)) and frechet_distance(x, y) > 1.0


def _brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])
        return out

    r_rad, f_rad = radii(real), radii(fake)
    inside = [[math.dist(r, f) < r_rad[i] for f in fake] for i, r in enumerate(real)]
    inside_fake = [[math.dist(r, f) < f_rad[j] for j, f in enumerate(fake)] for r in real]
    m, n = len(fake), len(real)
    precision = sum(any(inside[i][j] for i in range(n)) for j in range(m)) / m
    recall = sum(any(row) for row in inside_fake) / n
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "density": sum(inside[i][j] for i in range(n) for j in range(m)) / (k * m),
        "coverage": sum(min(math.dist(r, f) for f in fake) < r_rad[i] for i, r in enumerate(real)) / n,
    }


@pytest.mark.parametrize("k, chunk", [(1, 2048), (3, 7), (5, 1), (5, 16)])
def test_prdc_chunked_matches_brute_force(k, chunk):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 4))
    fake = rng.normal(size=(33, 4)) * 1.3 + 0.4
    got = prdc(real, fake, k=k, chunk=chunk)
    want = _brute_force_prdc(real, fake, k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got == prdc(real, fake, k=k, chunk=len(real) + len(fake))  # one chunk: the whole matrix at once


def test_prdc_hand_cases():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 6))
    same = prdc(x, x.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(x, x + 1000.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "density": 0.0, "coverage": 0.0}
    assert f1_score(0.5, 1.0) == pytest.approx(2 / 3)


def test_prdc_rejects_too_few_points():
    x = np.zeros((5, 2))
    with pytest.raises(LoopfreeError):
        prdc(x, x, k=5)
    with pytest.raises(LoopfreeError):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)))


class _Identity(torch.nn.Module):
    """A torchmetrics feature extractor whose "images" are already features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


@pytest.mark.parametrize("n_real, n_fake", [(300, 250), (40, 300), (300, 20)])
def test_fd_equals_torchmetrics_fid(n_real, n_fake):
    """Both the full and the low-rank (fewer points than dimensions) paths, against torchmetrics' formula."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(n_real + n_fake)
    dim = 64
    real = rng.normal(size=(n_real, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    fake = rng.normal(size=(n_fake, dim)) * 1.2 + 0.3
    fid = FrechetInceptionDistance(feature=_Identity(dim))
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    want = float(fid.compute())
    assert frechet_distance(real, fake) == pytest.approx(want, rel=1e-7)
    assert frechet_distance(fake, real) == pytest.approx(want, rel=1e-7)
    if min(n_real, n_fake) < dim:  # the low-rank path equals the plain one
        cov = lambda x: np.cov(x, rowvar=False)
        assert frechet_distance_from_stats(real.mean(0), cov(real), fake.mean(0), cov(fake)) == pytest.approx(want, rel=1e-7)


def test_kid_equals_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(60, 16)), rng.normal(size=(50, 16)) * 1.1 + 0.2
    kid = KernelInceptionDistance(feature=_Identity(16), subsets=7, subset_size=30)
    kid.update(torch.from_numpy(real), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(123)  # torchmetrics draws its subsets from the global generator
    mean, std = kid.compute()
    got = kernel_distance(real, fake, subsets=7, subset_size=30, seed=123)
    assert got == pytest.approx((float(mean), float(std)), rel=1e-9)
    # one subset of every point: no sampling left, the unbiased MMD² of the whole sets, by hand
    x, y, m = real[:50], fake, 50
    kernel = lambda a, b: (a @ b.T / 16 + 1) ** 3
    off_diagonal = lambda k: k.sum() - np.trace(k)
    by_hand = (off_diagonal(kernel(x, x)) + off_diagonal(kernel(y, y))) / (m * (m - 1)) - 2 * kernel(x, y).mean()
    assert kernel_distance(x, y, subsets=1, subset_size=50, seed=9) == pytest.approx((by_hand, 0.0), rel=1e-12, abs=1e-12)
    with pytest.raises(LoopfreeError, match="subset size"):
        kernel_distance(real, fake, subset_size=51)
