import math

import numpy as np
import pytest
import torch

from ops.guidance import guidance_vector, guided_mean, x0_from_eps
from ops.tangent import (
    annealed_bases,
    annealed_radius,
    neighbourhood,
    project,
    radius_multiplier,
    tangent_basis,
    tangent_basis_by_variance,
)


def _largest_principal_angle(a, b):
    s = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(np.arccos(np.clip(s.min(), -1.0, 1.0)))


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    # points near a 3-D subspace of R^64, with a clear spectral gap
    basis = np.linalg.qr(rng.normal(size=(64, 3)))[0]
    coords = rng.normal(size=(40, 3)) * np.array([5.0, 3.0, 2.0])
    return coords @ basis.T + 0.01 * rng.normal(size=(40, 64)) + 7.0


def test_basis_is_orthonormal(cloud):
    u = tangent_basis(cloud, 3)
    assert u.shape == (64, 3)
    np.testing.assert_allclose(u.T @ u, np.eye(3), atol=1e-10)


def test_basis_matches_covariance_eigh(cloud):
    u = tangent_basis(cloud, 3)
    cov = np.cov(cloud, rowvar=False)
    w, v = np.linalg.eigh(cov)
    top = v[:, np.argsort(w)[::-1][:3]]
    assert _largest_principal_angle(u, top) < 1e-6


def test_basis_matches_eigh_on_unstructured_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 50)) * np.linspace(3, 0.1, 50)  # distinct variances per axis
    u = tangent_basis(x, 4)
    w, v = np.linalg.eigh(np.cov(x, rowvar=False))
    top = v[:, np.argsort(w)[::-1][:4]]
    assert _largest_principal_angle(u, top) < 1e-6


def test_project_is_idempotent_and_orthogonal(cloud):
    u = tangent_basis(cloud, 3)
    v = np.random.default_rng(2).normal(size=(5, 64))
    p = project(v, u)
    np.testing.assert_allclose(project(p, u), p, atol=1e-12)
    normal = v - p
    np.testing.assert_allclose(np.sum(p * normal, axis=1), 0.0, atol=1e-10)
    assert np.all(np.linalg.norm(p, axis=1) <= np.linalg.norm(v, axis=1) + 1e-12)


def test_project_batched_bases_match_per_vector(cloud):
    rng = np.random.default_rng(3)
    bases = np.stack([tangent_basis(cloud + rng.normal(size=cloud.shape), 3) for _ in range(4)])
    v = rng.normal(size=(4, 64))
    batched = project(v, bases)
    one_by_one = np.stack([project(v[i], bases[i]) for i in range(4)])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-12)


def test_project_works_on_torch_tensors(cloud):
    u = tangent_basis(cloud, 3)
    v = np.random.default_rng(4).normal(size=(3, 64))
    out = project(torch.from_numpy(v), torch.from_numpy(u))
    np.testing.assert_allclose(out.numpy(), project(v, u), atol=1e-12)


def test_variance_fraction_picks_smallest_dim(cloud):
    assert tangent_basis_by_variance(cloud, 0.5).shape[1] == 1
    assert tangent_basis_by_variance(cloud, 0.99).shape[1] == 3
    assert tangent_basis_by_variance(cloud, 1.0, max_dim=5).shape[1] == 5


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp"])
def test_radius_schedules_hit_endpoints(schedule):
    assert radius_multiplier(1.0, schedule, 3.0) == pytest.approx(3.0)
    assert radius_multiplier(0.0, schedule, 3.0) == pytest.approx(1.0)
    assert annealed_radius(0, 2.0, 10, schedule, 3.0) == pytest.approx(6.0)
    assert annealed_radius(10, 2.0, 10, schedule, 3.0) == pytest.approx(2.0)
    assert annealed_radius(25, 2.0, 10, schedule, 3.0) == pytest.approx(2.0)


def test_radius_schedule_midpoints_follow_formulas():
    m = 3.0
    assert radius_multiplier(0.5, "linear", m) == pytest.approx(1 + (m - 1) * 0.5)
    assert radius_multiplier(0.25, "cosine", m) == pytest.approx(1 + (m - 1) * (1 + math.cos(math.pi * 0.75)) / 2)
    assert radius_multiplier(0.5, "exp", m) == pytest.approx(1 + (m - 1) * (math.exp(0.5) - 1) / (math.e - 1))
    # exp is below linear in the middle: it shrinks the radius faster early on
    assert radius_multiplier(0.5, "exp", m) < radius_multiplier(0.5, "linear", m)


