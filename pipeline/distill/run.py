"""`manifoldgd distill`: the driver. Lists the data, then runs the three stages on Ray, resumably.

    images -> [1 encode: Ray Data, actor pool] -> latents by class (parquet)
           -> [2 plan: one task per class]     -> centroids + tangent bases (npz)
           -> [3 sample: model-holding actors] -> PNGs, manifest, _SUCCESS

Every stage skips work whose output already exists, so the same command resumes an interrupted run.
The same entrypoint runs locally (starts Ray), under `ray job submit`, or in a KubeRay RayJob.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.exceptions import RayActorError

from pipeline.common.images import png_bytes
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_json, atomic_write_table
from pipeline.common.ray_start import init_ray
from pipeline.config import ConfigError, DistillConfig, build_config, load_yaml, parse_set, to_yaml, validate
from pipeline.distill.encode import VAEEncoder, decode_batch, pool_size
from pipeline.distill.plan import run_class
from pipeline.distill.sample import ClassSampler
from pipeline.inputs import datasets
from pipeline.inputs.sources import builtin_names, list_source
from pipeline.models.loading import PriorLoadError
from pipeline.models.refs import BUILTIN, prior_info, resolve

log = get_logger().info

MAX_CLASS_ATTEMPTS = 3


# ---------------------------------------------------------------------------------------- config
def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="ImageFolder root, parquet of (image, label), or a built-in dataset name")
    p.add_argument("--out", help="output folder (created; resumed when it exists)")
    p.add_argument("--ipc", type=int, help="images per class (default 10)")
    p.add_argument("--model", help="DiT hub id or local folder (default facebook/DiT-XL-2-256)")
    p.add_argument("--vae", help="VAE hub id or local folder (default stabilityai/sd-vae-ft-mse)")
    p.add_argument("--guidance", help="none | mode | manifold (default manifold)")
    p.add_argument("--cluster", help="divisive | kmeans (default divisive)")
    p.add_argument("--seed", type=int, help="generation seed (default 0)")
    p.add_argument("--config", metavar="FILE.yaml", help="a config or preset file (see cluster_configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set sampler.guidance_scale=0.2 (repeatable)")


def resolve_config(args: argparse.Namespace) -> DistillConfig:
    """The config of a parsed ``distill`` / ``print-config`` command line (see ``resolve_distill_config``)."""
    return resolve_distill_config(data=args.data, out=args.out, ipc=args.ipc, seed=args.seed, model=args.model,
                                  vae=args.vae, guidance=args.guidance, cluster=args.cluster,
                                  config_file=args.config, overrides=args.set)


def resolve_distill_config(*, data: str | None = None, out: str | None = None, ipc: int | None = None,
                           seed: int | None = None, model: str | None = None, vae: str | None = None,
                           guidance: str | None = None, cluster: str | None = None, config_file: str | None = None,
                           overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """defaults < ``config_file`` < the named values < ``overrides`` (``key=value`` strings, as ``--set``);
    None means "not given". A built-in dataset brings its shipped prior by default. Not validated: callers do.

    The one place the layering lives: the CLI (``resolve_config``) and ``manifoldgd benchmark`` both call
    it, so a benchmark run has the config, hash and bytes of the equivalent ``manifoldgd distill``."""
    from_file = load_yaml(config_file) if config_file else {}
    flags: dict = {}
    if data is not None:
        flags.setdefault("data", {})["path"] = data
    for key, value in (("out", out), ("ipc", ipc), ("seed", seed)):
        if value is not None:
            flags[key] = value
    if model is not None:
        flags.setdefault("model", {})["model"] = model
    if vae is not None:
        flags.setdefault("model", {})["vae"] = vae
    if guidance is not None:
        flags.setdefault("sampler", {})["guidance"] = guidance
    if cluster is not None:
        flags.setdefault("cluster", {})["method"] = cluster
    settings = parse_set(list(overrides))
    cfg = build_config(from_file, flags, settings)
    model_given = any("model" in layer.get("model", {}) for layer in (from_file, flags, settings))
    if not model_given and builtin_prior_exists(cfg.data.path):
        # The shipped prior's own tuned settings sit just above the defaults: a file, a flag or --set wins.
        tuned = prior_defaults(cfg.data.path, cfg.sampler.guidance)
        if tuned:
            cfg = build_config(tuned, from_file, flags, settings)
        cfg.model.model = f"builtin:{cfg.data.path}"
        if not any("vae" in layer.get("model", {}) for layer in (from_file, flags, settings)):
            cfg.model.vae = ""
    return cfg


def prior_defaults(name: str, guidance: str) -> dict:
    """Settings tuned for a built-in prior, per guidance mode (``priors/<name>/distill_defaults.yaml``).

    The published defaults were chosen for DiT-XL/2's 4,096-d latents; a small prior's latent space can
    want others. Only a setting that won on held-out seeds goes in that file (docs/evaluation.md)."""
    path = Path(resolve(BUILTIN + name)) / "distill_defaults.yaml"
    if not path.is_file():
        return {}
    return (load_yaml(str(path)) or {}).get(guidance, {}) or {}


def builtin_prior_exists(name: str) -> bool:
    if name not in builtin_names():
        return False

    try:
        resolve(BUILTIN + name)
        return True
    except ConfigError:
        return False


def check_model(cfg: DistillConfig, listing) -> int:
    """Fail before Ray starts when the model configs cannot be found, or when the data has labels the
    model does not know; returns the image size."""
    try:
        size, num_classes = prior_info(cfg.model)
    except PriorLoadError as exc:
        raise ConfigError("model.model", str(exc).splitlines()[0] + " (run with a local folder or stage "
                          "the weights: see docs/models.md)") from None
    top = max(listing.labels.values(), default=-1)
    if top >= num_classes:
        raise ConfigError("data.class_map", f"the data has label ids up to {top} but the model knows "
                          f"{num_classes} classes; map the folders to the model's ids with data.class_map")
    return size


# ------------------------------------------------------------------------------------- stage 1
def input_dataset(listing):
    """A Ray dataset of rows (id, class_name, label, bytes) with a real read stage."""
    if listing.kind == "imagefolder":
        base = Path(listing.root)
        paths = [str(base / rel) for rel, _ in listing.files]
        ds = ray.data.read_binary_files(paths, include_paths=True)
        return ds.map_batches(functools.partial(_label_from_path, base=str(base), labels=listing.labels),
                              batch_format="numpy")
    if listing.kind == "parquet":
        ds = ray.data.read_parquet(listing.root, columns=["image", "label"])
        return ds.map_batches(functools.partial(_label_from_parquet, labels=listing.labels,
                                                name=Path(listing.root).name), batch_format="numpy")

    images, labels, names = datasets.load_builtin(listing.root, split="train")
    table = pa.table({
        "id": [f"{names[y]}/{i:05d}" for i, y in enumerate(labels)],
        "class_name": [names[y] for y in labels],
        "label": np.asarray(labels, dtype=np.int64),
        "bytes": [png_bytes(im) for im in images],
    })
    return ray.data.from_arrow(table)


def _label_from_path(batch, *, base: str, labels: dict):
    rel = [os.path.relpath("/" + p.lstrip("/") if not os.path.isabs(p) else p, base) for p in batch["path"]]
    classes = [r.split(os.sep, 1)[0] for r in rel]
    return {"id": np.asarray(rel, dtype=object), "class_name": np.asarray(classes, dtype=object),
            "label": np.asarray([labels[c] for c in classes], dtype=np.int64), "bytes": batch["bytes"]}


def _label_from_parquet(batch, *, labels: dict, name: str):
    classes = [str(v) for v in batch["label"]]
    ids = [f"{name}#{hashlib.sha256(b).hexdigest()[:16]}" for b in batch["image"]]
    return {"id": np.asarray(ids, dtype=object), "class_name": np.asarray(classes, dtype=object),
            "label": np.asarray([labels[c] for c in classes], dtype=np.int64), "bytes": batch["image"]}


def encode_stage(cfg: DistillConfig, listing, out: OutputDir, image_size: int) -> dict:
    if (out.latents / "_DONE").exists():
        log("encode: latents found, skipping")
        return {"skipped": True}
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    lo, hi = pool_size(cfg.runtime.encode_actors, use_gpu)
    log(f"encode: {listing.num_items} images at {image_size}px, {hi} VAE actor(s) on {'GPU' if use_gpu else 'CPU'}")
    ds = input_dataset(listing)
    ds = ds.map_batches(functools.partial(decode_batch, image_size=image_size, hflip=cfg.data.hflip,
                                          seed=cfg.seed), batch_format="numpy", batch_size=64)
    ds = ds.map_batches(VAEEncoder, fn_constructor_kwargs={"model": cfg.to_dict()["model"],
                                                            "threads": 0 if use_gpu else 1,
                                                            "micro_batch": cfg.runtime.encode_batch_size},
                        batch_size=cfg.runtime.encode_batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        num_gpus=1 if use_gpu else 0, num_cpus=1 if not use_gpu else 0.5)
    tmp = out.work / "latents.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp), partition_cols=["class_name"])
    (tmp / "_DONE").write_text("ok\n")
    shutil.rmtree(out.latents, ignore_errors=True)
    os.replace(tmp, out.latents)
    return {"skipped": False}


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


# ------------------------------------------------------------------------------------- stage 2
def plan_stage(cfg: DistillConfig, classes: list[str], out: OutputDir) -> list[dict]:
    task = ray.remote(num_cpus=1)(run_class)
    refs = [task.remote(str(out.latents), c, cfg, str(out.centroid_file(c))) for c in classes]
    results = ray.get(refs)
    for r in results:
        for w in r.get("warnings", []):
            log(f"plan: class {r['class_name']}: {w}")
    return results


# ------------------------------------------------------------------------------------- stage 3
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


# ------------------------------------------------------------------------------------ the run
def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("manifoldgd", "torch", "ray", "diffusers", "numpy", "pyarrow", "scikit-learn", "pillow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def hardware() -> dict:
    res = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": res.get("CPU", 0),
            "gpus": res.get("GPU", 0), "driver_platform": platform.platform(),
            "driver_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_quarantine(out: OutputDir, listing, failures) -> int:
    rows = sorted(listing.rejected) + list(failures)
    atomic_write_table(out.root / "quarantine.parquet",
                       pa.table({"path": [r[0] for r in rows], "reason": [r[1] for r in rows]},
                                schema=pa.schema([("path", pa.string()), ("reason", pa.string())])))
    return len(rows)


def write_manifest(out: OutputDir, classes: list[str]) -> int:
    parts = [pq.read_table(out.manifest_part(c)) for c in classes if out.manifest_part(c).exists()]
    if not parts:
        return 0
    table = pa.concat_tables(parts)
    atomic_write_table(out.root / "manifest.parquet", table)
    return table.num_rows


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(cfg: DistillConfig, listing, *, overwrite: bool = False) -> dict:
    """Run (or resume) a distillation; returns the run record also written to run.json."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image_size = check_model(cfg, listing)
    out = OutputDir(cfg.out)
    out.prepare(cfg, overwrite)
    init_ray()
    if threading.current_thread() is threading.main_thread():
        # After ray.init, which installs its own handler: SIGTERM (kubectl delete, a job timeout) unwinds
        # like Ctrl-C, so temp files are removed and the next run resumes.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    timings["ray_init"] = time.perf_counter() - t0

    t = time.perf_counter()
    encode_stage(cfg, listing, out, image_size)
    failures = decode_failures(out)
    n_quarantined = write_quarantine(out, listing, failures)
    counts = latent_counts(out)
    timings["encode"] = time.perf_counter() - t
    classes = [c for c in listing.classes if counts.get(c, 0) > 0]
    skipped = [c for c in listing.classes if counts.get(c, 0) == 0]
    for c in skipped:
        log(f"class {c}: no usable image, no output for it (see quarantine.parquet)")

    t = time.perf_counter()
    plans = plan_stage(cfg, classes, out)
    timings["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    sampled = sample_stage(cfg, classes, listing.labels, out)
    timings["sample"] = time.perf_counter() - t

    n_rows = write_manifest(out, classes)
    timings["total"] = time.perf_counter() - t0
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.config_hash(), "versions": versions(),
        "hardware": hardware(), "timings_s": timings,
        "counts": {"found": listing.num_items + len(listing.rejected), "encoded": sum(counts.values()),
                   "quarantined": n_quarantined, "classes": len(classes), "classes_without_images": skipped,
                   "classes_sampled_this_run": len(sampled), "images": n_rows,
                   "classes_with_repeated_centroids": sorted(p["class_name"] for p in plans if p.get("repeated"))},
        "nodes_used": sorted({r["node_id"] for r in sampled}),
    }
    atomic_write_json(out.root / "run.json", record)
    log(f"done: {n_rows} images in {out.train} ({len(classes)} classes); "
        f"{n_quarantined} file(s) quarantined; {timings['total']:.1f}s")
    return record


