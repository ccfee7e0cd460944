"""Local tangent spaces of the latent data manifold (docs/method.md section 3).

A centroid's tangent space is spanned by the top principal directions of its real neighbours, computed
from the centred (K, D) neighbour matrix by one of the two routes of ``ops.pca`` (``route="svd"``, thin
SVD, the default; ``route="gram"``, ``eigh`` of the K x K Gram matrix mapped back): O(K^2 D) work either
way, against O(D^3) for an eigendecomposition of the D x D covariance that the public code runs per image
per step. A neighbourhood with fewer directions than asked for (duplicates, K - 1 < dim) gets zero columns
for the missing ones (see ``ops.pca``): the projector U U^T is then the one onto the directions it has.

Radius annealing: the neighbourhood used at guided step i is the set of real latents within
r_eff(i) = r (1 + (m - 1) s(p)) of the centroid, with p going from 1 (first guided step) to 0 at
``warm_steps`` and s one of the schedules below. Few neighbourhoods are distinct over a run, so bases are
computed once per distinct neighbourhood and indexed per step (``annealed_bases``; ``ops.bases`` keeps
that compact form through sampling).

Arrays: numpy or CuPy in, the same out; ``project`` also takes torch tensors.
"""
from __future__ import annotations

import math

import numpy as np

from ops.backend import array_module, check_finite_matrix, to_numpy
from ops.pca import DEFAULT_RANK_RTOL, ROUTES, principal_directions

SCHEDULES = ("linear", "cosine", "exp")


def _stable_argsort(x):
    xp = array_module(x)
    # CuPy's sorts are always stable and (in 13.x) accept no ``kind``; numpy needs to be told.
    return xp.argsort(x, kind="stable") if xp is np else xp.argsort(x)


def tangent_basis(neighbours, dim: int, *, route: str = "svd", rank_rtol: float = DEFAULT_RANK_RTOL):
    """Top-``dim`` principal directions of ``neighbours`` (K, D), as a (D, dim) matrix.

    Orthonormal columns, except that directions the neighbourhood does not have (singular value at most
    ``rank_rtol`` x the largest) are zero columns. ``dim`` must be below K: K points span at most K - 1
    directions once centred. ``route``: "svd" or "gram" (``ops.pca``); both give the same subspace.
    """
    if getattr(neighbours, "ndim", None) != 2:
        raise ValueError(f"neighbours must be a 2-D (K, D) array, got shape {getattr(neighbours, 'shape', None)}")
    k, d_ambient = neighbours.shape
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if dim >= k:
        raise ValueError(f"dim ({dim}) must be smaller than the number of neighbours K ({k})")
    if dim > d_ambient:
        raise ValueError(f"dim ({dim}) exceeds the ambient dimension D ({d_ambient})")
    _, v = principal_directions(neighbours, dim, route=route, rank_rtol=rank_rtol)
    return v.copy()


def tangent_basis_by_variance(neighbours, fraction: float, max_dim: int | None = None, *, route: str = "svd",
                              rank_rtol: float = DEFAULT_RANK_RTOL):
    """Smallest basis whose directions explain at least ``fraction`` of the neighbours' variance.

    Identical points (no variance) give one zero column: no direction to follow.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if getattr(neighbours, "ndim", None) != 2:
        raise ValueError(f"neighbours must be a 2-D (K, D) array, got shape {getattr(neighbours, 'shape', None)}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    xp = array_module(neighbours)
    s, v = principal_directions(neighbours, route=route, rank_rtol=rank_rtol)
    limit = min(neighbours.shape[0] - 1, v.shape[1])
    if max_dim is not None:
        limit = min(limit, int(max_dim))
    if limit < 1:
        raise ValueError("neighbours must hold at least 2 points")
    var = s.astype(xp.float64) ** 2
    total = float(var.sum())
    if total == 0.0:
        return v[:, :1].copy()  # all zero by the rank rule
    explained = xp.cumsum(var) / total
    # The first index whose cumulative share reaches the fraction; a count, not searchsorted, so that no
    # Python scalar goes to CuPy's searchsorted (which needs an array there in CuPy 13).
    dim = int((explained < fraction - 1e-12).sum()) + 1
    return v[:, : min(dim, limit)].copy()


def project(v, basis):
    """Tangent component U U^T v of ``v``.

    ``v``: (..., D). ``basis``: (D, d) shared by all vectors, or (..., D, d) one per vector (leading
    axes broadcast). Only operators and ``swapaxes`` are used (not ``.mT``, which CuPy 13 lacks), so
    numpy, CuPy and torch arrays all work.
    """
    basis_t = basis.swapaxes(-1, -2)
    if basis.ndim == 2:
        return (v @ basis) @ basis_t
    coords = (v[..., None, :] @ basis)  # (..., 1, d)
    return (coords @ basis_t)[..., 0, :]


def radius_multiplier(progress, schedule: str = "exp", max_multiplier: float = 2.0):
    """1 + (m - 1) s(p): ``max_multiplier`` at progress p = 1, exactly 1 at p = 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if max_multiplier < 1.0:
        raise ValueError(f"max_multiplier must be >= 1, got {max_multiplier}")
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        s = p
    elif schedule == "cosine":
        s = (1.0 + math.cos(math.pi * (1.0 - p))) / 2.0
    else:
        s = (math.exp(p) - 1.0) / (math.e - 1.0)
    return 1.0 + (max_multiplier - 1.0) * s


