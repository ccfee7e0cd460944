"""Sample health: how far a generated latent lies from its class's real latents, in units of their own spacing.

Pure numerics on numpy or CuPy arrays (``ops.backend.array_module``); no I/O.

The score of a generated latent z of class y, with X the class's real latents (N, D):

    d(z)      = min_i ||z - X_i||                      distance to the nearest real latent of the class
    s_i       = min_{j != i} ||X_i - X_j||             each real latent's nearest-neighbour distance
    score(z)  = d(z) / median_i(s_i)

A sample that stays on the class's data manifold lands about as far from its nearest real latent as real
latents are from each other (score around 1 to 2); a sample whose trajectory left the manifold (a noise
blob) lands many spacings away. ``flag(score, threshold)`` is ``score > threshold``.

Distances are computed in float64 from float32 inputs in blocks of rows, so the memory use is bounded by
``block`` x N and the result does not depend on how the rows were batched.
"""
from __future__ import annotations

import numpy as np

from ops.backend import array_module, to_numpy

DEFAULT_BLOCK = 256


def _check(x, name: str):
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D (rows, D) array, got shape {getattr(x, 'shape', None)}")
    xp = array_module(x)
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")


def nearest_distances(queries, points, *, exclude_self: bool = False, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(n,) float64 host array: each query's Euclidean distance to its nearest row of ``points`` (N, D).

    ``exclude_self``: queries are ``points`` themselves; row i ignores point i (leave-one-out)."""
    _check(queries, "queries")
    _check(points, "points")
    if queries.shape[1] != points.shape[1]:
        raise ValueError(f"queries have D={queries.shape[1]}, points D={points.shape[1]}")
    n_points = points.shape[0]
    if n_points < (2 if exclude_self else 1):
        raise ValueError(f"points must hold at least {2 if exclude_self else 1} row(s), got {n_points}")
    if exclude_self and queries.shape[0] != n_points:
        raise ValueError("exclude_self needs queries == points")
    xp = array_module(points)
    p = points.astype(xp.float64)
    p_sq = (p * p).sum(1)
    out = []
    for start in range(0, queries.shape[0], block):
        q = queries[start:start + block].astype(xp.float64)
        d2 = (q * q).sum(1)[:, None] + p_sq[None, :] - 2.0 * (q @ p.T)
        if exclude_self:
            rows = xp.arange(q.shape[0])
            d2[rows, rows + start] = xp.inf
        out.append(xp.sqrt(xp.maximum(d2.min(1), 0.0)))
    if not out:
        return np.zeros(0, dtype=np.float64)
    return to_numpy(xp.concatenate(out)).astype(np.float64)


def reference_spacing(points, *, block: int = DEFAULT_BLOCK) -> float:
    """The median leave-one-out nearest-neighbour distance of the real latents (N >= 2, not all equal)."""
    s = nearest_distances(points, points, exclude_self=True, block=block)
    spacing = float(np.median(s))
    if spacing <= 0.0:
        positive = s[s > 0]
        if positive.size == 0:
            raise ValueError("points are all identical: no spacing to measure health against")
        spacing = float(np.median(positive))
    return spacing


def health_scores(latents, points, spacing: float | None = None, *, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """(n,) score of each generated latent (n, D) against the class's real latents ``points`` (N, D):
    distance to the nearest real latent divided by ``spacing`` (``reference_spacing(points)`` if None)."""
    if spacing is None:
        spacing = reference_spacing(points, block=block)
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return nearest_distances(latents, points, block=block) / float(spacing)


def flag(scores, threshold: float) -> np.ndarray:
    """Boolean (n,): which scores exceed ``threshold`` (> 0)."""
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    return np.asarray(scores, dtype=np.float64) > float(threshold)
