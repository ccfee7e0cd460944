"""Stage 3: work units, the sampling actor that runs them, and each class's finalize.

Work units. The samples to make are the (class, k) pairs of every class, classes in label order, each
class's k = 0 .. IPC-1 in order, concatenated and cut into chunks of ``sampler.max_batch`` (with
``sampler.units: per_class`` each class is chunked on its own). One unit is one sampling call: up to
max_batch rows from as many classes as needed, each row with its own label, centroid and tangent-basis
index. The units are a function of the config and the class list only, never of scheduling, and noise is
a pure function of (seed, class, k), so a rerun, a resume and a run that lost a node give identical bytes.
A unit's id is its position plus a digest of its rows (``u000012-3fa9c1d2``): a record left by a
different cut can never be mistaken for it.

Who writes what, in order (every file written atomically: temp file + rename):
  1. the actor running a unit writes the unit's PNGs, then ``_work/units/<unit id>.parquet`` (its manifest
     rows): a unit is done when that file exists and every PNG it lists exists;
  2. the driver, once every unit covering a class is done, removes temp files that a killed writer left
     in the class folder, writes the class's manifest part from those unit files, then
     ``train/<class>/_SUCCESS``. Only the driver writes these, and writing them twice
     writes the same bytes, so a crash between any two writes is repaired by the next run.

Which actor runs which unit, retries, and the overlap with stage 2 are the scheduler's
(``pipeline/distill/schedule.py``).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from ops.guidance import BASIS_MODES
from pipeline.common.device import torch_device
from pipeline.common.images import png_bytes
from pipeline.common.log import get_logger
from pipeline.common.outputs import SUCCESS, OutputDir, atomic_write_bytes, atomic_write_table, sha256_bytes
from pipeline.config import build_config
from pipeline.distill.health import HEALTH_COLUMNS, HealthCheck
from pipeline.models.refs import load_model
from pipeline.models.sampler import GuidedSampler, SamplerConfig

log = get_logger().info

MANIFEST_COLUMNS = ("class", "label", "k", "seed", "path", "centroid_node", "centroid_level",
                    "repeated_centroid", "guidance", "cluster", "model", "vae", "config_hash", "sha256",
                    *HEALTH_COLUMNS)
PLAN_CACHE = 16  # plans an actor keeps loaded (a unit spans few classes unless IPC is small)


# ------------------------------------------------------------------------------------ work units
@dataclass(frozen=True)
class Unit:
    index: int
    uid: str
    rows: tuple  # ((class_name, label, k), ...)

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(r[0] for r in self.rows))

    def to_dict(self) -> dict:
        return {"uid": self.uid, "rows": [list(r) for r in self.rows]}

    def describe(self) -> str:
        names = self.classes
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
        return f"unit {self.uid} ({len(self.rows)} samples; class{'es' if len(names) > 1 else ''} {shown})"


def make_units(classes: list[str], labels: dict, ipc: int, max_batch: int, mode: str = "cross_class") -> list[Unit]:
    """The work units of a run: a pure function of (classes, labels, ipc, max_batch, mode)."""
    order = sorted(classes, key=lambda c: (int(labels[c]), c))
    groups = ([[(c, int(labels[c]), k) for c in order for k in range(ipc)]] if mode == "cross_class"
              else [[(c, int(labels[c]), k) for k in range(ipc)] for c in order])
    units: list[Unit] = []
    for rows in groups:
        for start in range(0, len(rows), max_batch):
            chunk = tuple(rows[start:start + max_batch])
            digest = hashlib.blake2b(json.dumps(chunk).encode(), digest_size=4).hexdigest()
            units.append(Unit(len(units), f"u{len(units):06d}-{digest}", chunk))
    return units


def unit_part(out: OutputDir, uid: str) -> Path:
    return out.work / "units" / f"{uid}.parquet"


def unit_done(out: OutputDir, unit: Unit) -> bool:
    """The unit's manifest rows are written and every PNG they list exists."""
    part = unit_part(out, unit.uid)
    if not part.exists():
        return False
    try:
        paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
    except (OSError, pa.ArrowException):
        return False
    return len(paths) == len(unit.rows) and all((out.root / p).exists() for p in paths)


def finalize_class(out: OutputDir, class_name: str, uids: list[str], ipc: int) -> None:
    """Write the class's manifest part from its units' files, then ``_SUCCESS`` (idempotent)."""
    parts = [pq.read_table(unit_part(out, uid)) for uid in uids]
    table = pa.concat_tables(parts, promote_options="default")  # units written before the health columns
    rows = table.filter(pc.equal(table.column("class"), class_name))
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("k", "ascending")]))
    if rows.column("k").to_pylist() != list(range(ipc)):
        raise RuntimeError(f"class {class_name}: unit files {uids} hold samples {rows.column('k').to_pylist()}, "
                           f"not 0..{ipc - 1}")
    # Temp files of a writer killed mid-write (its node lost: no chance to clean up). Every unit of the
    # class is done, so no live writer of this folder is left.
    for tmp in out.class_dir(class_name).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    atomic_write_table(out.manifest_part(class_name), rows)
    atomic_write_bytes(out.class_dir(class_name) / SUCCESS, b"")


