"""Stage 3: sampling actors hold the prior (loaded once each); classes fan out across actors and nodes.

Each class: load its plan (centroids + tangent bases), sample IPC images in one batched call, write each
PNG atomically, then the class's manifest part, then ``_SUCCESS`` last. A class is done only when
``_SUCCESS`` exists, so an actor killed mid-class leaves a class that the next attempt redoes, byte for
byte (noise depends only on (seed, label, k)).
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError

from pipeline.common.images import png_bytes
from pipeline.common.log import get_logger
from pipeline.common.outputs import SUCCESS, OutputDir, atomic_write_bytes, atomic_write_table, sha256_bytes
from pipeline.config import DistillConfig, build_config
from pipeline.distill.plan import expand_bases
from pipeline.models.refs import load_model
from pipeline.models.sampler import GuidedSampler, SamplerConfig

log = get_logger().info
MAX_CLASS_ATTEMPTS = 3

MANIFEST_COLUMNS = ("class", "label", "k", "seed", "path", "centroid_node", "centroid_level",
                    "repeated_centroid", "guidance", "cluster", "model", "vae", "config_hash", "sha256")


def sampler_config(cfg: DistillConfig):
    s = cfg.sampler
    return SamplerConfig(num_steps=s.num_steps, train_steps=s.train_steps, sampler=s.sampler,
                         cfg_scale=s.cfg_scale, cfg_channels=s.cfg_channels, guidance=s.guidance,
                         guidance_scale=s.guidance_scale, t_stop=s.t_stop, normal_weight=s.normal_weight,
                         max_batch=s.max_batch, seed=cfg.seed)


class ClassSampler:
    """Holds the prior; ``run_class`` writes one complete class. Used as a Ray actor and in-process."""

    def __init__(self, cfg_dict: dict, threads: int = 0, config_hash: str = ""):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = build_config(cfg_dict)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sampler = GuidedSampler(load_model(self.cfg.model, self.device), sampler_config(self.cfg))
        # The driver passes the hash it stamped the output folder with: recomputing it here would read a
        # local model folder's weights once more per actor (the hash covers their digest).
        self.hash = config_hash or self.cfg.config_hash()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def run_class(self, class_name: str, label: int) -> dict:
        start = time.perf_counter()
        cfg, out = self.cfg, OutputDir(self.cfg.out)
        with np.load(out.centroid_file(class_name)) as f:
            plan = {k: f[k] for k in f.files}
        bases = expand_bases(plan) if cfg.sampler.guidance == "manifold" else None
        images = self.sampler.sample(int(label), list(range(cfg.ipc)), plan["centroids"], bases)
        rows = {c: [] for c in MANIFEST_COLUMNS}
        for k, image in enumerate(images):
            data = png_bytes(image)
            path = out.image_path(class_name, k)
            atomic_write_bytes(path, data)
            for col, value in (("class", class_name), ("label", int(label)), ("k", k), ("seed", cfg.seed),
                               ("path", str(path.relative_to(out.root))),
                               ("centroid_node", int(plan["node_ids"][k])),
                               ("centroid_level", int(plan["levels"][k])),
                               ("repeated_centroid", bool(plan["repeated"])),
                               ("guidance", cfg.sampler.guidance), ("cluster", cfg.cluster.method),
                               ("model", cfg.model.model), ("vae", cfg.model.vae or f"{cfg.model.model}/vae"),
                               ("config_hash", self.hash), ("sha256", sha256_bytes(data))):
                rows[col].append(value)
        atomic_write_table(out.manifest_part(class_name), pa.table(rows))
        atomic_write_bytes(out.class_dir(class_name) / SUCCESS, b"")
        return {"class_name": class_name, "images": len(images), "seconds": time.perf_counter() - start,
                "node_id": self.node_id()}


# ---------------------------------------------------------------------------------- the stage driver
def sample_stage(cfg: DistillConfig, classes: list[str], labels: dict, out: OutputDir) -> list[dict]:
    todo = deque(c for c in classes if not out.is_class_done(c))
    log(f"sample: {len(classes) - len(todo)}/{len(classes)} classes already complete")
    if not todo:
        return []
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        n_actors, options, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, 0
    else:
        n_actors, options, threads = max(1, int(ray.cluster_resources().get("CPU", 1))), {"num_cpus": 1}, 1
    n_actors = min(cfg.runtime.sample_actors or n_actors, len(todo))
    actor_cls = ray.remote(ClassSampler).options(**options)
    cfg_dict, digest = cfg.to_dict(), cfg.config_hash()
    idle = [actor_cls.remote(cfg_dict, threads, digest) for _ in range(n_actors)]
    in_flight: dict = {}
    attempts: dict[str, int] = {}
    results, total, start = [], len(todo), time.perf_counter()
    while todo or in_flight:
        while todo and idle:
            cls = todo.popleft()
            actor = idle.pop()
            in_flight[actor.run_class.remote(cls, labels[cls])] = (actor, cls)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, cls = in_flight.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except RayActorError as exc:
            # the actor (or its node) died mid-class: the class has no _SUCCESS, so redo it elsewhere
            attempts[cls] = attempts.get(cls, 0) + 1
            if attempts[cls] >= MAX_CLASS_ATTEMPTS:
                raise RuntimeError(f"class {cls} failed {attempts[cls]} times; last error: {exc}") from exc
            log(f"sample: worker lost on class {cls} ({type(exc).__name__}); retrying the class")
            todo.appendleft(cls)
            live = len(idle) + len(in_flight)
            # Replace the actor only where it can be placed now (or when none is left): a replacement
            # that waits for resources held by idle actors would be handed work and never run it.
            if live == 0 or _fits(options):
                idle.insert(0, actor_cls.remote(cfg_dict, threads, digest))
            continue
        idle.append(actor)
        if not todo:  # nothing left to hand out: free the resources for any actor still waiting for them
            for spare in idle:
                ray.kill(spare)
            idle.clear()
        results.append(res)
        done = len(results)
        elapsed = time.perf_counter() - start
        rate = sum(r["images"] for r in results) / elapsed
        eta = elapsed / done * (total - done)
        if cfg.runtime.progress:
            log(f"sample: {done}/{total} classes, {rate:.2f} images/s, ETA {eta:.0f}s")
    return results


def _fits(options: dict) -> bool:
    free = ray.available_resources()
    return free.get("CPU", 0) >= options.get("num_cpus", 0) and free.get("GPU", 0) >= options.get("num_gpus", 0)
