"""Distances between a real and a synthetic set of feature vectors: Frechet (FID), l2 of the means, MMD.

Two MMDs, kept apart by name because their numbers are not comparable:

- ``mmd2_rbf`` (alias ``mmd_biased_sq``), key ``mmd2``: the biased (V-statistic) MMD^2 with
  k = exp(-d^2 / (2 h^2)), h^2 = the median squared pairwise distance; no square root. This project's.
- ``mmd_paper``, key ``mmd_paper``: the square root of the unbiased (U-statistic) MMD^2 with
  k = exp(-gamma d^2), gamma = 1 / median squared pairwise distance (so twice the gamma above): what the
  public MGD3 / ManifoldGD evaluation code reports (per the issue that asked for it; the median is taken
  over the distinct pairs of the pooled set here, as for ``mmd2``). The unbiased MMD^2 can be negative
  (two samples of one distribution give values on both sides of 0); its square root is taken of
  max(MMD^2, 0), and the signed value is reported beside it (``mmd2_unbiased``).

Pure numpy on (N, D) arrays; the caller chooses the feature extractor (pipeline/eval/features.py) and must name
it beside every number, since none of these values means anything without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) with the unbiased (N - 1) normalisation, as the FID reference code.

    A single vector has no spread: its covariance is zero rather than NaN.
    """
    x = _as_features(features, "features")
    mu = x.mean(axis=0)
    if x.shape[0] < 2:
        return mu, np.zeros((x.shape[1], x.shape[1]))
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) positive semi-definite matrix; tiny negative eigenvalues
    from round-off are clipped to zero."""
    sym = (sigma + sigma.T) / 2
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as the trace of (A S2 A)^(1/2) with A = S1^(1/2): that matrix is
    symmetric PSD and has the same eigenvalues as S1 S2, so two symmetric eigendecompositions replace the
    general (and, for rank-deficient covariances of small synthetic sets, unstable) scipy.linalg.sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    cross = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((cross + cross.T) / 2)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    return float(max(value, 0.0))  # round-off can leave -1e-12 for identical sets


@dataclass(frozen=True)
class GaussianReference:
    """The real set's Gaussian, with its covariance square root: computed once, reused for every
    synthetic set compared with it (the D x D eigendecomposition is the expensive part of FID)."""

    mu: np.ndarray
    sigma: np.ndarray
    root: np.ndarray

    @classmethod
    def of(cls, features) -> GaussianReference:
        mu, sigma = gaussian_stats(features)
        return cls(mu, sigma, _psd_sqrt(sigma))


def fid(real, synthetic, reference: GaussianReference | None = None) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception-v3 pool features). ``reference``: the real set's precomputed Gaussian (``real`` is then unused).

    A synthetic set of n < D vectors has a covariance Y^T Y of rank < n: the non-zero eigenvalues of
    A Y^T Y A (A = S_real^(1/2)) are those of the n x n matrix (Y A)(Y A)^T, so the trace of the square root
    costs an n x n eigendecomposition instead of a D x D one.
    """
    ref = reference or GaussianReference.of(real)
    y = _as_features(synthetic, "synthetic")
    if y.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"feature sizes differ: {ref.mu.shape[0]} vs {y.shape[1]}")
    mu2 = y.mean(axis=0)
    n = y.shape[0]
    if n < 2:
        tr_sigma2 = tr_sqrt = 0.0
    else:
        yc = (y - mu2) / np.sqrt(n - 1)  # sigma2 = yc^T yc
        tr_sigma2 = float((yc * yc).sum())
        if n < y.shape[1]:
            m = yc @ ref.root
            w = np.linalg.eigvalsh(m @ m.T)
        else:
            cross = ref.root @ (yc.T @ yc) @ ref.root
            w = np.linalg.eigvalsh((cross + cross.T) / 2)
        tr_sqrt = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = ref.mu - mu2
    value = diff @ diff + np.trace(ref.sigma) + tr_sigma2 - 2 * tr_sqrt
    return float(max(value, 0.0))


def mean_l2(real, synthetic) -> float:
    """Euclidean distance between the mean embeddings of the two sets."""
    a, b = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def median_sq_distance(real, synthetic) -> float:
    """Median squared Euclidean distance over the pooled set (distinct pairs, zero distances ignored);
    1.0 when every point coincides."""
    pooled = np.concatenate([_as_features(real, "real"), _as_features(synthetic, "synthetic")])
    d2 = _squared_distances(pooled, pooled)[np.triu_indices(len(pooled), k=1)]
    d2 = d2[d2 > 0]
    return float(np.median(d2)) if d2.size else 1.0