# ------------------------------------------------------------------------------------- the CLI
def dry_run(cfg: DistillConfig, listing) -> None:
    print(f"data: {listing.kind} {listing.root}")
    print(f"classes: {len(listing.classes)}; images: {listing.num_items}; rejected at listing: {len(listing.rejected)}")
    for rel, reason in listing.rejected:
        print(f"  would quarantine {rel}: {reason}")
    for c in listing.empty_classes():
        print(f"  class {c}: empty folder")
    print(f"plan: encode {listing.num_items} images with {cfg.model.vae or cfg.model.model + '/vae'}; "
          f"{cfg.cluster.method} clustering to {cfg.ipc} centroids per class; "
          f"{cfg.sampler.guidance} guidance, {cfg.sampler.num_steps} {cfg.sampler.sampler} steps; "
          f"{cfg.ipc * len(listing.classes)} images into {cfg.out}/train (config {cfg.config_hash()})")


def cmd_distill(args: argparse.Namespace) -> int:
    try:
        cfg = validate(resolve_config(args))
        listing = list_source(cfg.data)
        if args.dry_run:
            dry_run(cfg, listing)
            return 0
        run(cfg, listing, overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("manifoldgd: interrupted; finished classes are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as exc:  # includes a Ray task's OSError (disk full, permissions) on any node
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's exception
        errno_name = os.strerror(cause.errno) if getattr(cause, "errno", None) else str(cause).splitlines()[-1]
        where = getattr(cause, "filename", None) or cfg.out
        print(f"manifoldgd: error: cannot write {where}: {errno_name}. Nothing written is corrupt (files are "
              "renamed into place when complete); fix the cause and rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    try:
        cfg = validate(resolve_config(args), need_paths=False)
    except ConfigError as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print(f"# config hash: {cfg.config_hash()}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a labelled image dataset into IPC synthetic images per class")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="list and count, print the plan, run nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder made by another config")
    p.set_defaults(func=cmd_distill)
    q = sub.add_parser("print-config", help="print the resolved config as YAML")
    add_config_arguments(q)
    q.set_defaults(func=cmd_print_config)
