"""Scale rehearsal: ImageNet-1K's class structure through the real `distill` pipeline on this machine.

For each class count (10 = Imagenette's wnids, 100 = ImageNet-100's, 1,000 = ImageNet-1K's, all from the
shipped lists in pipeline/data/), it writes an ImageFolder of small PNGs per class, saves a tiny
random-init prior with 1,000 classes (wnid folders map to their ImageNet-1K index), and runs
``pipeline.distill.run.run`` at IPC 10 twice, each in a fresh process (so that ``ru_maxrss`` is that run's
own peak), with Ray started by the script:

- ``overlap``: the pipeline as it is: plan tasks submitted, and a sampling unit starts as soon as the plans
  of its classes exist (``sample_stage(..., plans=submit_plans(...))``);
- ``barrier``: stage 2 first, as a barrier (``pipeline.distill.plan.plan_stage``), then ``sample_stage``
  with every class planned: the stages before the overlap. It reuses the overlap run's encoded latents
  (hard links), so both variants plan and sample from the same files; compare their ``plan_and_sample``.

Both call the driver's ``run_stages`` (``plan_barrier=True`` for the barrier) and read the stages' results
it returns: ``plans`` (one per class, its ``seconds``) and ``units`` (one per work unit of
``sampler.max_batch`` samples, its ``seconds`` and ``images``). It records:

- wall time per stage, files/s listed, files/s through the encode stage, and files/s decoded in one
  process (read + DiT preprocessing, no Ray) for reference;
- per-class overhead of stage 2 and per-unit overhead of stage 3 in the barrier run (where each stage has
  the CPUs to itself): stage wall time x slots, minus the work each task or unit reported, per class / unit;
- the cost of reading one class's latents (``read_class_latents``) after the run, at each size;
- peak driver RSS (psutil, sampled every 0.2 s, and ``ru_maxrss``) and peak object-store use (``ray memory
  --stats-only``, every 5 s) against the store's capacity;
- bytes and files of manifest.parquet, _work/latents, _work/centroids and train/.

Then it prints one table with the 100/10 and 1000/100 ratios (class counts grow 10x each step, so a
linear quantity shows ~10x and a flat one ~1x), and per size the barrier / overlap ratio of the
plan-and-sample wall time, both measured in this one run.

    nice -n 10 .venv/bin/python bench/scale.py --sizes 10,100,1000 --per-class 50 --work /tmp/mgd-scale
    .venv/bin/python bench/scale.py --sizes 10 --work /tmp/mgd-scale10          # a couple of minutes
    .venv/bin/python bench/scale.py --report-only --work /tmp/mgd-scale     # the table from saved results
    .venv/bin/python bench/scale.py --smoke                                 # 3 classes, both variants, one Ray

The tiny prior has 16 px images and 4 x 4 x 4 = 64-d latents (DiT-XL/2: 4,096-d), so model work is near
zero and what is measured is the pipeline's own cost: listing, Ray Data, task/actor scheduling, parquet,
PNG writing. Every figure comes from this one run on this machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# bench/ holds ops.py and sampler.py: drop it from the path so `ops` and `pipeline` are the packages
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
sys.path.insert(0, str(ROOT))

SHIPPED_BY_SIZE = {10: "imagenette", 100: "imagenet100", 1000: "imagenet1k"}
MiB = 2**20


# -------------------------------------------------------------------------------------- inputs
def class_wnids(n: int) -> list[str]:
    """Imagenette / ImageNet-100 / ImageNet-1K wnids for 10 / 100 / 1000; else the first n of the 1K list."""
    from pipeline.inputs.sources import class_subset

    if n in SHIPPED_BY_SIZE:
        return sorted(class_subset(SHIPPED_BY_SIZE[n]))
    return class_subset("imagenet1k")[:n]


def make_data(root: Path, wnids: list[str], per_class: int, size: int) -> Path:
    """root/train/<wnid>/img_<i>.png, written once (a _DONE marker makes reruns reuse it)."""
    from pipeline.common.synthetic import write_image_folder

    if not (root / "_DONE").exists():
        write_image_folder(root, {w: per_class for w in wnids}, size=size)
        (root / "_DONE").write_text("ok\n")
    return root


def make_prior(folder: Path) -> Path:
    from pipeline.common.synthetic import save_tiny_prior

    if not (folder / "transformer").is_dir():
        save_tiny_prior(folder, num_classes=1000)
    return folder


# ------------------------------------------------------------------------------------ sampling
class PeakSampler(threading.Thread):
    """Polls driver RSS (every 0.2 s) and object-store bytes in use (every 5 s) until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.stop_flag = threading.Event()
        self.peak_rss = self.proc.memory_info().rss
        self.peak_store = 0
        self.store_capacity = 0
        self.store_error = ""
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, RSS bytes)
        self.t0 = time.monotonic()

    def _store_bytes(self, address: str) -> int:
        """Bytes in use in the object store, from Ray's public CLI (``ray memory --stats-only``)."""
        ray_cli = Path(sys.executable).with_name("ray")
        text = subprocess.run([str(ray_cli), "memory", "--stats-only", "--address", address], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        match = re.search(r"Plasma memory usage (\d+) MiB", text)
        if not match:
            raise ValueError(f"no 'Plasma memory usage' in: {text[:200]!r}")
        return int(match.group(1)) * MiB

    def run(self) -> None:
        import ray

        address = ray.get_runtime_context().gcs_address
        self.store_capacity = int(ray.cluster_resources().get("object_store_memory", 0))
        last_store = 0.0
        while not self.stop_flag.is_set():
            rss = self.proc.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.timeline.append((time.monotonic() - self.t0, rss))
            if time.monotonic() - last_store >= 5.0:
                last_store = time.monotonic()
                try:
                    self.peak_store = max(self.peak_store, self._store_bytes(address))
                except Exception as exc:  # a probe must never break the run it measures
                    self.store_error = f"{type(exc).__name__}: {exc}"[:200]
            self.samples += 1
            self.stop_flag.wait(0.2)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


def stage_peaks(timeline: list[tuple[float, int]], timings: dict) -> dict:
    """Peak driver RSS (MiB) within each stage's window: Ray start, encode, plan and sample together (they
    overlap), the manifest. ``timings``: run.json's ``timings_s`` (its windows follow one another)."""
    bounds, t = {}, 0.0
    for stage in ("ray_init", "encode", "plan_and_sample"):
        bounds[stage] = (t, t + timings[stage])
        t += timings[stage]
    bounds["manifest"] = (t, float("inf"))
    return {stage: max((rss for at, rss in timeline if lo <= at < hi), default=0) / MiB
            for stage, (lo, hi) in bounds.items()}


def folder_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path`` (0, 0 when absent)."""
    total, files = 0, 0
    if path.is_file():
        return path.stat().st_size, 1
    for dirpath, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(dirpath, name))
            files += 1
    return total, files


def share_latents(src: Path, dst: Path) -> bool:
    """Hard-link a finished run's encoded latents into a fresh output folder (the encode stage then skips)."""
    if not (src / "_DONE").exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, copy_function=os.link)
    return True


