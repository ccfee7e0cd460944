"""ops.metrics against answers known in closed form."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ops.metrics import (
    GaussianReference,
    distribution_metrics,
    fid,
    frechet_distance,
    gaussian_stats,
    mean_l2,
    median_bandwidth,
    mmd2_rbf,
)


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1) * np.eye(d)


def test_identical_sets_give_zero():
    x = np.random.default_rng(0).normal(size=(200, 16)) * 3 + 1
    m = distribution_metrics(x, x.copy())
    assert m["fid"] == pytest.approx(0, abs=1e-8)
    assert m["mean_l2"] == 0
    assert m["mmd2"] == pytest.approx(0, abs=1e-12)


def test_identical_small_rank_deficient_set_gives_zero():
    # 5 points in 32 dimensions: a rank-4 covariance, as a synthetic set at IPC 1 has
    x = np.random.default_rng(1).normal(size=(5, 32))
    assert fid(x, x) == pytest.approx(0, abs=1e-8)


def test_frechet_closed_form_diagonal():
    # commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_the_sqrtm_formula_for_full_covariances():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_fid_of_two_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -1.0, 0.5])
    s1, s2 = np.diag([1.0, 2.0, 0.5, 1.0]), np.diag([2.0, 2.0, 1.0, 0.25])
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    assert fid(a, b) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.02)


def test_gaussian_stats_unbiased_covariance():
    x = np.random.default_rng(4).normal(size=(50, 3))
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False))
    mu1, cov1 = gaussian_stats(x[:1])
    assert np.all(cov1 == 0) and np.allclose(mu1, x[0])


def test_mean_l2():
    a = np.zeros((10, 3))
    b = np.ones((7, 3)) * 2
    assert mean_l2(a, b) == pytest.approx(np.sqrt(12))


def test_mmd_grows_with_a_mean_shift():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 8))
    base = rng.normal(size=(300, 8))
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    fixed = [mmd2_rbf(a, base + s, bandwidth=4.0) for s in shifts]
    median = [mmd2_rbf(a, base + s) for s in shifts]
    assert all(x < y for x, y in zip(fixed, fixed[1:])), fixed
    assert all(x < y for x, y in zip(median, median[1:])), median
    assert fixed[0] < 0.01 < fixed[-1]


def test_mmd_is_symmetric_and_nonnegative():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(60, 5)) + 0.3
    assert mmd2_rbf(a, b) == pytest.approx(mmd2_rbf(b, a))
    assert mmd2_rbf(a, b) > 0


def test_median_bandwidth_of_a_known_set():
    # 3 points on a line at 0, 1, 3: pairwise distances 1, 2, 3 -> median 2
    a = np.array([[0.0], [1.0]])
    b = np.array([[3.0]])
    assert median_bandwidth(a, b) == pytest.approx(2.0)
    assert median_bandwidth(np.zeros((3, 2)), np.zeros((2, 2))) == 1.0


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros(3), np.array([[np.nan, 1.0]])])
def test_bad_inputs_raise(bad):
    with pytest.raises(ValueError):
        mmd2_rbf(bad, np.zeros((2, 3)) if bad.ndim == 2 and bad.shape[-1] == 3 else np.zeros((2, 2)))


def test_mismatched_dimensions_raise():
    with pytest.raises(ValueError):
        mean_l2(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("n_synthetic", [1, 2, 7, 40])
def test_fid_low_rank_path_and_reference_agree_with_the_full_formula(n_synthetic):
    # n < D takes the n x n route, n >= D the D x D one; both must equal the plain formula (up to the
    # round-off of square roots of near-zero eigenvalues of a rank-deficient covariance)
    rng = np.random.default_rng(7)
    real = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    syn = rng.normal(size=(n_synthetic, 16)) + 0.5
    expected = frechet_distance(*gaussian_stats(real), *gaussian_stats(syn))
    ref = GaussianReference.of(real)
    assert fid(real, syn) == pytest.approx(expected, rel=1e-7)
    assert fid(None, syn, ref) == pytest.approx(expected, rel=1e-7)
    assert distribution_metrics(real, syn, ref)["fid"] == pytest.approx(expected, rel=1e-7)
