"""Stage 1: images -> VAE latents, streamed through Ray Data and written to parquet by class.

read (binary files / parquet rows) -> decode + DiT preprocessing (CPU tasks; a bad file becomes a row
with a reason) -> VAE encode in an actor pool (GPU when present; the model loads once per actor) ->
parquet partitioned by class. Latent = posterior mean x scaling factor, flattened.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray
import ray.data
import torch

from pipeline.common.device import DeviceUnavailableError, device_error_line, summarize, torch_device
from pipeline.common.images import png_bytes
from pipeline.common.log import get_logger
from pipeline.common.names import folder_name
from pipeline.common.outputs import OutputDir, atomic_write_json
from pipeline.config import DistillConfig, ModelConfig
from pipeline.distill.vae_encode import encode_pixels
from pipeline.inputs import datasets
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import parquet_label
from pipeline.models.refs import load_vae

log = get_logger().info

LATENT_COLUMNS = ("id", "class_name", "label", "latent", "error")
DEVICES_DIR = "_devices"  # in the latents folder: one record per VAE actor (a "_" folder is no partition)


def flip_for(row_id: str, seed: int) -> bool:
    """Deterministic stand-in for the public code's random horizontal flip."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[0] & 1 == 1


def decode_batch(batch: dict, *, image_size: int, hflip: bool, seed: int) -> dict:
    """Raw bytes -> (size, size, 3) uint8 pixels; a row that fails keeps zeros and its reason."""
    n = len(batch["id"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for i in range(n):
        flip = hflip and flip_for(str(batch["id"][i]), seed)
        arr, reason = decode_image(batch["bytes"][i], image_size, flip)
        if arr is not None:
            pixels[i] = arr
        errors.append(reason)
    return {"id": batch["id"], "class_name": batch["class_name"], "label": batch["label"],
            "pixels": pixels, "error": np.asarray(errors, dtype=object)}


class VAEEncoder:
    """Ray Data actor: loads the VAE once, encodes the rows that decoded."""

    def __init__(self, model: dict, threads: int = 0, micro_batch: int = 64, device: str = "auto",
                 report_dir: str = ""):
        if threads:
            torch.set_num_threads(threads)
        # device: runtime.device, or "cpu" where the driver asked Ray for no GPU (see pipeline/common/device.py)
        self.worker = torch_device("encode", device)
        self.device = "cuda" if self.worker.on_gpu else "cpu"
        if report_dir:  # the driver collects one record per actor for run.json
            atomic_write_json(Path(report_dir) / f"{self.worker.node_id[:16]}-{self.worker.pid}.json",
                              self.worker.record())
        self.vae, self.dtype = load_vae(ModelConfig(**model), self.device)
        self.micro_batch = micro_batch

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        n = len(ok)
        # Failed rows keep zeros of the full width, also when the whole batch failed: every file of a
        # class then has one tensor shape, whichever of them a reader opens first.
        latents = np.zeros((n, self.latent_dim(batch["pixels"].shape[1])), dtype=np.float32)
        if ok.any():
            latents[ok] = self._encode_padded(batch["pixels"][ok])
        return {"id": batch["id"], "class_name": batch["class_name"], "label": batch["label"],
                "latent": list(latents), "error": batch["error"]}

    def latent_dim(self, image_size: int) -> int:
        """Flattened latent size for ``image_size`` px inputs, from the VAE config (each block after the
        first halves the resolution)."""
        conf = self.vae.config
        side = image_size // 2 ** (len(conf.block_out_channels) - 1)
        return int(conf.latent_channels * side * side)

    def _encode_padded(self, pixels: np.ndarray) -> np.ndarray:
        """Encode in model calls of exactly ``micro_batch`` rows, zero-padding the last one.

        Kernels are chosen by tensor shape, so a fixed shape makes each image's latent independent of
        which other images Ray Data happened to batch it with: two runs give the same bytes.
        """
        out = []
        for i in range(0, len(pixels), self.micro_batch):
            chunk = pixels[i:i + self.micro_batch]
            enc = encode_pixels(self.vae, _pad_rows(chunk, self.micro_batch), self.device, self.dtype)
            out.append(enc[: len(chunk)])
        return np.concatenate(out)


def _pad_rows(pixels: np.ndarray, rows: int) -> np.ndarray:
    pad = np.zeros((rows - len(pixels), *pixels.shape[1:]), dtype=pixels.dtype)
    return np.concatenate([pixels, pad])


def pool_size(requested: int, use_gpu: bool) -> tuple[int, int]:
    """(min, max) encode actors. On CPU leave a core to the read and decode tasks (2-core deadlock)."""
    free = ray.available_resources()
    if use_gpu:
        n = int(free.get("GPU", 0)) or 1
    else:
        n = max(1, int(free.get("CPU", 1)) - 1)
    if requested:
        n = requested
    return 1, max(1, n)


# ---------------------------------------------------------------------------------- the stage driver
def input_dataset(listing):
    """A Ray dataset of rows (id, class_name, label, bytes) with a real read stage."""
    if listing.kind == "imagefolder":
        root = listing.root.rstrip("/")
        paths = [f"{root}/{rel}" for rel, _ in listing.files]
        # Ray Data reports a remote object's path without its scheme (bucket/prefix/...): so is the base
        base = "/" + root.split("://", 1)[1] if "://" in root else root
        ds = ray.data.read_binary_files(paths, include_paths=True)
        return ds.map_batches(functools.partial(_label_from_path, base=base, labels=listing.labels),
                              batch_format="numpy")
    if listing.kind == "parquet":
        ds = ray.data.read_parquet(listing.parquet_paths, columns=["image", "label"])
        return ds.map_batches(functools.partial(_label_from_parquet, labels=listing.labels,
                                                name=Path(listing.root).name), batch_format="pyarrow")

    images, labels, names = datasets.load_builtin(listing.root, split="train")
    table = pa.table({
        "id": [f"{names[y]}/{i:05d}" for i, y in enumerate(labels)],
        "class_name": [folder_name(names[y]) for y in labels],
        "label": np.asarray(labels, dtype=np.int64),
        "bytes": [png_bytes(im) for im in images],
    })
    return ray.data.from_arrow(table)


def _label_from_path(batch, *, base: str, labels: dict):
    rel = [os.path.relpath("/" + p.lstrip("/") if not os.path.isabs(p) else p, base) for p in batch["path"]]
    classes = [folder_name(r.split(os.sep, 1)[0]) for r in rel]  # the listing's keys: folder names
    return {"id": np.asarray(rel, dtype=object), "class_name": np.asarray(classes, dtype=object),
            "label": np.asarray([labels[c] for c in classes], dtype=np.int64), "bytes": batch["bytes"]}


def _label_from_parquet(batch, *, labels: dict, name: str):
    # A pyarrow batch: labels as Python values (an integer column with nulls stays integers). Rows with a
    # null label are left out here: the listing made them quarantine rows.
    values = batch.column("label").to_pylist()
    keep = [i for i, v in enumerate(values) if v is not None]
    classes = [folder_name(parquet_label(values[i])) for i in keep]  # the listing's keys
    column = batch.column("image")
    images = [column[i].as_py() for i in keep]
    ids = [f"{name}#{hashlib.sha256(b).hexdigest()[:16]}" for b in images]
    return {"id": np.asarray(ids, dtype=object), "class_name": np.asarray(classes, dtype=object),
            "label": np.asarray([labels[c] for c in classes], dtype=np.int64),
            "bytes": np.asarray(images, dtype=object)}


def _same_rows(group):
    return group


def encode_stage(cfg: DistillConfig, listing, out: OutputDir, image_size: int) -> None:
    """Encode every listed image into ``_work/latents`` (skipped when a finished one is there)."""
    if (out.latents / "_DONE").exists():
        log("encode: latents found, skipping")
        return
    use_gpu = cfg.runtime.use_gpu(ray.cluster_resources().get("GPU", 0))  # runtime.device: auto | cuda | cpu
    lo, hi = pool_size(cfg.runtime.encode_actors, use_gpu)
    log(f"encode: {listing.num_items} images at {image_size}px, {hi} VAE actor(s) on {'GPU' if use_gpu else 'CPU'}")
    ds = input_dataset(listing)
    ds = ds.map_batches(functools.partial(decode_batch, image_size=image_size, hflip=cfg.data.hflip,
                                          seed=cfg.seed), batch_format="numpy", batch_size=64)
    tmp = out.work / "latents.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts only among the extra remote args, which it marks deprecated (for
        # 2.64) before it has a named parameter for it: this one call's notice is not the user's to act on.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(VAEEncoder, fn_constructor_kwargs={"model": cfg.to_dict()["model"],
                                                                "threads": 0 if use_gpu else 1,
                                                                "micro_batch": cfg.model.encode_batch,
                                                                "device": cfg.runtime.device if use_gpu else "cpu",
                                                                "report_dir": str(tmp / DEVICES_DIR)},
                            batch_size=cfg.runtime.encode_batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                            num_gpus=1 if use_gpu else 0, num_cpus=1 if not use_gpu else 0.5,
                            # Ray Data hands each pool actor its function and context as object-store
                            # refs, which an in-place restart cannot rely on (Ray logs an error-level line
                            # for every such actor with restarts on). Stage 1 is all-or-nothing (written
                            # to latents.tmp, renamed when complete): a lost encode actor ends the stage,
                            # and a rerun redoes it.
                            max_restarts=0)
    if listing.kind == "parquet":
        # Parquet rows come in any class order: gather each class before writing, so a class is one file
        # (not one per input block, ~1e6 tiny files at ImageNet size) and stage 2 opens one file per class.
        ds = ds.groupby("class_name").map_groups(_same_rows, batch_format="pyarrow")
    try:
        ds.write_parquet(str(tmp), partition_cols=["class_name"])
    except Exception as exc:
        if device_error_line(exc):  # a VAE actor given a GPU torch cannot use, under runtime.device=cuda
            raise DeviceUnavailableError(device_error_line(exc)) from None
        raise
    (tmp / "_DONE").write_text("ok\n")
    shutil.rmtree(out.latents, ignore_errors=True)
    os.replace(tmp, out.latents)


def encode_devices(out: OutputDir) -> list[dict]:
    """The device each VAE actor that made the latents used (``WorkerDevice.record``), one per actor."""
    folder = out.latents / DEVICES_DIR
    return summarize(json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))) if folder.is_dir() else []


def decode_failures(out: OutputDir) -> list[tuple[str, str]]:
    part = pds.partitioning(pa.schema([("class_name", pa.string())]), flavor="hive")
    ds = pds.dataset(str(out.latents), format="parquet", partitioning=part)
    t = ds.to_table(columns=["id", "error"], filter=pc.field("error") != "")
    return sorted(zip(t.column("id").to_pylist(), t.column("error").to_pylist()))


def latent_counts(out: OutputDir) -> dict[str, int]:
    part = pds.partitioning(pa.schema([("class_name", pa.string())]), flavor="hive")
    ds = pds.dataset(str(out.latents), format="parquet", partitioning=part)
    t = ds.to_table(columns=["class_name"], filter=pc.field("error") == "")
    counts = pc.value_counts(t.column("class_name")).to_pylist()
    return {d["values"]: d["counts"] for d in counts}