def decode_rate(listing, image_size: int, limit: int = 2000) -> float:
    """Files/s read from disk and decoded with DiT's preprocessing in this process (no Ray)."""
    import numpy as np

    from pipeline.distill.encode import decode_batch

    files = listing.files[:limit]
    base = Path(listing.root)
    start = time.perf_counter()
    for i in range(0, len(files), 64):
        chunk = files[i:i + 64]
        batch = {"id": np.asarray([r for r, _ in chunk], dtype=object),
                 "class_name": np.asarray([c for _, c in chunk], dtype=object),
                 "label": np.zeros(len(chunk), dtype=np.int64),
                 "bytes": [(base / r).read_bytes() for r, _ in chunk]}
        decode_batch(batch, image_size=image_size, hflip=False, seed=0)
    return len(files) / (time.perf_counter() - start)


def read_cost(out, classes: list[str], probes: int = 10) -> float:
    """Median seconds of stage 2's read of one class's latents (``read_class_latents``)."""
    from pipeline.distill.plan import read_class_latents

    picks = [classes[int(i * (len(classes) - 1) / max(probes - 1, 1))] for i in range(min(probes, len(classes)))]
    read_class_latents(out.latents, picks[0])  # warm-up: imports
    times = []
    for c in picks:
        start = time.perf_counter()
        read_class_latents(out.latents, c)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------ one size
VARIANTS = ("overlap", "barrier")


