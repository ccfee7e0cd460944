"""Principal directions of a small neighbourhood (K points in D dimensions, K << D): two routes.

- ``svd``: thin SVD of the centred (K, D) matrix in its own dtype. O(K^2 D), LAPACK ``gesdd`` on the
  host, cuSOLVER ``gesvd`` on a GPU.
- ``gram``: eigendecomposition of the centred K x K Gram matrix G = Y Y^T, then back to R^D:
  G = E diag(s^2) E^T  =>  the right singular vectors are V = Y^T E diag(1/s). Also O(K^2 D), but the work
  is two matrix products (which GPUs and BLAS run at full speed) and a K x K ``eigh``. Computed in float64
  whatever the input dtype: the Gram matrix squares the condition number, and in float64 a direction whose
  singular value is 1e-5 of the largest still comes out to about 1e-6 rad; at K x K and K x D the extra
  precision is nearly free.

Both routes use one rule for rank: a direction whose singular value is at most ``rank_rtol`` times the
largest, or at most 4 K eps ||X||_F (eps of the input dtype, X the uncentred points: the rounding left by
centring identical points), is treated as absent and returned as a zero column with singular value 0
(K points span at most K - 1 directions once centred; duplicates span fewer). Zero columns leave the projector U U^T
unchanged, so a basis that asks for more directions than the neighbourhood has simply projects onto
the ones it has, and both routes agree on it. Signs of the columns are arbitrary (only U U^T matters).

Arrays: numpy or CuPy in, the same out (``xp`` from the input).
"""
from __future__ import annotations

import numpy as np

from ops.backend import array_module, check_finite_matrix, to_numpy

ROUTES = ("svd", "gram")
# Singular values at or below this fraction of the largest count as zero. Float32 SVD noise on an exactly
# rank-deficient matrix sits near 1e-7 relative, float64 Gram noise near 1e-8: 1e-5 leaves a wide margin,
# and a direction carrying 1e-10 of the variance is no tangent direction worth following.
DEFAULT_RANK_RTOL = 1e-5


def principal_directions(points, max_dim: int | None = None, *, route: str = "svd",
                         rank_rtol: float = DEFAULT_RANK_RTOL):
    """Singular values and principal directions of the centred rows of ``points`` (K, D).

    Returns ``(s, V)``: ``s`` (r,) in descending order and ``V`` (D, r) with orthonormal columns (zero
    columns where ``s`` is 0 by the rank rule), r = min(K, D, max_dim). ``s`` is float64 for ``gram``,
    the input's dtype for ``svd``; ``V`` has the input's float dtype.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if not 0.0 <= float(rank_rtol) < 1.0:
        raise ValueError(f"rank_rtol must be in [0, 1), got {rank_rtol}")
    check_finite_matrix(points, "neighbours")
    xp = array_module(points)
    if points.dtype not in (xp.float32, xp.float64):
        points = points.astype(xp.float64)
    k, d = points.shape
    r = min(k, d) if max_dim is None else min(k, d, int(max_dim))
    if route == "svd":
        centred = points - xp.mean(points, axis=0, keepdims=True)
        _, s, vt = xp.linalg.svd(centred, full_matrices=False)
        s, v = s[:r], vt[:r].T
    else:
        s, v = _gram_directions(points, r)
    floor = 4.0 * k * float(np.finfo(points.dtype).eps) * float(xp.linalg.norm(points))
    return _drop_null_directions(s, v, rank_rtol, floor)


def _gram_directions(points, r: int):
    """Top-r (s, V) by the K x K Gram route, in float64, V cast back to the input dtype."""
    xp = array_module(points)
    y = points.astype(xp.float64)
    y = y - xp.mean(y, axis=0, keepdims=True)
    gram = y @ y.T
    gram = (gram + gram.T) * 0.5  # exactly symmetric, whatever the GEMM did
    w, e = xp.linalg.eigh(gram)  # ascending
    w = w[::-1][:r]
    e = e[:, ::-1][:, :r]
    s = xp.sqrt(xp.maximum(w, 0.0))
    safe = xp.where(s > 0, s, 1.0)
    v = (y.T @ e) / safe[None, :]
    return s, v.astype(points.dtype)


def _drop_null_directions(s, v, rank_rtol: float, floor: float):
    """Zero the directions the rank rule calls absent (see the module docstring)."""
    if s.shape[0] == 0:
        return s, v
    threshold = max(rank_rtol * float(s[0]), floor)
    keep = s > threshold
    return s * keep.astype(s.dtype), v * keep[None, :].astype(v.dtype)  # x * 1 is x exactly


def numerical_rank(s) -> int:
    """How many directions ``principal_directions`` kept (its non-zero singular values)."""
    return int((s > 0).sum())


def largest_principal_angle(a, b) -> float:
    """Largest principal angle (radians) between span(a) and span(b), both (D, d) orthonormal columns.

    Host float64 arithmetic on small d x d matrices; for tests and benchmarks.
    """
    a64, b64 = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    if a64.shape[1] != b64.shape[1]:
        raise ValueError(f"subspaces of different dimension: {a64.shape[1]} and {b64.shape[1]}")
    # sin of the largest angle = the spectral norm of the part of b outside span(a); accurate for small
    # angles, where arccos of the cosines would bottom out near 1e-8.
    residual = b64 - a64 @ (a64.T @ b64)
    sine = np.linalg.svd(residual, compute_uv=False).max()
    return float(np.arcsin(min(sine, 1.0)))