def median_bandwidth(real, synthetic) -> float:
    """Median pairwise Euclidean distance over the pooled set (distinct pairs, zero distances ignored).

    The usual heuristic: it puts the kernel's length scale where most pairs are, so the kernel neither
    saturates at 0 nor at 1. Falls back to 1.0 when every point coincides.
    """
    return float(np.sqrt(median_sq_distance(real, synthetic)))


def mmd2_rbf(real, synthetic, bandwidth: float | None = None) -> float:
    """Squared MMD with the kernel k(x, y) = exp(-||x - y||^2 / (2 bandwidth^2)), biased (V-statistic)
    estimate: >= 0, and exactly 0 for identical sets. ``bandwidth`` None = median heuristic."""
    a, b = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    h = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be positive, got {h}")
    gamma = 1.0 / (2 * h * h)
    kaa = np.exp(-gamma * _squared_distances(a, a)).mean()
    kbb = np.exp(-gamma * _squared_distances(b, b)).mean()
    kab = np.exp(-gamma * _squared_distances(a, b)).mean()
    return float(max(kaa + kbb - 2 * kab, 0.0))


mmd_biased_sq = mmd2_rbf  # the name that says what it is, beside mmd_paper


def mmd2_unbiased_rbf(real, synthetic, gamma: float) -> float:
    """Unbiased (U-statistic) MMD^2 with k(x, y) = exp(-gamma ||x - y||^2):

        sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
        - 2 sum_{i, j} k(x_i, y_j) / (m n)

    Signed: it is an unbiased estimate of a non-negative number, so it falls below 0 when the two sets are
    close. Needs at least 2 vectors in each set."""
    a, b = _as_features(real, "real"), _as_features(synthetic, "synthetic")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 vectors per set, got {m} and {n}")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    kaa = np.exp(-gamma * _squared_distances(a, a))
    kbb = np.exp(-gamma * _squared_distances(b, b))
    kab = np.exp(-gamma * _squared_distances(a, b))
    # the diagonals are exp(0) = 1 exactly (squared distances of a point to itself may round to 1e-13)
    xx = (kaa.sum() - np.trace(kaa)) / (m * (m - 1))
    yy = (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
    return float(xx + yy - 2 * kab.mean())


def mmd_paper(real, synthetic, gamma: float | None = None) -> float:
    """The public MGD3 / ManifoldGD code's MMD: sqrt(max(unbiased MMD^2, 0)) with an RBF kernel
    exp(-gamma d^2), ``gamma`` None = 1 / median squared pairwise distance of the pooled set."""
    g = 1.0 / median_sq_distance(real, synthetic) if gamma is None else float(gamma)
    return float(np.sqrt(max(mmd2_unbiased_rbf(real, synthetic, g), 0.0)))


def distribution_metrics(real, synthetic, reference: GaussianReference | None = None) -> dict[str, float]:
    """FID-style Frechet distance, l2 of the means, this project's MMD^2 and the paper's MMD.

    Keys: ``fid``, ``mean_l2``; ``mmd2`` = biased MMD^2, kernel exp(-d^2 / (2 h^2)), with ``mmd_bandwidth`` = h
    (median pairwise distance); ``mmd_paper`` = sqrt of the unbiased MMD^2 clipped at 0, kernel
    exp(-gamma d^2) with ``mmd_paper_gamma`` = 1 / median squared distance, and ``mmd2_unbiased`` = that
    unbiased MMD^2 before clipping (None when a set has fewer than 2 vectors).
    ``reference``: ``GaussianReference.of(real)``, when many sets are compared with the same real one."""
    med = median_sq_distance(real, synthetic)
    h = float(np.sqrt(med))
    out = {"fid": fid(real, synthetic, reference), "mean_l2": mean_l2(real, synthetic),
           "mmd2": mmd2_rbf(real, synthetic, h), "mmd_bandwidth": h,
           "mmd_paper": None, "mmd2_unbiased": None, "mmd_paper_gamma": 1.0 / med}
    if len(np.asarray(real)) >= 2 and len(np.asarray(synthetic)) >= 2:
        u = mmd2_unbiased_rbf(real, synthetic, 1.0 / med)
        out.update(mmd_paper=float(np.sqrt(max(u, 0.0))), mmd2_unbiased=u)
    return out
