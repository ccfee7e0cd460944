"""Stage 3: sampling actors hold the prior (loaded once each); classes fan out across actors and nodes.

Each class: load its plan (centroids + tangent bases), sample IPC images in one batched call, write each
PNG atomically, then the class's manifest part, then ``_SUCCESS`` last. A class is done only when
``_SUCCESS`` exists, so an actor killed mid-class leaves a class that the next attempt redoes, byte for
byte (noise depends only on (seed, label, k)).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.common.images import png_bytes
from pipeline.common.outputs import SUCCESS, OutputDir, atomic_write_bytes, atomic_write_table, sha256_bytes
from pipeline.config import DistillConfig, build_config
from pipeline.distill.plan import expand_bases
from pipeline.distill.sampler import GuidedSampler, SamplerConfig
from pipeline.models.refs import load_model

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
