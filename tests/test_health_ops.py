"""ops/health.py: nearest distances, the class's own spacing, and the score that flags a diverged sample."""
import numpy as np
import pytest

from ops.health import flag, health_scores, nearest_distances, reference_spacing


def brute_nearest(q, p, exclude_self=False):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - p[None].astype(np.float64)) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(1)


def test_nearest_distances_match_brute_force_for_any_block():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(37, 5)).astype(np.float32)
    q = rng.normal(size=(11, 5)).astype(np.float32)
    want = brute_nearest(q, p)
    for block in (1, 4, 256):
        np.testing.assert_allclose(nearest_distances(q, p, block=block), want, rtol=1e-9, atol=1e-9)
    loo = brute_nearest(p, p, exclude_self=True)
    for block in (3, 256):
        np.testing.assert_allclose(nearest_distances(p, p, exclude_self=True, block=block), loo, atol=1e-9)
    # A point is at distance 0 from itself unless excluded.
    assert np.all(nearest_distances(p, p) < 1e-6)
    assert np.all(nearest_distances(p, p, exclude_self=True) > 0)


def test_reference_spacing_is_the_median_leave_one_out_distance():
    p = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)  # nearest: 1, 1, 2, 4 -> median 1.5
    assert reference_spacing(p) == pytest.approx(1.5)
    # Duplicates (spacing 0 for most points) fall back to the positive distances.
    dup = np.array([[0.0], [0.0], [0.0], [2.0], [5.0]], dtype=np.float32)
    assert reference_spacing(dup) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="identical"):
        reference_spacing(np.zeros((3, 2), np.float32))


def test_scores_flag_a_far_sample_and_not_on_manifold_ones():
    rng = np.random.default_rng(1)
    # Real latents fill a square on a 2-D plane inside 16-D; generated: new points of the same square, and
    # one pushed off the plane.
    basis = np.linalg.qr(rng.normal(size=(16, 2)))[0]
    real = (rng.uniform(-1, 1, size=(400, 2)) @ basis.T).astype(np.float32)
    good = (rng.uniform(-0.9, 0.9, size=(20, 2)) @ basis.T).astype(np.float32)
    bad = good[:1] + rng.normal(size=(1, 16)).astype(np.float32)
    scores = health_scores(np.concatenate([good, bad]), real)
    assert scores[:-1].max() < 3.0
    assert scores[-1] > 10 * scores[:-1].max()
    flags = flag(scores, 4.0)
    assert flags.tolist() == [False] * 20 + [True]
    # Scale-free: scaling every latent leaves the scores unchanged.
    np.testing.assert_allclose(health_scores(3 * np.concatenate([good, bad]), 3 * real), scores, rtol=1e-5)


def test_clear_errors():
    p = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="queries must be a 2-D"):
        nearest_distances(np.zeros(3, np.float32), p)
    with pytest.raises(ValueError, match="D=2"):
        nearest_distances(np.zeros((1, 2), np.float32), p)
    with pytest.raises(ValueError, match="NaN"):
        nearest_distances(np.full((1, 3), np.nan, np.float32), p)
    with pytest.raises(ValueError, match="threshold"):
        flag([1.0], 0.0)
    with pytest.raises(ValueError, match="spacing"):
        health_scores(p, p, spacing=0.0)
