"""CPU benchmark of the numerical core (issue 2): tangent bases and divisive clustering.

1. Tangent basis at D = 4,096, K = 12, d = 3: ``ops.tangent.tangent_basis`` (thin SVD of the centred
   K x D neighbours) against ``numpy.linalg.eigh`` of the full D x D covariance, which is what the public
   ManifoldGD code computes per image per step. Covariance build included on the eigh side; the two
   subspaces are checked to agree.
2. Divisive clustering of 1,300 x 4,096 float32 (one ImageNet class of SD-VAE latents) to 50 leaves and
   of 10,000 x 4,096 to 100 leaves: ``ops.clustering.divisive_kmeans`` against scikit-learn's
   ``BisectingKMeans(bisecting_strategy="biggest_inertia")``, same seed, same threads; time (best of a
   few runs, wall clock) and SSE of the leaf partition (recomputed from the labels in float64 for both).
   Targets: time ratio <= 1.0, SSE ratio <= 1.02.

Data (no real latents ship with the project): a synthetic stand-in shaped like a class of latents, see
``latent_like``. Every figure comes from this one run.

    .venv/bin/python bench/ops.py        # about 1 minute on 2 idle cores
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.cluster import BisectingKMeans  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from ops.clustering import divisive_kmeans  # noqa: E402


def latent_like(n: int, d: int = 4096, modes: int = 30, rank: int = 8, seed: int = 0) -> np.ndarray:
    """A class-of-latents stand-in: a Gaussian mixture whose modes have their own low-rank structure.

    ``modes`` mode centres ~ N(0, 0.6^2 I); each mode adds its own rank-``rank`` Gaussian factor
    (scale 1.5 per direction) and isotropic noise N(0, 0.8^2 I). Per-coordinate std ~1.1, like SD-VAE
    latents times 0.18215; modes overlap (centre gaps ~ 1.2 x noise radius), so k-means has work to do.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, d), dtype=np.float32) * 0.6
    label = rng.integers(0, modes, n)
    X = rng.standard_normal((n, d), dtype=np.float32) * 0.8
    for m in range(modes):
        rows = np.flatnonzero(label == m)
        factor = rng.standard_normal((rank, d), dtype=np.float32) * (1.5 / np.sqrt(rank))
        X[rows] += centres[m] + rng.standard_normal((rows.size, rank), dtype=np.float32) @ factor
    return X


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def partition_sse(X: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for k in np.unique(labels):
        rows = X[labels == k].astype(np.float64)
        total += float(((rows - rows.mean(axis=0)) ** 2).sum())
    return total


def bench_tangent(D: int = 4096, K: int = 12, dim: int = 3) -> None:
    from ops.tangent import tangent_basis

    rng = np.random.default_rng(0)
    neighbours = (rng.standard_normal((K, D)) * np.linspace(2.0, 0.5, D)).astype(np.float32)

    def public_way():
        centred = neighbours - neighbours.mean(axis=0)
        cov = centred.T @ centred / (K - 1)          # D x D
        _, vecs = np.linalg.eigh(cov)                # ascending eigenvalues
        return vecs[:, ::-1][:, :dim]

    t_ours, ours = best_time(lambda: tangent_basis(neighbours, dim), 200)
    t_eigh, ref = best_time(public_way, 1)
    cosines = np.linalg.svd(ours.T.astype(np.float64) @ ref.astype(np.float64), compute_uv=False)
    angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))
    print(f"(a) tangent basis, D={D}, K={K}, d={dim}, float32")
    print(f"    ops.tangent.tangent_basis (thin SVD)   {t_ours * 1e3:10.3f} ms  (best of 200)")
    print(f"    covariance + numpy.linalg.eigh (DxD)   {t_eigh * 1e3:10.1f} ms  (1 run)")
    print(f"    ratio eigh / ours                      {t_eigh / t_ours:10.0f} x")
    print(f"    largest principal angle between the two subspaces: {angle:.2e} degrees")


def bench_clustering(X: np.ndarray, leaves: int, modes: int, repeats: int, threads: int | None) -> None:
    with threadpool_limits(threads):
        _bench_clustering(X, leaves, modes, repeats, "all" if threads is None else str(threads))


def _bench_clustering(X, leaves, modes, repeats, threads) -> None:
    n = X.shape[0]
    t_ours, (labels, _) = best_time(lambda: divisive_kmeans(X, leaves, seed=0), repeats)
    t_ref, model = best_time(lambda: BisectingKMeans(leaves, bisecting_strategy="biggest_inertia",
                                                     random_state=0).fit(X), repeats)
    sse_ours, sse_ref = partition_sse(X, labels), partition_sse(X, model.labels_)
    print(f"    {n:6d} x {X.shape[1]} -> {leaves:3d} leaves ({modes} modes), threads {threads:>3}: "
          f"ours {t_ours:6.3f} s  sklearn {t_ref:6.3f} s  time ratio {t_ours / t_ref:5.2f}   "
          f"SSE ours {sse_ours:.5g}  sklearn {sse_ref:.5g}  SSE ratio {sse_ours / sse_ref:.4f}")


def main() -> None:
    print(f"python {platform.python_version()}, numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    try:
        bench_tangent()
    except ImportError as err:  # ops.tangent is another session's file; the clustering part still runs
        print(f"(a) tangent basis: skipped, {err}")
    print("(b) divisive clustering, synthetic latent-like data (bench/ops.py:latent_like), float32, "
          "wall clock, best of the repeats")
    # Threads "all" (2 here) is the target; 1 thread as well, because on a busy shared box multi-threaded
    # BLAS / OpenMP spin-wait and the 2-thread figures of both sides swing by 10x from run to run.
    for n, leaves, modes, repeats in ((1300, 50, 30, 5), (10000, 100, 60, 2)):
        X = latent_like(n, modes=modes, seed=n)
        for threads in (None, 1):
            bench_clustering(X, leaves, modes, repeats, threads)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
