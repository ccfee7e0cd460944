"""ops.pca / tangent routes: thin SVD and the K x K Gram route against each other and against a float64
numpy SVD reference, on full-rank, rank-deficient and degenerate neighbourhoods (CPU), and on CuPy (gpu)."""
from __future__ import annotations

import numpy as np
import pytest

from ops.backend import cupy_available
from ops.pca import largest_principal_angle, numerical_rank, principal_directions
from ops.tangent import annealed_bases, tangent_basis, tangent_basis_by_variance

needs_cupy = pytest.mark.skipif(not cupy_available(), reason="needs CuPy with a CUDA device")


def reference_basis(points: np.ndarray, dim: int) -> np.ndarray:
    """Top-dim right singular vectors of the centred points, float64 numpy SVD."""
    x = points.astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    return vt[:dim].T


def latent_like_neighbours(k: int, d: int, seed: int, dtype=np.float32) -> np.ndarray:
    """K neighbours in D dims with a decaying spectrum (distinct principal directions), like latents."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(4.0, 0.2, k)
    q = np.linalg.qr(rng.standard_normal((d, k)))[0]
    return ((rng.standard_normal((k, k)) * scales) @ q.T + 1.5).astype(dtype)


@pytest.mark.parametrize("k,d,dim", [(12, 4096, 3), (64, 4096, 32), (40, 64, 3), (9, 30, 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_routes_agree_with_numpy_svd(k, d, dim, dtype):
    x = latent_like_neighbours(k, d, seed=k + d, dtype=dtype)
    ref = reference_basis(x, dim)
    tol = 1e-3 if dtype == np.float32 else 1e-8
    for route in ("svd", "gram"):
        u = tangent_basis(x, dim, route=route)
        assert u.shape == (d, dim) and u.dtype == dtype
        np.testing.assert_allclose(u.T.astype(np.float64) @ u, np.eye(dim), atol=10 * tol)
        assert largest_principal_angle(u, ref) < tol, route
    assert largest_principal_angle(tangent_basis(x, dim, route="svd"), tangent_basis(x, dim, route="gram")) < tol


def test_singular_values_agree_between_routes():
    x = latent_like_neighbours(20, 500, seed=3, dtype=np.float64)
    s_svd, _ = principal_directions(x, route="svd")
    s_gram, _ = principal_directions(x, route="gram")
    ref = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(s_svd, ref, rtol=1e-10, atol=1e-9 * ref[0])
    # The last one is the centring's null direction: both routes zero it by the rank rule.
    np.testing.assert_allclose(s_gram[:-1], ref[:-1], rtol=1e-8)
    assert s_svd[-1] == 0 and s_gram[-1] == 0


@pytest.mark.parametrize("route", ["svd", "gram"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_deficient_neighbourhood_gives_zero_columns(route, dtype):
    # 12 points on a 2-D affine plane of R^50: only 2 directions exist, 5 are asked for.
    rng = np.random.default_rng(7)
    plane = np.linalg.qr(rng.standard_normal((50, 2)))[0]
    x = (rng.standard_normal((12, 2)) * [3.0, 1.0] @ plane.T + 4.0).astype(dtype)
    u = tangent_basis(x, 5, route=route)
    assert np.all(u[:, 2:] == 0)
    assert largest_principal_angle(u[:, :2], plane) < (1e-4 if dtype == np.float32 else 1e-9)
    np.testing.assert_allclose(u[:, :2].T.astype(np.float64) @ u[:, :2], np.eye(2), atol=1e-5)
    s, _ = principal_directions(x, route=route)
    assert numerical_rank(s) == 2


@pytest.mark.parametrize("route", ["svd", "gram"])
def test_duplicates_and_identical_points(route):
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((2, 30)).astype(np.float32)
    dup = np.stack([a] * 6 + [b] * 6)  # two distinct points, many copies: one direction, b - a
    u = tangent_basis(dup, 3, route=route)
    direction = ((b - a) / np.linalg.norm(b - a))[:, None]
    assert largest_principal_angle(u[:, :1], direction) < 1e-4
    assert np.all(u[:, 1:] == 0)
    same = np.tile(a, (5, 1))
    assert np.all(tangent_basis(same, 2, route=route) == 0)
    by_var = tangent_basis_by_variance(same, 0.9, route=route)
    assert by_var.shape == (30, 1) and np.all(by_var == 0)


def test_projection_with_zero_columns_equals_projection_on_the_rank():
    rng = np.random.default_rng(9)
    x = np.stack([rng.standard_normal(20)] * 4 + [rng.standard_normal(20)] * 4)
    u = tangent_basis(x, 3, route="gram")
    v = rng.standard_normal((5, 20))
    np.testing.assert_allclose(v @ u @ u.T, v @ u[:, :1] @ u[:, :1].T, atol=1e-12)


def test_variance_fraction_is_the_same_for_both_routes():
    x = latent_like_neighbours(30, 200, seed=4, dtype=np.float64)
    for fraction in (0.3, 0.8, 0.99, 1.0):
        a = tangent_basis_by_variance(x, fraction, route="svd")
        b = tangent_basis_by_variance(x, fraction, route="gram")
        assert a.shape == b.shape
        assert largest_principal_angle(a, b) < 1e-8


def test_annealed_bases_routes_share_the_index_and_the_subspaces():
    x = latent_like_neighbours(60, 128, seed=5, dtype=np.float32)
    centre = x[:10].mean(axis=0)
    radius = float(np.sort(np.linalg.norm(x - centre, axis=1))[12])
    kw = dict(dim=3, radius=radius, n_steps=24, warm_steps=12, max_multiplier=3.0)
    b_svd, i_svd = annealed_bases(x, centre, route="svd", **kw)
    b_gram, i_gram = annealed_bases(x, centre, route="gram", **kw)
    np.testing.assert_array_equal(i_svd, i_gram)
    assert len(set(i_svd.tolist())) > 1  # the test needs annealing to meet several neighbourhoods
    for a, b in zip(b_svd, b_gram):
        assert largest_principal_angle(a, b) < 1e-3


def test_annealed_counts_compare_radii_in_float64():
    # r lies between 1 and the next float32 above 1. Compared in float64 (what numpy did with a Python
    # float, and what the array form keeps), the point at distance 1 + ulp is outside: the neighbourhood
    # is the first two points and its direction the x axis. Compared in float32 it would be inside.
    one_up = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    pts = np.array([[0, 0], [1, 0], [0, one_up], [3, 3], [4, 4]], np.float32)
    r = 1.0 + 0.7 * (one_up - 1.0)
    bases, index = annealed_bases(pts, np.zeros(2, np.float32), dim=1, radius=r, n_steps=1, warm_steps=0)
    assert index.tolist() == [0]
    np.testing.assert_allclose(np.abs(bases[0, :, 0]), [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("call,name", [
    (lambda: principal_directions(np.ones((4, 3)), route="eigh"), "route"),
    (lambda: principal_directions(np.ones((4, 3)), rank_rtol=1.5), "rank_rtol"),
    (lambda: tangent_basis(np.ones((4, 3)), 2, route="qr"), "route"),
    (lambda: tangent_basis_by_variance(np.ones((4, 3)), 0.5, route="qr"), "route"),
])
def test_bad_route_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("route", ["svd", "gram"])
@pytest.mark.parametrize("k,dim", [(12, 3), (64, 32)])
def test_cupy_tangent_bases_match_numpy(route, k, dim):
    import cupy

    x = latent_like_neighbours(k, 4096, seed=k, dtype=np.float32)
    u = tangent_basis(cupy.asarray(x), dim, route=route)
    assert isinstance(u, cupy.ndarray) and u.dtype == np.float32
    assert largest_principal_angle(u, reference_basis(x, dim)) < 1e-3
    assert largest_principal_angle(u, tangent_basis(x, dim, route=route)) < 1e-3


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("route", ["svd", "gram"])
def test_cupy_annealed_bases_match_numpy(route):
    import cupy

    x = latent_like_neighbours(300, 4096, seed=11, dtype=np.float32)
    centre = x[:20].mean(axis=0)
    radius = float(np.sort(np.linalg.norm(x - centre, axis=1))[20])
    kw = dict(dim=3, radius=radius, n_steps=24, warm_steps=12, max_multiplier=2.0, route=route)
    b_host, i_host = annealed_bases(x, centre, **kw)
    b_dev, i_dev = annealed_bases(cupy.asarray(x), cupy.asarray(centre), **kw)
    assert isinstance(b_dev, cupy.ndarray) and isinstance(i_dev, np.ndarray)
    np.testing.assert_array_equal(i_dev, i_host)
    for a, b in zip(b_host, b_dev):
        assert largest_principal_angle(a, b) < 1e-3
