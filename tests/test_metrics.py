"""Fréchet distance against closed forms; PRDC against a brute-force reading of Naeem et al. 2020."""

import math

import numpy as np
import pytest
import torch

from loopfree.errors import LoopfreeError
from loopfree.metrics import frechet_distance, frechet_distance_from_stats, prdc


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
    return {
        "precision": sum(any(inside[i][j] for i in range(n)) for j in range(m)) / m,
        "recall": sum(any(row) for row in inside_fake) / n,
        "density": sum(inside[i][j] for i in range(n) for j in range(m)) / (k * m),
        "coverage": sum(min(math.dist(r, f) for f in fake) < r_rad[i] for i, r in enumerate(real)) / n,
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 4))
    fake = rng.normal(size=(33, 4)) * 1.3 + 0.4
    got = prdc(real, fake, k=k)
    want = _brute_force_prdc(real, fake, k)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_prdc_hand_cases():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 6))
    same = prdc(x, x.copy(), k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(x, x + 1000.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_rejects_too_few_points():
    x = np.zeros((5, 2))
    with pytest.raises(LoopfreeError):
        prdc(x, x, k=5)
    with pytest.raises(LoopfreeError):
        prdc(np.zeros((10, 2)), np.zeros((10, 3)))
