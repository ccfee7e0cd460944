"""Local tangent spaces of the latent data manifold (METHOD.md section 3).

A centroid's tangent space is spanned by the top principal directions of its real neighbours. We get
them from a thin SVD of the centred (K, D) neighbour matrix: O(K^2 D) work, against O(D^3) for an
eigendecomposition of the D x D covariance that the public code runs per image per step.

Radius annealing: the neighbourhood used at guided step i is the set of real latents within
r_eff(i) = r (1 + (m - 1) s(p)) of the centroid, with p going from 1 (first guided step) to 0 at
``warm_steps`` and s one of the schedules below. Few neighbourhoods are distinct over a run, so bases are
computed once per distinct neighbourhood and indexed per step (``annealed_bases``).
"""
from __future__ import annotations

import math

import numpy as np

from ops.backend import array_module, check_finite_matrix

SCHEDULES = ("linear", "cosine", "exp")


def _centred(neighbours, dim_name: str = "neighbours"):
    check_finite_matrix(neighbours, dim_name)
    xp = array_module(neighbours)
    return neighbours - xp.mean(neighbours, axis=0, keepdims=True)


def _principal_directions(neighbours):
    """Right singular vectors (rows) and singular values of the centred neighbours."""
    xp = array_module(neighbours)
    _, s, vt = xp.linalg.svd(_centred(neighbours), full_matrices=False)
    return s, vt


def tangent_basis(neighbours, dim: int):
    """Top-``dim`` principal directions of ``neighbours`` (K, D), as a (D, dim) orthonormal matrix.

    ``dim`` must be below K: K points span at most K - 1 directions once centred.
    """
    if getattr(neighbours, "ndim", None) != 2:
        raise ValueError(f"neighbours must be a 2-D (K, D) array, got shape {getattr(neighbours, 'shape', None)}")
    k, d_ambient = neighbours.shape
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if dim >= k:
        raise ValueError(f"dim ({dim}) must be smaller than the number of neighbours K ({k})")
    if dim > d_ambient:
        raise ValueError(f"dim ({dim}) exceeds the ambient dimension D ({d_ambient})")
    _, vt = _principal_directions(neighbours)
    return vt[:dim].T.copy()


def tangent_basis_by_variance(neighbours, fraction: float, max_dim: int | None = None):
    """Smallest basis whose directions explain at least ``fraction`` of the neighbours' variance."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if getattr(neighbours, "ndim", None) != 2:
        raise ValueError(f"neighbours must be a 2-D (K, D) array, got shape {getattr(neighbours, 'shape', None)}")
    xp = array_module(neighbours)
    s, vt = _principal_directions(neighbours)
    var = s.astype(xp.float64) ** 2
    total = float(var.sum())
    limit = min(neighbours.shape[0] - 1, vt.shape[0])
    if max_dim is not None:
        limit = min(limit, int(max_dim))
    if limit < 1:
        raise ValueError("neighbours must hold at least 2 points")
    if total == 0.0:  # identical points: no direction is better than another; keep one
        return vt[:1].T.copy()
    explained = xp.cumsum(var) / total
    dim = int(xp.searchsorted(explained, fraction - 1e-12)) + 1
    return vt[: min(dim, limit)].T.copy()


def project(v, basis):
    """Tangent component U U^T v of ``v``.

    ``v``: (..., D). ``basis``: (D, d) shared by all vectors, or (..., D, d) one per vector (leading
    axes broadcast). Only operators and ``.mT`` are used, so numpy, CuPy and torch arrays all work.
    """
    if basis.ndim == 2:
        return (v @ basis) @ basis.mT
    coords = (v[..., None, :] @ basis)  # (..., 1, d)
    return (coords @ basis.mT)[..., 0, :]


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
    order = xp.argsort(dist, kind="stable")
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
                   schedule: str = "exp", max_multiplier: float = 2.0, max_neighbours: int | None = None):
    """Tangent bases for each of ``n_steps`` guided steps under radius annealing.

    Returns ``(bases, step_index)``: ``bases`` (M, D, d) for the M distinct neighbourhoods met, and
    ``step_index`` (n_steps,) mapping each guided step to its basis. Every neighbourhood holds at least
    dim + 1 points so that the basis is well defined.
    """
    check_finite_matrix(points, "points")
    xp = array_module(points)
    if dim + 1 > points.shape[0]:
        raise ValueError(f"dim + 1 ({dim + 1}) exceeds the number of points ({points.shape[0]})")
    # Distances do not change between steps: sort once, then each step is a count (the same rule as
    # `neighbourhood`: within r_eff, at least dim + 1, at most max_neighbours, nearest first).
    dist = xp.sqrt(xp.sum((points - centre[None, :]) ** 2, axis=1))
    order = xp.argsort(dist, kind="stable")
    sorted_dist = dist[order]
    bases, index, seen = [], [], {}
    for step in range(n_steps):
        r = annealed_radius(step, radius, warm_steps, schedule, max_multiplier)
        count = max(int(xp.searchsorted(sorted_dist, r, side="right")), dim + 1)
        if max_neighbours is not None:
            count = min(count, max_neighbours)
        if count not in seen:  # nearest-first order: equal counts mean equal sets
            seen[count] = len(bases)
            bases.append(tangent_basis(points[order[:count]], dim))
        index.append(seen[count])
    return xp.stack(bases), np.asarray(index, dtype=np.int64)
