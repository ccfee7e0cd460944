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


# ----------------------------------------------------------------------------- the paper's MMD
def test_unbiased_mmd2_known_answer_with_a_given_gamma():
    """X = {0, 1}, Y = {2, 4} on a line, gamma = ln 2 so that k = 2^(-d^2), by hand:
    XX off-diagonal: d^2 = 1 -> 1/2, mean over the 2 ordered pairs = 1/2; YY: d^2 = 4 -> 1/16;
    XY: d^2 = 4, 16, 1, 9 -> (1/16 + 2^-16 + 1/2 + 2^-9), times 2 / (2 * 2)."""
    from ops.metrics import mmd2_unbiased_rbf

    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [4.0]])
    expected = 1 / 2 + 1 / 16 - (1 / 16 + 2**-16 + 1 / 2 + 2**-9) / 2
    assert expected == pytest.approx(0.28026580810546875, abs=1e-15)
    assert mmd2_unbiased_rbf(x, y, np.log(2)) == pytest.approx(expected, rel=1e-12)
    assert mmd2_unbiased_rbf(y, x, np.log(2)) == pytest.approx(expected, rel=1e-12)


def test_paper_mmd_known_answer_with_the_median_gamma():
    """Pooled {0, 1, 2, 4}: squared distances 1, 4, 16, 1, 9, 4 -> median 4 -> gamma 1/4, and
    MMD^2_u = e^-1/4 + e^-1 - (e^-1 + e^-4 + e^-1/4 + e^-9/4) / 2; the paper's MMD is its square root.
    The biased estimate with the project's kernel (2 h^2 = 8) differs: the two must not be confused."""
    from ops.metrics import median_sq_distance, mmd_biased_sq, mmd_paper

    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [4.0]])
    assert median_sq_distance(x, y) == 4.0
    e = np.exp
    u = e(-0.25) + e(-1) - (e(-1) + e(-4) + e(-0.25) + e(-2.25)) / 2
    assert mmd_paper(x, y) == pytest.approx(np.sqrt(u), rel=1e-12)
    k = lambda d2: e(-d2 / 8)  # noqa: E731
    biased = (2 + 2 * k(1)) / 4 + (2 + 2 * k(4)) / 4 - 2 * (k(4) + k(16) + k(1) + k(9)) / 4
    assert mmd_biased_sq(x, y) == pytest.approx(biased, rel=1e-12)
    m = distribution_metrics(x, y)
    assert m["mmd_paper"] == pytest.approx(np.sqrt(u), rel=1e-9) and m["mmd_paper_gamma"] == 0.25
    assert m["mmd2_unbiased"] == pytest.approx(u, rel=1e-9)
    assert m["mmd2"] == pytest.approx(biased, rel=1e-9) and m["mmd_bandwidth"] == 2.0
    assert m["mmd_paper"] != pytest.approx(m["mmd2"], rel=0.05)


def test_unbiased_mmd2_goes_negative_for_identical_sets_and_the_paper_mmd_clips_it():
    from ops.metrics import mmd2_unbiased_rbf, mmd_paper

    x = np.array([[0.0], [1.0]])
    # gamma ln 2: (1/2) + (1/2) - 2 (1 + 1 + 1/2 + 1/2) / 4 = -1/2
    assert mmd2_unbiased_rbf(x, x.copy(), np.log(2)) == pytest.approx(-0.5, rel=1e-12)
    assert mmd_paper(x, x.copy()) == 0.0
    m = distribution_metrics(x, x.copy())
    assert m["mmd2_unbiased"] < 0 and m["mmd_paper"] == 0.0


def test_unbiased_mmd2_is_nearly_unbiased_where_the_biased_one_is_not():
    """Two samples of one distribution: the U-statistic averages to ~0, the V-statistic stays positive
    (its bias is about (1 - mean k) (1/m + 1/n))."""
    from ops.metrics import mmd2_unbiased_rbf

    rng = np.random.default_rng(0)
    u, v = [], []
    for _ in range(200):
        a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
        u.append(mmd2_unbiased_rbf(a, b, 0.2))
        v.append(mmd2_rbf(a, b, bandwidth=np.sqrt(1 / 0.4)))  # the same kernel
    assert abs(np.mean(u)) < 3 * np.std(u) / np.sqrt(len(u))
    assert np.mean(v) > 0.05 and min(v) > 0
    assert np.mean(v) - np.mean(u) > 10 * np.std(u) / np.sqrt(len(u))


def test_paper_mmd_grows_with_a_mean_shift_and_needs_two_vectors():
    from ops.metrics import mmd_paper

    rng = np.random.default_rng(3)
    a, base = rng.normal(size=(100, 5)), rng.normal(size=(100, 5))
    values = [mmd_paper(a, base + s, gamma=0.1) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[-1] > 0.3
    with pytest.raises(ValueError, match="at least 2"):
        mmd_paper(a, base[:1])
    assert distribution_metrics(a, base[:1])["mmd_paper"] is None
