"""Stage 2: per class, the divisive tree, the IPC centroids and their local tangent bases.

One Ray task per class reads only that class's latents (parquet partition), so the driver never holds
all latents. Output: ``_work/centroids/<class>.npz`` written atomically; an existing file is reused.
"""
from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray

from ops.clustering import select_ipc_nodes
from ops.tangent import (
    annealed_bases,
    default_radius,
    neighbourhood,
    tangent_basis,
    tangent_basis_by_variance,
)
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_bytes
from pipeline.config import DistillConfig

log = get_logger().info

def guided_steps(num_steps: int, t_stop: int) -> int:
    """Guided steps are respaced indices t = num_steps-1 ... t_stop+1: the first num_steps-1-t_stop."""
    return max(0, num_steps - 1 - t_stop)


def read_class_latents(latents_dir: Path, class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, latents (N, D) float32) of the class's successfully encoded images."""
    part = pds.partitioning(pa.schema([("class_name", pa.string())]), flavor="hive")
    # Open only this class's folder (named with the writer's escaping): listing the whole dataset per
    # class made stage 2 O(classes x files) (bench/scale.py, docs/scale.md).
    folder = Path(latents_dir) / part.format(pc.field("class_name") == class_name)[0]
    if not folder.is_dir():
        return np.asarray([], dtype=object), np.zeros((0, 0), dtype=np.float32)
    ds = pds.dataset(str(folder), format="parquet")
    table = ds.to_table(columns=["id", "latent"], filter=pc.field("error") == "")
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    if len(ids) == 0:
        return ids, np.zeros((0, 0), dtype=np.float32)
    latents = np.stack([np.asarray(v, dtype=np.float32) for v in table.column("latent").to_pylist()])
    order = np.argsort(ids, kind="stable")  # Ray's block order must not change a result
    return ids[order], latents[order]


def _basis(points, dim: int, variance_fraction: float):
    if variance_fraction > 0:
        return tangent_basis_by_variance(points, variance_fraction, max_dim=dim)
    return tangent_basis(points, dim)


def _pad(basis: np.ndarray, dim: int) -> np.ndarray:
    """Zero columns leave U U^T unchanged, so bases of different rank can share one array."""
    out = np.zeros((basis.shape[0], dim), dtype=np.float32)
    out[:, : basis.shape[1]] = basis
    return out


def tangent_plan(X: np.ndarray, centroid: np.ndarray, members: np.ndarray, cfg: DistillConfig, n_steps: int):
    """(bases (M, D, dim), step_index (n_steps,)) for one centroid, per the configured neighbourhood."""
    t = cfg.tangent
    dim = min(t.dim, X.shape[0] - 1)
    if dim < 1:  # a single distinct image: no direction to follow, guidance becomes zero
        return np.zeros((1, X.shape[1], t.dim), np.float32), np.zeros(n_steps, np.int64)
    if t.neighbourhood == "radius" and t.variance_fraction == 0:
        radius = default_radius(X, centroid, t.neighbours)
        if radius > 0:
            bases, index = annealed_bases(X, centroid, dim=dim, radius=radius, n_steps=max(n_steps, 1),
                                          warm_steps=t.warm_steps, schedule=t.schedule,
                                          max_multiplier=t.max_multiplier, max_neighbours=t.max_neighbours)
            return np.stack([_pad(b, t.dim) for b in bases]), index[:n_steps]
    if t.neighbourhood == "node" and len(members) > dim:
        points = X[members]
    else:
        points = X[neighbourhood(X, centroid, 0.0, min_count=min(max(t.neighbours, dim + 1), X.shape[0]))]
    return _pad(_basis(points, dim, t.variance_fraction), t.dim)[None], np.zeros(n_steps, np.int64)


def plan_class(X: np.ndarray, cfg: DistillConfig) -> dict:
    """Centroids and tangent bases for one class's latents (N, D)."""
    c = cfg.cluster
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select_ipc_nodes(X, cfg.ipc, method=c.method, branching=c.branching,
                               start_level=None if c.start_level < 0 else c.start_level,
                               centroid=c.centroid, seed=cfg.seed)
    n_steps = guided_steps(cfg.sampler.num_steps, cfg.sampler.t_stop)
    bases, offsets, steps = [], [0], []
    for i in range(cfg.ipc):
        b, idx = tangent_plan(X, sel.centroids[i], sel.members[i], cfg, n_steps)
        bases.append(b)
        offsets.append(offsets[-1] + len(b))
        steps.append(idx)
    return {
        "centroids": np.asarray(sel.centroids, dtype=np.float32),
        "node_ids": np.asarray(sel.node_ids, dtype=np.int64),
        "levels": np.asarray(sel.levels, dtype=np.int64),
        "repeated": np.asarray(bool(sel.repeated)),
        "n_unique": np.asarray(int(sel.n_unique)),
        "n_images": np.asarray(X.shape[0]),
        "bases": np.concatenate(bases).astype(np.float32),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "step_index": np.stack(steps).astype(np.int64).reshape(cfg.ipc, n_steps),
        "warnings": np.asarray([str(w.message) for w in caught], dtype=str),
    }


def expand_bases(plan: dict) -> np.ndarray:
    """(n, S, D, d) per-sample, per-guided-step bases from the compact per-class plan."""
    offsets, step_index = plan["offsets"], plan["step_index"]
    flat = offsets[:-1, None] + step_index
    return plan["bases"][flat]


def run_class(latents_dir: str, class_name: str, cfg: DistillConfig, out_path: str) -> dict:
    """Compute and save one class's plan (reused when it exists). Returns a small summary."""
    out = Path(out_path)
    start = time.perf_counter()
    if not out.exists():
        _, X = read_class_latents(Path(latents_dir), class_name)
        if X.shape[0] == 0:
            return {"class_name": class_name, "n_images": 0, "skipped": True, "seconds": 0.0}
        plan = plan_class(X, cfg)
        buf = io.BytesIO()
        np.savez(buf, **plan)
        atomic_write_bytes(out, buf.getvalue())
    with np.load(out) as plan:
        summary = {"class_name": class_name, "n_images": int(plan["n_images"]), "skipped": False,
                   "repeated": bool(plan["repeated"]), "warnings": [str(w) for w in plan["warnings"]]}
    summary["seconds"] = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------- the stage driver
def submit_plans(cfg: DistillConfig, classes: list[str], out: OutputDir) -> dict:
    """Submit one plan task per class, in the given order; returns {ref: class name}. The distill driver
    hands these to stage 3, which starts sampling units as their plans complete (overlapped stages)."""
    task = ray.remote(num_cpus=1)(run_class)
    return {task.remote(str(out.latents), c, cfg, str(out.centroid_file(c))): c for c in classes}


def log_plan_warnings(result: dict) -> None:
    for w in result.get("warnings", []):
        log(f"plan: class {result['class_name']}: {w}")


def plan_stage(cfg: DistillConfig, classes: list[str], out: OutputDir) -> list[dict]:
    """Stage 2 on its own (a barrier): every class's plan, in class order."""
    results = ray.get(list(submit_plans(cfg, classes, out)))
    for r in results:
        log_plan_warnings(r)
    return results