# ---------------------------------------------------------------------------------- the actor
class ClassSampler:
    """Holds the prior; ``run_unit`` writes one work unit. Used as a Ray actor and in-process."""

    def __init__(self, cfg_dict: dict, threads: int = 0, config_hash: str = "", device: str = "auto"):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = build_config(cfg_dict)
        # runtime.device decides what a GPU torch cannot use means: an error (cuda) or a warning (auto)
        self.worker = torch_device("sample", "cpu" if device == "cpu" else self.cfg.runtime.device)
        self.device = "cuda" if self.worker.on_gpu else "cpu"
        self.sampler = GuidedSampler(load_model(self.cfg.model, self.device), SamplerConfig.from_config(self.cfg))
        # The driver passes the hash it stamped the output folder with: recomputing it here would read a
        # local model folder's weights once more per actor (the hash covers their digest).
        self.hash = config_hash or self.cfg.config_hash()
        self.out = OutputDir(self.cfg.out)
        self.plans: OrderedDict = OrderedDict()
        h = self.cfg.health
        self.health = HealthCheck(self.out, h.threshold, h.policy, h.max_attempts)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def ready(self) -> str:
        """Answers once the model is loaded; the driver hands units only to actors that answered."""
        return self.node_id()

    def _plan(self, class_name: str) -> dict:
        if class_name not in self.plans:
            with np.load(self.out.centroid_file(class_name)) as f:
                self.plans[class_name] = {k: f[k] for k in f.files}
            while len(self.plans) > PLAN_CACHE:
                self.plans.popitem(last=False)
        self.plans.move_to_end(class_name)
        return self.plans[class_name]

    def _guidance_rows(self, rows):
        """Per-row centroids, and the compact bases (only those the rows use) with their (n, S) index."""
        guidance = self.cfg.sampler.guidance
        if guidance == "none":
            return None, None, None
        plans = [self._plan(c) for c, _, _ in rows]
        centroids = np.stack([p["centroids"][k] for p, (_, _, k) in zip(plans, rows)])
        if guidance not in BASIS_MODES:
            return centroids, None, None
        sets, index, offset = [], [], 0
        for p, (_, _, k) in zip(plans, rows):
            lo, hi = int(p["offsets"][k]), int(p["offsets"][k + 1])
            sets.append(p["bases"][lo:hi])
            index.append(offset + p["step_index"][k])
            offset += hi - lo
        return centroids, np.concatenate(sets), np.stack(index).astype(np.int64)

    def run_unit(self, unit: dict) -> dict:
        start = time.perf_counter()
        cfg, out = self.cfg, self.out
        rows = [(str(c), int(y), int(k)) for c, y, k in unit["rows"]]
        centroids, bases, basis_index = self._guidance_rows(rows)
        health = self.health.sample_rows(self.sampler, rows, centroids, bases, basis_index)
        images = self.sampler.decode(health["latents"])
        done = {c for c in dict.fromkeys(r[0] for r in rows) if out.is_class_done(c)}
        table = {c: [] for c in MANIFEST_COLUMNS}
        for r, ((class_name, label, k), image) in enumerate(zip(rows, images)):
            plan = self._plan(class_name)
            data = png_bytes(image)
            path = out.image_path(class_name, k)
            if class_name not in done:  # a complete class is never touched again
                atomic_write_bytes(path, data)
            for col, value in (("class", class_name), ("label", label), ("k", k), ("seed", cfg.seed),
                               ("path", str(path.relative_to(out.root))),
                               ("centroid_node", int(plan["node_ids"][k])),
                               ("centroid_level", int(plan["levels"][k])),
                               ("repeated_centroid", bool(plan["repeated"])),
                               ("guidance", cfg.sampler.guidance), ("cluster", cfg.cluster.method),
                               ("model", cfg.model.model), ("vae", cfg.model.vae or f"{cfg.model.model}/vae"),
                               ("config_hash", self.hash), ("sha256", sha256_bytes(data)),
                               *((col, health[col][r].item()) for col in HEALTH_COLUMNS)):
                table[col].append(value)
        atomic_write_table(unit_part(out, unit["uid"]), pa.table(table))
        return {"uid": unit["uid"], "images": len(rows), "classes": list(dict.fromkeys(r[0] for r in rows)),
                "seconds": time.perf_counter() - start, "ended_at": time.time(), "node_id": self.node_id(),
                "actor_id": ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None,
                "device": self.device, "worker": self.worker.record(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []}

    def run_class(self, class_name: str, label: int) -> dict:
        """One whole class in one call, then its manifest part and ``_SUCCESS`` (in-process use, benches)."""
        start = time.perf_counter()
        unit = Unit(0, f"class-{class_name}", tuple((class_name, int(label), k) for k in range(self.cfg.ipc)))
        res = self.run_unit(unit.to_dict())
        finalize_class(self.out, class_name, [unit.uid], self.cfg.ipc)
        return {"class_name": class_name, "images": res["images"], "seconds": time.perf_counter() - start,
                "node_id": res["node_id"]}
