"""Copy detection: how close are generated images to the training images they were made from?

Pure numpy on (N, D) arrays (flattened pixels or features; the caller names the space). For each query
image, the Euclidean distance to its nearest training image; as the reference, the same for every
training image against the rest of the training set (leave-one-out: how far apart real images of this
dataset naturally are); and the fraction of queries closer to a training image than any two training
images are to each other (nearest-neighbour distance < the minimum pairwise training distance), which a
set that only resembles the data should leave at 0, and a set of copies drives to 1.

Everything is chunked over both the queries and the training set, so an 8,000-image training set of
3,072-d pixels is never held as float64 or as an N x N matrix: the largest temporary is
``chunk x train_chunk`` distances plus one float32 block of the training set. The training set may be any
array-like that slices (uint8, float, np.memmap). Candidate neighbours are found with float32 products;
the distance reported for the chosen neighbour is then recomputed exactly in float64, so an exact copy
reads 0.0, not round-off.

    ref = CopyReference.of(train)          # the leave-one-out pass, once per training set and space
    report = copy_report(images, ref)      # per set of generated images; a dict of plain floats
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (5.0, 50.0)


def _flat(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, ...) array, got shape {x.shape}")
    return x.reshape(len(x), -1)


def nearest_train(queries, train, *, chunk: int = 512, train_chunk: int = 4096,
                  exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distance float64 (Q,), index int64 (Q,)) of each query's nearest training row, Euclidean.

    ``exclude_self``: the queries ARE the training set (same rows, same order); row i is not its own
    neighbour (excluded by index, so two identical training images still find each other at 0).
    """
    q_all, t_all = _flat(queries, "queries"), _flat(train, "train")
    if q_all.shape[1] != t_all.shape[1]:
        raise ValueError(f"sizes differ: queries {q_all.shape[1]}-d, train {t_all.shape[1]}-d")
    if exclude_self and len(q_all) != len(t_all):
        raise ValueError("exclude_self needs the queries to be the training set itself")
    if exclude_self and len(t_all) < 2:
        raise ValueError("leave-one-out needs at least 2 training rows")
    nq, nt = len(q_all), len(t_all)
    best_d2 = np.full(nq, np.inf)
    best_i = np.zeros(nq, dtype=np.int64)
    for t0 in range(0, nt, train_chunk):
        t = np.asarray(t_all[t0:t0 + train_chunk], dtype=np.float32)
        tn = (t.astype(np.float64) ** 2).sum(1)
        for q0 in range(0, nq, chunk):
            q = np.asarray(q_all[q0:q0 + chunk], dtype=np.float32)
            qn = (q.astype(np.float64) ** 2).sum(1)
            d2 = qn[:, None] + tn[None, :] - 2.0 * (q @ t.T).astype(np.float64)
            if exclude_self:
                rows = np.arange(q0, q0 + len(q))
                cols = rows - t0
                inside = (cols >= 0) & (cols < len(t))
                d2[np.nonzero(inside)[0], cols[inside]] = np.inf
            j = d2.argmin(1)
            dj = d2[np.arange(len(q)), j]
            better = dj < best_d2[q0:q0 + len(q)]
            best_d2[q0:q0 + len(q)][better] = dj[better]
            best_i[q0:q0 + len(q)][better] = j[better] + t0
    # exact distances to the chosen neighbours (float64, direct difference)
    dist = np.empty(nq)
    for q0 in range(0, nq, chunk):
        q = np.asarray(q_all[q0:q0 + chunk], dtype=np.float64)
        t = np.asarray(t_all[best_i[q0:q0 + len(q)]], dtype=np.float64)
        dist[q0:q0 + len(q)] = np.sqrt(((q - t) ** 2).sum(1))
    return dist, best_i


def summarise(distances, percentiles=PERCENTILES) -> dict[str, float]:
    """min, the given percentiles (``p5``, ``p50`` = median), mean and max of a set of distances."""
    d = np.asarray(distances, dtype=np.float64)
    out = {"min": float(d.min())}
    out.update({f"p{p:g}": float(np.percentile(d, p)) for p in percentiles})
    out.update(mean=float(d.mean()), max=float(d.max()))
    return out


@dataclass(frozen=True)
class CopyReference:
    """A training set with its own leave-one-out nearest-neighbour distances: computed once (the
    N x N pass is the expensive part), reused for every set of images compared with it."""

    train: np.ndarray          # (N, D) as given (not copied to float)
    train_nn: np.ndarray       # (N,) each training row's distance to its nearest other training row
    train_nn_index: np.ndarray  # (N,) that row

    @classmethod
    def of(cls, train, *, chunk: int = 512, train_chunk: int = 4096) -> CopyReference:
        t = _flat(train, "train")
        d, i = nearest_train(t, t, chunk=chunk, train_chunk=train_chunk, exclude_self=True)
        return cls(t, d, i)

    @property
    def min_pairwise(self) -> float:
        """The smallest distance between two training rows (0 when the set holds a duplicate)."""
        return float(self.train_nn.min())


def copy_report(images, reference: CopyReference, *, chunk: int = 512, train_chunk: int = 4096,
                percentiles=PERCENTILES) -> dict:
    """Nearest-training-image distances of ``images`` against ``reference`` (``CopyReference.of(train)``).

    Keys (all plain numbers, JSON-ready):
      ``n``, ``n_train``;
      ``nn``: min / p5 / p50 / mean / max of each image's distance to its nearest training image;
      ``train_nn``: the same for the training set against itself (leave-one-out): the reference;
      ``min_train_pair``: the smallest distance between two training images;
      ``frac_closer_than_any_train_pair``: fraction of images with nn < min_train_pair (a copy, or closer
        to one training image than the data ever puts two of its own; undefined, reported as None, when
        the training set holds a duplicate, min_train_pair = 0);
      ``frac_below_train_nn_p5``: fraction of images with nn below the 5th percentile of ``train_nn``;
      ``nn_ratio_median``: median nn / median train_nn (about 1 for new images drawn like the data,
        toward 0 for copies);
      ``closest``: up to 5 (image index, training index, distance), closest first, to look at.
    """
    d, idx = nearest_train(images, reference.train, chunk=chunk, train_chunk=train_chunk)
    ref = reference.train_nn
    threshold = reference.min_pairwise
    order = np.argsort(d, kind="stable")[:5]
    median_ref = float(np.median(ref))
    return {
        "n": int(len(d)),
        "n_train": int(len(ref)),
        "nn": summarise(d, percentiles),
        "train_nn": summarise(ref, percentiles),
        "min_train_pair": threshold,
        "frac_closer_than_any_train_pair": float((d < threshold).mean()) if threshold > 0 else None,
        "frac_below_train_nn_p5": float((d < np.percentile(ref, 5)).mean()),
        "nn_ratio_median": float(np.median(d) / median_ref) if median_ref > 0 else None,
        "closest": [[int(i), int(idx[i]), float(d[i])] for i in order],
    }
