"""One class's stage-2 plan: the divisive tree, the IPC centroids and their local tangent bases.

Pure numerics over ``ops`` (numpy or CuPy), no Ray and no I/O: ``pipeline.distill.plan`` runs it in one Ray
task per class, and ``bench/gpu.py`` times it on a machine without Ray.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from ops.backend import array_module, resolve_backend, to_numpy
from ops.bases import pad_basis
from ops.selection import select_ipc_nodes
from ops.tangent import (
    annealed_bases,
    default_radius,
    neighbourhood,
    tangent_basis,
    tangent_basis_by_variance,
)

if TYPE_CHECKING:
    from pipeline.config import DistillConfig


def guided_steps(num_steps: int, t_stop: int) -> int:
    """Guided steps are the respaced indices i = num_steps-1 ... t_stop+1 (i > t_stop): the first
    num_steps-1-t_stop."""
    return max(0, num_steps - 1 - t_stop)


def _basis(points, dim: int, variance_fraction: float, route: str):
    if variance_fraction > 0:
        return tangent_basis_by_variance(points, variance_fraction, max_dim=dim, route=route)
    return tangent_basis(points, dim, route=route)


def tangent_plan(X, centroid, members, cfg: DistillConfig, n_steps: int):
    """(bases (M, D, dim), step_index (n_steps,)) for one centroid, per the configured neighbourhood.

    ``X`` and ``centroid`` on the backend's device (numpy or CuPy); the result is on the host."""
    t = cfg.tangent
    xp = array_module(X)
    dim = min(t.dim, X.shape[0] - 1)
    if dim < 1:  # a single distinct image: no direction to follow, guidance becomes zero
        return np.zeros((1, X.shape[1], t.dim), np.float32), np.zeros(n_steps, np.int64)
    if t.neighbourhood == "radius" and t.variance_fraction == 0:
        radius = default_radius(X, centroid, t.neighbours)
        if radius > 0:
            bases, index = annealed_bases(X, centroid, dim=dim, radius=radius, n_steps=max(n_steps, 1),
                                          warm_steps=t.warm_steps, schedule=t.schedule,
                                          max_multiplier=t.max_multiplier, max_neighbours=t.max_neighbours,
                                          route=t.route)
            stacked = xp.stack([pad_basis(b, t.dim) for b in bases]).astype(xp.float32)
            return to_numpy(stacked), to_numpy(index)[:n_steps]
    if t.neighbourhood == "node" and len(members) > dim:
        points = X[xp.asarray(members)]
    else:
        points = X[neighbourhood(X, centroid, 0.0, min_count=min(max(t.neighbours, dim + 1), X.shape[0]))]
    basis = pad_basis(_basis(points, dim, t.variance_fraction, t.route), t.dim).astype(xp.float32)
    return to_numpy(basis)[None], np.zeros(n_steps, np.int64)


def plan_class(X: np.ndarray, cfg: DistillConfig) -> dict:
    """Centroids and tangent bases for one class's latents (N, D), on ``cluster.backend``'s device; the
    plan comes back on the host."""
    c = cfg.cluster
    backend = resolve_backend(c.backend)
    Xd = backend.asarray(X)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_ipc_nodes(Xd, cfg.ipc, method=c.method, branching=c.branching,
                               start_level=None if c.start_level < 0 else c.start_level,
                               centroid=c.centroid, seed=cfg.seed, backend=backend)
    n_steps = guided_steps(cfg.sampler.num_steps, cfg.sampler.t_stop)
    bases, offsets, steps = [], [0], []
    for i in range(cfg.ipc):
        b, idx = tangent_plan(Xd, sel.centroids[i], sel.members[i], cfg, n_steps)
        bases.append(b)
        offsets.append(offsets[-1] + len(b))
        steps.append(idx)
    return {
        "centroids": to_numpy(sel.centroids).astype(np.float32),
        "node_ids": np.asarray(sel.node_ids, dtype=np.int64),
        "levels": np.asarray(sel.levels, dtype=np.int64),
        "repeated": np.asarray(bool(sel.repeated)),
        "n_unique": np.asarray(int(sel.n_unique)),
        "n_images": np.asarray(X.shape[0]),
        "bases": np.concatenate(bases).astype(np.float32),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "step_index": np.stack(steps).astype(np.int64).reshape(cfg.ipc, n_steps),
        "backend": np.asarray(backend.name),
        "warnings": np.asarray([str(w.message) for w in caught], dtype=str),
    }


def expand_bases(plan: dict) -> np.ndarray:
    """(n, S, D, d) per-sample, per-guided-step bases from the compact per-class plan."""
    offsets, step_index = plan["offsets"], plan["step_index"]
    flat = offsets[:-1, None] + step_index
    return plan["bases"][flat]