def one_size(classes: int, args, variant: str = "overlap") -> dict:
    import ray

    from pipeline.common.outputs import OutputDir
    from pipeline.config import build_config, validate
    from pipeline.distill.run import run_stages
    from pipeline.inputs.sources import list_source
    from pipeline.models.refs import prior_info

    work = Path(args.work)
    t = time.perf_counter()
    prior = make_prior(work / "prior")
    data = make_data(work / f"data_{classes}", class_wnids(classes), args.per_class, args.image_px)
    prepare_s = time.perf_counter() - t
    out_dir = work / f"out_{classes}_{variant}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a leftover folder would be resumed, not recomputed
    shared = variant == "barrier" and share_latents(work / f"out_{classes}_overlap" / "_work" / "latents",
                                                    out_dir / "_work" / "latents")
    sampler = {"num_steps": args.steps, "t_stop": args.steps // 2}
    if args.max_batch:
        sampler["max_batch"] = args.max_batch
    cfg = validate(build_config({
        "data": {"path": str(data)}, "out": str(out_dir), "ipc": args.ipc,
        "model": {"model": str(prior), "vae": ""}, "sampler": sampler,
        "runtime": {"progress": False, "sample_actors": args.sample_actors}}))
    t = time.perf_counter()
    listing = list_source(cfg.data)
    list_s = time.perf_counter() - t
    assert len(listing.classes) == classes and max(listing.labels.values()) < 1000

    own_ray = not ray.is_initialized()  # --smoke runs both variants on one Ray (the tests': their session's)
    if own_ray:
        ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus, object_store_memory=args.store_mib * MiB,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    import psutil

    rss_before = psutil.Process().memory_info().rss  # after listing and Ray's start, before the run
    peaks = PeakSampler()
    peaks.start()
    try:
        stages = run_stages(cfg, listing, overwrite=True, plan_barrier=variant == "barrier")
    finally:
        peaks.stop()
    record = stages.record
    slots = int(ray.cluster_resources().get("CPU", 1))
    if own_ray:
        ray.shutdown()

    out = OutputDir(cfg.out)
    tm = record["timings_s"]
    plans, units = stages.plans, stages.units
    st = tm  # with plan_barrier, "plan" is the barrier's span and the overlap is 0
    plan_s, overlap_s, plan_and_sample = st["plan"], st["plan_sample_overlap"], st["plan_and_sample"]
    # When units really ran (their own clocks: ended_at - seconds), against the end of stage 2: what the
    # overlap bought is the unit work done while plans were still running.
    called = stages.sample_called_at
    plans_done_at = called + st["plan"]
    unit_starts = [r["ended_at"] - r["seconds"] - called for r in units]
    before_plans_done = sum(min(r["seconds"], max(0.0, plans_done_at - (r["ended_at"] - r["seconds"])))
                            for r in units)
    n_files = listing.num_items
    plan_work = sum(r["seconds"] for r in plans)
    unit_work = sum(r["seconds"] for r in units)
    unit_slots = min(args.sample_actors or slots, max(len(units), 1))  # sampling actors (sample_stage's count)
    sizes = {name: folder_size(out.root / rel) for name, rel in
             (("manifest", "manifest.parquet"), ("latents", "_work/latents"),
              ("centroids", "_work/centroids"), ("train", "train"))}
    result = {
        "classes": classes, "variant": variant, "per_class": args.per_class, "files": n_files, "ipc": args.ipc,
        "steps": args.steps, "max_batch": cfg.sampler.max_batch, "cpus": slots,
        "store_capacity_mib": args.store_mib, "prepare_s": prepare_s, "latents_shared": shared,
        "list_s": list_s, "files_per_s_listed": n_files / list_s,
        "timings_s": tm, "files_per_s_encode_stage": n_files / tm["encode"] if not shared else None,
        "files_per_s_decoded_in_process": decode_rate(listing, prior_info(cfg.model)[0]),
        "plan_s": plan_s, "sample_s": st["sample"], "plan_sample_overlap_s": overlap_s,
        "plan_and_sample_s": plan_and_sample,
        "plan_work_per_class_s": plan_work / classes,
        "plan_overhead_per_class_s": (plan_s * min(slots, classes) - plan_work) / classes,
        "units": len(units),
        "first_unit_start_s": min(unit_starts, default=0.0),
        "unit_work_before_plans_done_s": before_plans_done,
        "gpus": args.gpus,
        "unit_work_s": unit_work / max(len(units), 1),
        "unit_overhead_s": (st["sample"] * unit_slots - unit_work) / max(len(units), 1),
        "read_class_latents_s": read_cost(out, listing.classes),
        "driver_rss_before_run_mib": rss_before / MiB,
        "peak_driver_rss_mib": peaks.peak_rss / MiB,
        "peak_driver_rss_by_stage_mib": stage_peaks(peaks.timeline, tm),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_object_store_mib": peaks.peak_store / MiB,
        "object_store_probe_error": peaks.store_error, "samples": peaks.samples,
        "bytes": {k: v[0] for k, v in sizes.items()}, "file_counts": {k: v[1] for k, v in sizes.items()},
        "images": record["counts"]["images"], "load_average": os.getloadavg(),
        "plan_seconds_by_class": [r["seconds"] for r in plans],
        "unit_seconds": [r["seconds"] for r in units],
    }
    assert result["images"] == classes * args.ipc, result["images"]
    assert len(plans) == classes, len(plans)
    return result


# ------------------------------------------------------------------- real-size costs, one class
def jpeg_like_imagenet(seed: int = 0) -> bytes:
    """A 500 x 375 JPEG (quality 90) of smooth structure plus texture: ImageNet's typical size and weight."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.clip(np.asarray(coarse, np.float32) + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def class_costs(args) -> dict:
    """CPU seconds of stage 2 for one ImageNet-sized class (1,300 x 4,096 latents), on one thread, and
    the one-core rate of decoding + preprocessing ImageNet-sized JPEGs to 256 px."""
    import dataclasses
    import importlib.util

    from threadpoolctl import threadpool_limits

    from ops.selection import select_ipc_nodes
    from pipeline.config import build_config, load_yaml, validate
    from pipeline.distill.plan import plan_class
    from pipeline.inputs.preprocess import decode_image

    spec = importlib.util.spec_from_file_location("bench_ops", HERE.parent / "ops.py")
    bench_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ops)
    X = bench_ops.latent_like(1300, 4096, modes=30, seed=1300)  # what bench/ops.py and bench/gpu.py cluster
    out: dict = {"class_images": 1300, "latent_dim": 4096, "threads": 1}
    with threadpool_limits(1):  # one plan task holds one CPU
        for ipc in (10, 50):
            cfg = validate(build_config(load_yaml(f"imagenet1k_ipc{ipc}")), need_paths=False)  # the presets'
            out[f"config_ipc{ipc}"] = {"tangent": dataclasses.asdict(cfg.tangent), "cluster": dataclasses.asdict(cfg.cluster)}
            start = time.perf_counter()
            select_ipc_nodes(X, ipc, seed=0)
            out[f"select_ipc_nodes_ipc{ipc}_s"] = time.perf_counter() - start
            start = time.perf_counter()
            plan = plan_class(X, cfg)
            out[f"plan_class_ipc{ipc}_s"] = time.perf_counter() - start
            out[f"plan_bases_ipc{ipc}"] = int(plan["bases"].shape[0])
    data = jpeg_like_imagenet()
    decode_image(data, 256)
    reps = 40
    start = time.perf_counter()
    for _ in range(reps):
        arr, reason = decode_image(data, 256)
        assert arr is not None, reason
    out["jpeg_bytes"] = len(data)
    out["jpeg_decode_per_s_one_core"] = reps / (time.perf_counter() - start)
    out["load_average"] = os.getloadavg()
    return out


# ----------------------------------------------------------------------------------- capacity
DATASETS = (  # (name, classes, train images)
    ("ImageNette", 10, 9_469),
    ("ImageNet-100", 100, 126_689),
    ("ImageNet-1K", 1000, 1_281_167),
)
# Per-image work, counted as GPUs count peak FLOP/s (2 FLOP per multiply-add), from
# torch.utils.flop_counter on the random-init models of bench/gpu_sampler.py at 256 px:
DIT_XL_FORWARD_TFLOP = 0.2373   # = 2 x DiT's 118.6 "Gflops", which are multiply-adds
VAE_ENCODE_TFLOP = 0.273
VAE_DECODE_TFLOP = 0.622
# Stage 2 of one 1,300 x 4,096 class at IPC 50 on one H200 with CuPy 14.2 and the Gram route: tree + selection
# 0.46 s + 50 annealed tangent plans 0.42 s (docs/scale.md, "First GPU figures"; python bench/ops.py --only
# routes,stage2 on the lent machine, 2026-11-30). IPC 10 was not measured on the GPU.
PLAN_GPU_IPC50_S = 0.88


def plan_and_sample_s(classes: int, ipc: int, max_batch: int, gpus: int, t_unit: float, load: float,
                      plan_done, planning_gpus: int) -> float:
    """Seconds from the start of stage 2 to the last unit, stages overlapped, by a small list schedule: units
    in order (cross-class, ``max_batch`` samples each), each to the first free sampling actor, started once
    the plans of its classes exist (``plan_done(i)``: when class i's plan is written). ``planning_gpus`` GPUs
    plan and take no actor until the last plan (sample_stage's actor_limit); every actor loads the model
    (``load`` s) once it is placed."""
    import heapq

    last_plan = plan_done(classes - 1)
    ready = [load] * (gpus - planning_gpus) + [last_plan + load] * planning_gpus
    heapq.heapify(ready)
    end = 0.0
    for j in range(math.ceil(classes * ipc / max_batch)):
        last_class = min(classes - 1, ((j + 1) * max_batch - 1) // ipc)
        free = heapq.heappop(ready)
        finish = max(free, plan_done(last_class)) + t_unit
        heapq.heappush(ready, finish)
        end = max(end, finish)
    return end


def capacity(costs: dict, a) -> tuple[list[dict], str]:
    """Hours per stage for each dataset x IPC x GPU count under the stated deployment (an estimate)."""
    per_gpu = a.peak_tflops * a.efficiency                       # TFLOP/s achieved per GPU (assumed)
    sample_tflop = 2 * a.steps * DIT_XL_FORWARD_TFLOP + VAE_DECODE_TFLOP  # CFG: two forwards per step
    rows = []
    for name, classes, images in DATASETS:
        per_class_images = images / classes
        for ipc in (10, 50):
            # stage 2 costs about linearly in the class's images (fixed leaves); on the GPU, IPC 10 is scaled
            # from the measured IPC 50 by the CPU's IPC 10 / IPC 50 ratio (not measured on a GPU)
            size = per_class_images / costs["class_images"]
            t_cpu = costs[f"plan_class_ipc{ipc}_s"] * size + a.plan_overhead_s
            t_gpu = (a.plan_gpu_ipc50_s * costs[f"plan_class_ipc{ipc}_s"] / costs["plan_class_ipc50_s"] * size
                     + a.plan_overhead_s)
            samples = classes * ipc
            units = math.ceil(samples / a.max_batch)                  # cross-class units, classes in label order
            t_unit = a.max_batch * sample_tflop / per_gpu + a.unit_overhead_s
            for gpus in (1, 8, 32):
                # one GPU and cpus_per_gpu CPUs per pod; a VAE actor or a sampling actor holds one of them
                cores = gpus * (a.cpus_per_gpu - 1)
                enc_gpu = images * VAE_ENCODE_TFLOP / (gpus * per_gpu)
                enc_cpu = images / (cores * costs["jpeg_decode_per_s_one_core"])
                enc_io = images * a.jpeg_kb * 1e3 / (a.storage_gbps * 1e9)
                encode = max(enc_gpu, enc_cpu, enc_io) + a.stage_start_s
                # (a) runtime.gpus_per_plan_task 0.25 (the default): CuPy plans on a GPU share, in class order;
                # while plans remain the sampling actors leave one GPU to them (one GPU: plans, then sampling)
                both_gpu = plan_and_sample_s(classes, ipc, a.max_batch, gpus, t_unit, a.model_load_s,
                                             lambda i: (i + 1) * t_gpu, 1)
                # (b) runtime.gpus_per_plan_task 0: numpy plans on the pods' free CPUs; every GPU samples
                both_cpu = plan_and_sample_s(classes, ipc, a.max_batch, gpus, t_unit, a.model_load_s,
                                             lambda i, c=cores: (i // c + 1) * t_cpu, 0)
                plan_gpu, plan_cpu = classes * t_gpu, math.ceil(classes / cores) * t_cpu
                # for reference, the stages as barriers: plans on every GPU's share, then load, then sample
                sample_only = a.model_load_s + math.ceil(units / gpus) * t_unit
                barrier = math.ceil(classes / gpus) * t_gpu + sample_only
                if encode >= both_gpu:
                    limits = {"VAE": enc_gpu, "JPEG decode": enc_cpu, "storage": enc_io}
                    bound = f"encode ({max(limits, key=limits.get)})"
                else:  # the longer of the two: planning (on one GPU while G - 1 sample) or sampling alone
                    bound = "plan (sampling waits for it)" if plan_gpu >= sample_only else "sample"
                rows.append({"dataset": name, "ipc": ipc, "gpus": gpus, "units": units, "encode": encode,
                             "plan_gpu": plan_gpu, "plan_cpu": plan_cpu, "sample_only": sample_only,
                             "both_gpu": both_gpu, "both_cpu": both_cpu, "barrier": barrier,
                             "total": encode + both_gpu + a.ray_start_s,
                             "total_cpu_plans": encode + both_cpu + a.ray_start_s,
                             "bound": bound, "idle_gpus": max(0, gpus - units)})
    lines = ["| dataset | IPC | GPUs | units | encode h | plan h (GPU share / CPUs) | plan + sample h, overlapped "
             "(default / plans on CPUs) | barrier h | total h (default / plans on CPUs) | bound by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        idle = f"; {r['idle_gpus']} GPUs idle while sampling" if r["idle_gpus"] else ""
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['gpus']} | {r['units']} | {r['encode'] / 3600:.3f} | "
                     f"{r['plan_gpu'] / 3600:.3f} / {r['plan_cpu'] / 3600:.3f} | "
                     f"{r['both_gpu'] / 3600:.3f} / {r['both_cpu'] / 3600:.3f} | {r['barrier'] / 3600:.3f} | "
                     f"{r['total'] / 3600:.2f} / {r['total_cpu_plans'] / 3600:.2f} | {r['bound']}{idle} |")
    return rows, "\n".join(lines)


def print_capacity(a, work: Path) -> None:
    from pipeline.config import build_config, load_yaml

    a.max_batch = a.max_batch or build_config(load_yaml("imagenet1k_ipc10")).sampler.max_batch  # the presets'
    costs_file = work / "results" / "class_costs.json"
    if not costs_file.exists() or a.remeasure:
        costs_file.parent.mkdir(parents=True, exist_ok=True)
        costs_file.write_text(json.dumps(class_costs(a), indent=2) + "\n")
    costs = json.loads(costs_file.read_text())
    print("measured here (one thread of this machine):",
          ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in costs.items()
                    if k not in ("load_average", "config_ipc10", "config_ipc50")),
          f"(load average {', '.join(f'{x:.1f}' for x in costs.get('load_average', []))})")
    print(f"deployment: {a.gpu_name}, one GPU and {a.cpus_per_gpu} CPUs per worker pod, 1 / 8 / 32 pods "
          f"(cluster_configs/kuberay-rayjob.yaml runs 8; kuberay-raycluster.yaml scales 0-32); a head pod with "
          f"num-cpus 0 runs the driver; --out on the ReadWriteMany volume, data read at {a.storage_gbps} GB/s "
          f"aggregate ({a.jpeg_kb:.0f} KB files)")
    print(f"config: the imagenet presets with sampler.max_batch {a.max_batch} (units of {a.max_batch} samples, "
          f"{2 * a.max_batch} rows with CFG), {a.steps} steps; runtime defaults (gpus_per_sample_actor 1, "
          f"gpus_per_plan_task 0.25) unless the column says plans on CPUs (gpus_per_plan_task 0)")
    print(f"assumed: {a.peak_tflops:.0f} TFLOP/s peak bf16 x {a.efficiency:.0%} achieved = "
          f"{a.peak_tflops * a.efficiency:.0f} TFLOP/s per GPU at that batch; stage 2 on a GPU share "
          f"{a.plan_gpu_ipc50_s:g} s per 1,300-image class at IPC 50 (measured on an H200), one class at a time "
          f"per GPU; {a.plan_overhead_s:g} s per plan task and {a.unit_overhead_s:g} s per unit of scheduling; "
          f"{a.model_load_s:.0f} s model load; {a.stage_start_s:.0f} s encode start; {a.ray_start_s:.0f} s Ray start")
    print(capacity(costs, a)[1])


# --------------------------------------------------------------------------------------- table
# (label, how to read it from a size's (overlap run, barrier run), format). Stage 2 and 3 work and overhead
# come from the barrier run, where each stage has the CPUs to itself; the rest from the overlap run.
ROWS = (
    ("files (images in)", lambda r, b: r["files"], "{:.0f}"),
    ("list: files/s", lambda r, b: r["files_per_s_listed"], "{:.0f}"),
    ("stage 1 encode: wall s", lambda r, b: r["timings_s"]["encode"], "{:.1f}"),
    ("stage 1 encode: files/s", lambda r, b: r["files_per_s_encode_stage"], "{:.0f}"),
    ("decode in one process: files/s", lambda r, b: r["files_per_s_decoded_in_process"], "{:.0f}"),
    ("stage 2 plan: work per class s", lambda r, b: b["plan_work_per_class_s"], "{:.3f}"),
    ("stage 2 plan: overhead per class s (barrier)", lambda r, b: b["plan_overhead_per_class_s"], "{:.3f}"),
    ("read one class's latents s", lambda r, b: r["read_class_latents_s"], "{:.4f}"),
    ("stage 3 work units", lambda r, b: r["units"], "{:.0f}"),
    ("stage 3 sample: work per unit s", lambda r, b: b["unit_work_s"], "{:.3f}"),
    ("stage 3 sample: overhead per unit s (barrier)", lambda r, b: b["unit_overhead_s"], "{:.3f}"),
    ("barrier: plan wall s", lambda r, b: b["plan_s"], "{:.1f}"),
    ("barrier: sample wall s", lambda r, b: b["sample_s"], "{:.1f}"),
    ("barrier: plan + sample wall s", lambda r, b: b["plan_and_sample_s"], "{:.1f}"),
    ("overlap: plan span s", lambda r, b: r["plan_s"], "{:.1f}"),
    ("overlap: sample span s", lambda r, b: r["sample_s"], "{:.1f}"),
    ("overlap: both running s", lambda r, b: r["plan_sample_overlap_s"], "{:.1f}"),
    ("overlap: plan + sample wall s", lambda r, b: r["plan_and_sample_s"], "{:.1f}"),
    ("overlap: first unit started at s", lambda r, b: r["first_unit_start_s"], "{:.1f}"),
    ("overlap: unit work done before the last plan s", lambda r, b: r["unit_work_before_plans_done_s"], "{:.1f}"),
    ("plan + sample: barrier / overlap", lambda r, b: b["plan_and_sample_s"] / r["plan_and_sample_s"], "{:.2f}"),
    ("total s (run.json, overlap run)", lambda r, b: r["timings_s"]["total"], "{:.1f}"),
    ("driver RSS MiB before run (listed, Ray up)", lambda r, b: r["driver_rss_before_run_mib"], "{:.0f}"),
    ("peak driver RSS MiB (sampled)", lambda r, b: r["peak_driver_rss_mib"], "{:.0f}"),
    ("  during encode", lambda r, b: r["peak_driver_rss_by_stage_mib"]["encode"], "{:.0f}"),
    ("  during plan + sample", lambda r, b: r["peak_driver_rss_by_stage_mib"]["plan_and_sample"], "{:.0f}"),
    ("peak driver RSS MiB (ru_maxrss)", lambda r, b: r["ru_maxrss_mib"], "{:.0f}"),
    ("peak object store MiB", lambda r, b: r["peak_object_store_mib"], "{:.1f}"),
    ("manifest.parquet KiB", lambda r, b: r["bytes"]["manifest"] / 1024, "{:.1f}"),
    ("_work/latents MiB", lambda r, b: r["bytes"]["latents"] / MiB, "{:.2f}"),
    ("_work/latents files", lambda r, b: r["file_counts"]["latents"], "{:.0f}"),
    ("_work/centroids MiB", lambda r, b: r["bytes"]["centroids"] / MiB, "{:.2f}"),
    ("train/ MiB", lambda r, b: r["bytes"]["train"] / MiB, "{:.2f}"),
)


def paired(results: list[dict]) -> list[tuple[dict, dict]]:
    """(overlap run, barrier run) per size, by class count; a size run with one variant pairs it with itself."""
    by_size: dict = {}
    for r in results:
        by_size.setdefault(r["classes"], {})[r.get("variant", "overlap")] = r
    pairs = []
    for n in sorted(by_size):
        runs = by_size[n]
        first = runs.get("overlap") or runs["barrier"]
        pairs.append((first, runs.get("barrier") or first))
    return pairs


def table(results: list[dict]) -> str:
    pairs = paired(results)
    head = ["quantity"] + [f"{r['classes']} classes" for r, _ in pairs]
    head += [f"x {b['classes']}/{a['classes']}" for (a, _), (b, _) in zip(pairs, pairs[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, get, fmt in ROWS:
        vals = [get(r, b) for r, b in pairs]
        cells = ["-" if v is None else fmt.format(v) for v in vals]
        cells += [f"{y / x:.2f}" if x and y is not None else "-" for x, y in zip(vals, vals[1:])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overlap_ratios(results: list[dict]) -> str:
    lines = []
    for r, b in paired(results):
        if r is b:
            continue
        lines.append(f"{r['classes']} classes: plan + sample wall {b['plan_and_sample_s']:.1f} s with stage 2 as a "
                     f"barrier, {r['plan_and_sample_s']:.1f} s overlapped (both running for "
                     f"{r['plan_sample_overlap_s']:.1f} s): barrier / overlap = "
                     f"{b['plan_and_sample_s'] / r['plan_and_sample_s']:.2f}")
    return "\n".join(lines)


def marginal(results: list[dict]) -> str:
    """Per-class cost from the difference of two sizes: fixed costs (Ray Data start, actor and model
    start-up, worker imports) cancel, leaving what one more class costs."""
    pairs = paired(results)
    lines = []
    for (a, ab), (b, bb) in zip(pairs, pairs[1:]):
        dc = b["classes"] - a["classes"]
        parts = [f"encode {(b['timings_s']['encode'] - a['timings_s']['encode']) / dc:.3f} s/class",
                 f"plan + sample overlapped {(b['plan_and_sample_s'] - a['plan_and_sample_s']) / dc:.3f} s/class"]
        if bb is not b and ab is not a:
            parts.append(f"barrier: plan {(bb['plan_s'] - ab['plan_s']) / dc:.3f} s/class, "
                         f"sample {(bb['sample_s'] - ab['sample_s']) / dc:.3f} s/class")
        lines.append(f"marginal {a['classes']} -> {b['classes']} classes: " + "; ".join(parts))
    return "\n".join(lines)


def report(results: list[dict], args) -> None:
    cpus = results[0]["cpus"] if results else "?"
    print(f"per class: {args.per_class} images of {args.image_px} px; IPC {args.ipc}; {args.steps} steps; "
          f"max_batch {results[0]['max_batch'] if results else '?'}; {cpus} CPUs"
          + (f", {results[0]['gpus']} logical GPU(s) (no CUDA: Ray's scheduling only)" if results and results[0].get("gpus")
             else ""))
    print(table(results))
    print(marginal(results))
    print(overlap_ratios(results))


SMOKE = {"sizes": "3", "per_class": 8, "image_px": 16, "ipc": 2, "steps": 4, "max_batch": 4, "store_mib": 256,
         "sample_actors": 1}


def main(argv=None) -> list[dict] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000", help="class counts, each run in a fresh process")
    ap.add_argument("--variants", default="overlap,barrier", help="overlap (the pipeline), barrier (stage 2 first)")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--image-px", type=int, default=32)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=0,
                    help="sampler.max_batch (0: the config's default; with --capacity, the presets')")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--sample-actors", type=int, default=0, help="runtime.sample_actors (0: one per CPU or GPU)")
    ap.add_argument("--gpus", type=int, default=0,
                    help="logical GPUs declared to Ray (no CUDA needed): stages then ask for GPUs as on a GPU "
                         "cluster (plan tasks runtime.gpus_per_plan_task, sampling actors a whole one) and run on "
                         "CPU; shows how Ray schedules the two stages, not GPU speed")
    ap.add_argument("--store-mib", type=int, default=1024, help="object store capacity given to Ray")
    ap.add_argument("--work", default="")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    ap.add_argument("--variant", default="overlap", choices=VARIANTS, help=argparse.SUPPRESS)  # with --one
    ap.add_argument("--report-only", action="store_true", help="print the table from saved results")
    ap.add_argument("--smoke", action="store_true",
                    help="3 classes x 8 images, IPC 2, 4 steps, both variants in this process (tests run it)")
    cap = ap.add_argument_group("capacity table (an estimate from measured CPU costs and assumed GPU speed)")
    cap.add_argument("--capacity", action="store_true", help="print the capacity table and exit")
    cap.add_argument("--remeasure", action="store_true", help="measure the one-class CPU costs again")
    cap.add_argument("--gpu-name", default="H100 / H200 SXM", help="what the deployment line calls the GPU")
    cap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200)")
    cap.add_argument("--efficiency", type=float, default=0.40, help="fraction of peak achieved at max_batch")
    cap.add_argument("--cpus-per-gpu", type=int, default=8, help="CPUs of a one-GPU worker pod (the manifests: 8)")
    cap.add_argument("--plan-gpu-ipc50-s", type=float, default=PLAN_GPU_IPC50_S,
                     help="stage 2 of a 1,300-image class at IPC 50 on one GPU (measured on an H200)")
    cap.add_argument("--plan-overhead-s", type=float, default=0.005, help="scheduling per plan task")
    cap.add_argument("--unit-overhead-s", type=float, default=0.05, help="scheduling and writing per unit")
    cap.add_argument("--storage-gbps", type=float, default=2.0, help="aggregate read rate of the images")
    cap.add_argument("--jpeg-kb", type=float, default=110.0, help="mean input file size")
    cap.add_argument("--model-load-s", type=float, default=60.0)
    cap.add_argument("--stage-start-s", type=float, default=30.0)
    cap.add_argument("--ray-start-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.work = args.work or ("/tmp/mgd-scale-smoke" if args.smoke else "/tmp/mgd-scale")
    work = Path(args.work)
    if args.capacity:
        print_capacity(args, work)
        return None
    results_dir = work / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if args.one:
        result = one_size(args.one, args, args.variant)
        (results_dir / f"scale_{args.one}_{args.variant}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)
        return [result]
    wanted = {int(s) for s in args.sizes.split(",")}
    if args.smoke and not args.report_only:
        import ray

        own_ray = not ray.is_initialized()
        if own_ray:
            ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus, object_store_memory=args.store_mib * MiB,
                     include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    if not args.report_only:
        for stale in results_dir.glob("scale_*.json"):  # a size's variants must come from this one run
            if int(stale.stem.split("_")[1]) in wanted:
                stale.unlink()
        passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}"
                       for k in ("per_class", "image_px", "ipc", "steps", "max_batch", "cpus", "sample_actors",
                                 "gpus", "store_mib", "work")]
        for n in sorted(wanted):
            for variant in variants:  # overlap first: the barrier run reuses its latents
                print(f"--- {n} classes x {args.per_class} images, {variant} ({time.strftime('%H:%M:%S')})", flush=True)
                start = time.perf_counter()
                if args.smoke:  # one process and one Ray: imports and worker start-up once
                    result = one_size(n, args, variant)
                    (results_dir / f"scale_{n}_{variant}.json").write_text(json.dumps(result, indent=2) + "\n")
                else:
                    subprocess.run([sys.executable, str(HERE), f"--one={n}", f"--variant={variant}", *passthrough],
                                   check=True)
                print(f"--- {n} classes, {variant}: done in {time.perf_counter() - start:.0f} s", flush=True)
        if args.smoke and own_ray:
            ray.shutdown()
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("scale_*.json"))]
    results = [r for r in results if r["classes"] in wanted and r.get("variant", "overlap") in variants]
    report(results, args)
    return results


if __name__ == "__main__":
    main()
