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
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_bytes
from pipeline.config import DistillConfig

log = get_logger().info

def guided_steps(num_steps: int, t_stop: int) -> int:
    """Guided steps are the respaced indices i = num_steps-1 ... t_stop+1 (i > t_stop): the first
    num_steps-1-t_stop."""
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
    latents = latent_matrix(table.column("latent"))
    order = np.argsort(ids, kind="stable")  # Ray's block order must not change a result
    return ids[order], latents[order]


def latent_matrix(column) -> np.ndarray:
    """A parquet column of equal-length float lists (or Ray's tensor extension over one) as (N, D) float32.

    Reads the flat value buffer in one go: for a 1,300 x 4,096 class, 0.015 s against 1.22 s row by row
    through Python lists (`python bench/latent_read.py`, 2026-11-30, same values)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    n = len(arr)
    values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n == 0 or values.size % n:
        raise ValueError(f"latent rows of unequal length: {values.size} values in {n} rows")
    return values.reshape(n, -1)


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
                   "repeated": bool(plan["repeated"]), "warnings": [str(w) for w in plan["warnings"]],
                   "backend": str(plan["backend"]) if "backend" in plan.files else "numpy"}
    summary["seconds"] = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------------------- the stage driver
def plan_task_options(cfg: DistillConfig, cluster_gpus: float) -> dict:
    """Ray resources of one plan task: a CPU, and ``runtime.gpus_per_plan_task`` of a GPU where stages use
    GPUs (runtime.device cuda, or auto on a cluster that has one)."""
    gpus = cfg.runtime.gpus_per_plan_task if cfg.runtime.use_gpu(cluster_gpus) else 0
    return {"num_cpus": 1, "num_gpus": gpus}


def submit_plans(cfg: DistillConfig, classes: list[str], out: OutputDir) -> dict:
    """Submit one plan task per class, in the given order; returns {ref: class name}. The distill driver
    hands these to stage 3, which starts sampling units as their plans complete (overlapped stages). Where
    stages use GPUs (runtime.device), each task asks for ``runtime.gpus_per_plan_task`` of one, so that
    ``cluster.backend`` auto finds a device there (and an autoscaler knows stage 2 wants GPU nodes)."""
    task = ray.remote(**plan_task_options(cfg, ray.cluster_resources().get("GPU", 0)))(run_class)
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