def test_neighbourhood_respects_radius_and_bounds():
    pts = np.arange(10, dtype=float)[:, None] * np.ones((1, 2))
    centre = np.zeros(2)
    idx = neighbourhood(pts, centre, radius=3.0, min_count=2)
    assert list(idx) == [0, 1, 2]  # distances 0, 1.41, 2.83 <= 3
    assert list(neighbourhood(pts, centre, radius=0.1, min_count=4)) == [0, 1, 2, 3]
    assert len(neighbourhood(pts, centre, radius=100.0, min_count=2, max_count=5)) == 5


def test_annealed_bases_shrink_and_are_cached(cloud):
    centre = cloud[0]
    bases, step_index = annealed_bases(cloud, centre, dim=3, radius=float(np.median(
        np.linalg.norm(cloud - centre, axis=1))), n_steps=24, warm_steps=12, max_multiplier=3.0)
    assert step_index.shape == (24,)
    assert bases.shape[0] == len(set(step_index.tolist())) < 24
    assert np.all(np.diff(step_index) >= 0)  # the neighbourhood only shrinks: never revisits
    assert step_index[12] == step_index[-1]  # constant after warm-up
    for b in bases:
        np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-10)


def test_manifold_with_unit_normal_weight_equals_mode(cloud):
    rng = np.random.default_rng(5)
    u = tangent_basis(cloud, 3)
    x0, c = rng.normal(size=(4, 64)), rng.normal(size=(4, 64))
    np.testing.assert_array_equal(guidance_vector("manifold", x0, c, u, 1.0), guidance_vector("mode", x0, c))
    half = guidance_vector("manifold", x0, c, u, 0.5)
    strict = guidance_vector("manifold", x0, c, u, 0.0)
    np.testing.assert_allclose(half, strict + 0.5 * ((c - x0) - strict), atol=1e-12)


def test_strict_manifold_guidance_lies_in_span(cloud):
    rng = np.random.default_rng(6)
    u = tangent_basis(cloud, 3)
    x0, c = rng.normal(size=(4, 64)), rng.normal(size=(4, 64))
    g = guidance_vector("manifold", x0, c, u, 0.0)
    np.testing.assert_allclose(g - project(g, u), 0.0, atol=1e-12)
    assert np.all(np.linalg.norm(g, axis=1) > 0)
    np.testing.assert_array_equal(guidance_vector("none", x0, c), np.zeros_like(x0))


def test_guided_mean_and_x0():
    mean, g = np.ones(4), np.arange(4.0)
    np.testing.assert_allclose(guided_mean(mean, 0.5, g, 0.1), 1 + 0.05 * np.arange(4.0))
    x0 = np.full(4, 2.0)
    eps = np.full(4, -1.0)
    abar = 0.36
    x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps
    np.testing.assert_allclose(x0_from_eps(x_t, eps, abar), x0)


@pytest.mark.parametrize("call, name", [
    (lambda: tangent_basis(np.ones((3, 4, 5)), 1), "neighbours"),
    (lambda: tangent_basis(np.full((5, 4), np.nan), 1), "neighbours"),
    (lambda: tangent_basis(np.random.rand(4, 10), 4), "dim"),
    (lambda: tangent_basis(np.random.rand(4, 10), 0), "dim"),
    (lambda: guidance_vector("bogus", np.zeros(2), np.zeros(2)), "mode"),
    (lambda: guidance_vector("manifold", np.zeros(2), np.zeros(2)), "basis"),
    (lambda: radius_multiplier(0.5, "quadratic"), "schedule"),
    (lambda: neighbourhood(np.array([[np.inf, 0.0]]), np.zeros(2), 1.0, min_count=1), "points"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_annealed_bases_match_the_neighbourhood_rule_step_by_step(cloud):
    centre, radius = cloud[3], 4.0
    bases, step_index = annealed_bases(cloud, centre, dim=3, radius=radius, n_steps=10, warm_steps=6,
                                       schedule="cosine", max_multiplier=3.0, max_neighbours=30)
    for step in range(10):
        idx = neighbourhood(cloud, centre, annealed_radius(step, radius, 6, "cosine", 3.0), min_count=4,
                            max_count=30)
        np.testing.assert_allclose(bases[step_index[step]], tangent_basis(cloud[idx], 3), atol=1e-12)
