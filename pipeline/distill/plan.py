"""Stage 2: per class, the divisive tree, the IPC centroids and their local tangent bases
(``pipeline.distill.class_plan.plan_class``, which has no Ray; this module runs it as Ray tasks).

One Ray task per class reads only that class's latents (parquet partition), so the driver never holds
all latents. Output: ``_work/centroids/<class>.npz`` written atomically; an existing file is reused.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray

from pipeline.common.device import cupy_device
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_bytes
from pipeline.config import DistillConfig
from pipeline.distill.class_plan import expand_bases, guided_steps, plan_class, tangent_plan  # noqa: F401 - re-exported

log = get_logger().info


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


def run_class(latents_dir: str, class_name: str, cfg: DistillConfig, out_path: str) -> dict:
    """Compute and save one class's plan (reused when it exists). Returns a small summary."""
    out = Path(out_path)
    start = time.perf_counter()
    worker = None  # a plan found on disk (a resumed run) used no device in this run
    if not out.exists():
        # Given a GPU share CuPy cannot use: an error under runtime.device=cuda, a warning under auto
        worker = cupy_device("plan", cfg.runtime.device, cfg.cluster.backend)
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
    summary["worker"] = worker.record() if worker else None
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