def annealed_radius(step: int, radius: float, warm_steps: int, schedule: str = "exp",
                    max_multiplier: float = 2.0) -> float:
    """r_eff at guided step ``step`` (0 = first guided step); p falls linearly from 1 to 0 over warm_steps."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if warm_steps < 0:
        raise ValueError(f"warm_steps must be >= 0, got {warm_steps}")
    if warm_steps == 0:
        return float(radius)
    progress = max(0.0, 1.0 - step / warm_steps)
    return float(radius) * radius_multiplier(progress, schedule, max_multiplier)


def neighbourhood(points, centre, radius: float, *, min_count: int, max_count: int | None = None):
    """Indices of the real points within ``radius`` of ``centre``, nearest first.

    At least ``min_count`` (the nearest ones, whatever their distance) and at most ``max_count``.
    """
    check_finite_matrix(points, "points")
    n = points.shape[0]
    if min_count > n:
        raise ValueError(f"min_count ({min_count}) exceeds the number of points ({n})")
    xp = array_module(points)
    dist = xp.sqrt(xp.sum((points - centre[None, :]) ** 2, axis=1))
    order = _stable_argsort(dist)
    inside = int(xp.sum(dist <= radius))
    count = max(inside, min_count)
    if max_count is not None:
        count = min(count, max_count)
    return order[:count]


def default_radius(points, centre, k: int) -> float:
    """Distance from ``centre`` to its k-th nearest point: a scale-free default for the radius."""
    xp = array_module(points)
    dist = xp.sqrt(xp.sum((points - centre[None, :]) ** 2, axis=1))
    k = min(max(k, 1), points.shape[0])
    return float(xp.sort(dist)[k - 1])


def annealed_bases(points, centre, *, dim: int, radius: float, n_steps: int, warm_steps: int,
                   schedule: str = "exp", max_multiplier: float = 2.0, max_neighbours: int | None = None,
                   route: str = "svd", rank_rtol: float = DEFAULT_RANK_RTOL):
    """Tangent bases for each of ``n_steps`` guided steps under radius annealing.

    Returns ``(bases, step_index)``: ``bases`` (M, D, dim) for the M distinct neighbourhoods met, on the
    points' device, and ``step_index`` (n_steps,) host int64 mapping each guided step to its basis. Every
    neighbourhood holds at least dim + 1 points so that the basis is well defined. ``route`` and
    ``rank_rtol``: as in ``tangent_basis``.
    """
    check_finite_matrix(points, "points")
    xp = array_module(points)
    if dim + 1 > points.shape[0]:
        raise ValueError(f"dim + 1 ({dim + 1}) exceeds the number of points ({points.shape[0]})")
    # Distances do not change between steps: sort once, then each step is a count (the same rule as
    # `neighbourhood`: within r_eff, at least dim + 1, at most max_neighbours, nearest first).
    dist = xp.sqrt(xp.sum((points - centre[None, :]) ** 2, axis=1))
    order = _stable_argsort(dist)
    # All steps' radii at once, compared in float64 (a float32 distance converts exactly), by one
    # searchsorted of an array (CuPy 13 takes no Python scalar there) and one copy of n_steps counts.
    radii = np.array([annealed_radius(step, radius, warm_steps, schedule, max_multiplier)
                      for step in range(n_steps)], dtype=np.float64)
    inside = to_numpy(xp.searchsorted(dist[order].astype(xp.float64), xp.asarray(radii), side="right"))
    bases, index, seen = [], [], {}
    for step in range(n_steps):
        count = max(int(inside[step]), dim + 1)
        if max_neighbours is not None:
            count = min(count, max_neighbours)
        if count not in seen:  # nearest-first order: equal counts mean equal sets
            seen[count] = len(bases)
            bases.append(tangent_basis(points[order[:count]], dim, route=route, rank_rtol=rank_rtol))
        index.append(seen[count])
    return xp.stack(bases), np.asarray(index, dtype=np.int64)
