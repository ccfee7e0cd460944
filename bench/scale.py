"""Scale rehearsal: ImageNet-1K's class structure through the real `distill` pipeline on this machine.

For each class count (10 = Imagenette's wnids, 100 = ImageNet-100's, 1,000 = ImageNet-1K's, all from the
shipped lists in pipeline/data/), it writes an ImageFolder of small PNGs per class, saves a tiny
random-init prior with 1,000 classes (wnid folders map to their ImageNet-1K index), and runs
``pipeline.distill.run.run`` at IPC 10 in a fresh process (so that ``ru_maxrss`` is that size's own peak),
with Ray started by the script. It records:

- wall time per stage (run.json ``timings_s``), files/s listed, files/s through the encode stage, and
  files/s decoded in one process (read + DiT preprocessing, no Ray) for reference;
- per-class scheduling overhead of stage 2 (plan tasks) and stage 3 (sampling actors): stage wall time x
  slots, minus the work each class reported (its own ``seconds``), per class;
- the cost of reading one class's latents (``read_class_latents``) after the run, at each size;
- peak driver RSS (psutil, sampled every 0.2 s, and ``ru_maxrss``) and peak object-store use (raylet
  store stats, sampled every 0.5 s) against the store's capacity;
- bytes and files of manifest.parquet, _work/latents, _work/centroids and train/.

Then it prints one table with the 100/10 and 1000/100 ratios (class counts grow 10x each step, so a
linear quantity shows ~10x and a flat one ~1x).

    nice -n 10 .venv/bin/python bench/scale.py --sizes 10,100,1000 --per-class 50 --work /tmp/mgd-scale
    .venv/bin/python bench/scale.py --report-only --work /tmp/mgd-scale     # the table from saved results

The tiny prior has 16 px images and 4 x 4 x 4 = 64-d latents (DiT-XL/2: 4,096-d), so model work is near
zero and what is measured is the pipeline's own cost: listing, Ray Data, task/actor scheduling, parquet,
PNG writing. Every figure comes from this one run on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(1, str(ROOT / "tests"))

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
    from conftest import write_image_folder

    if not (root / "_DONE").exists():
        write_image_folder(root, {w: per_class for w in wnids}, size=size)
        (root / "_DONE").write_text("ok\n")
    return root


def make_prior(folder: Path) -> Path:
    from conftest import save_tiny_prior

    if not (folder / "transformer").is_dir():
        save_tiny_prior(folder, num_classes=1000)
    return folder


# ------------------------------------------------------------------------------------ sampling
class PeakSampler(threading.Thread):
    """Polls driver RSS (every 0.2 s) and object-store bytes in use (every 0.5 s) until stopped."""

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

    def _store_bytes(self, state) -> tuple[int, int]:
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(state, timeout_seconds=5).store_stats
        return int(stats.object_store_bytes_used), int(stats.object_store_bytes_avail)

    def run(self) -> None:
        import ray
        from ray._private.internal_api import get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        last_store = 0.0
        while not self.stop_flag.is_set():
            rss = self.proc.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            self.timeline.append((time.monotonic() - self.t0, rss))
            if time.monotonic() - last_store >= 0.5:
                last_store = time.monotonic()
                try:
                    used, avail = self._store_bytes(state)
                    self.peak_store = max(self.peak_store, used)
                    self.store_capacity = avail
                except Exception as exc:  # a probe must never break the run it measures
                    self.store_error = f"{type(exc).__name__}: {exc}"[:200]
            self.samples += 1
            self.stop_flag.wait(0.2)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


def stage_peaks(timeline: list[tuple[float, int]], timings: dict) -> dict:
    """Peak driver RSS (MiB) within each stage's window; the stages run one after another in ``run``."""
    bounds, t = {}, 0.0
    for stage in ("ray_init", "encode", "plan", "sample"):
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


def capture(module, name: str, sink: dict):
    """Wrap ``module.name`` so its return value is kept in ``sink[name]`` (the driver looks the stage
    functions up at call time, so ``run`` goes through the wrapper unchanged)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        sink[name] = result
        return result

    setattr(module, name, wrapper)


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


def read_partition_only(latents_dir: Path, class_name: str):
    """The proposed fix to ``read_class_latents``: open only the class's own partition folder, so the
    cost does not grow with the number of classes (pyarrow lists every file of a dataset it opens)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    part = pds.partitioning(pa.schema([("class_name", pa.string())]), flavor="hive")
    folder = Path(latents_dir) / part.format(pc.field("class_name") == class_name)[0]
    return pds.dataset(str(folder), format="parquet").to_table(columns=["id", "latent"],
                                                                filter=pc.field("error") == "")


def read_costs(out, classes: list[str], probes: int = 10) -> dict:
    """Median seconds to read one class's latents: as stage 2 does now, and partition-only."""
    from pipeline.distill.plan import read_class_latents

    picks = [classes[int(i * (len(classes) - 1) / max(probes - 1, 1))] for i in range(min(probes, len(classes)))]
    result = {}
    for name, fn in (("read_class_latents_s", read_class_latents), ("read_partition_only_s", read_partition_only)):
        fn(out.latents, picks[0])  # warm-up: imports
        times = []
        for c in picks:
            start = time.perf_counter()
            fn(out.latents, c)
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return result


# ------------------------------------------------------------------------------------ one size
def one_size(classes: int, args) -> dict:
    import ray

    from pipeline.common.outputs import OutputDir
    from pipeline.config import build_config, validate
    from pipeline.distill.run import run as distill
    from pipeline.inputs.sources import list_source
    from pipeline.models.refs import prior_info

    work = Path(args.work)
    t = time.perf_counter()
    prior = make_prior(work / "prior")
    data = make_data(work / f"data_{classes}", class_wnids(classes), args.per_class, args.image_px)
    prepare_s = time.perf_counter() - t
    out_dir = work / f"out_{classes}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a leftover folder would be resumed, not recomputed
    cfg = validate(build_config({
        "data": {"path": str(data)}, "out": str(out_dir), "ipc": args.ipc,
        "model": {"model": str(prior), "vae": ""},
        "sampler": {"num_steps": args.steps, "t_stop": args.steps // 2},
        "runtime": {"progress": False}}))
    t = time.perf_counter()
    listing = list_source(cfg.data)
    list_s = time.perf_counter() - t
    assert len(listing.classes) == classes and max(listing.labels.values()) < 1000

    ray.init(address="local", num_cpus=args.cpus, object_store_memory=args.store_mib * MiB,
             include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    stages: dict = {}
    capture(distill, "plan_stage", stages)
    capture(distill, "sample_stage", stages)
    import psutil

    rss_before = psutil.Process().memory_info().rss  # after listing and Ray's start, before the run
    peaks = PeakSampler()
    peaks.start()
    try:
        record = distill.run(cfg, listing, overwrite=True)
    finally:
        peaks.stop()
    slots = int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()

    out = OutputDir(cfg.out)
    tm = record["timings_s"]
    n_files = listing.num_items
    plan_work = sum(r["seconds"] for r in stages.get("plan_stage", []))
    sample_res = stages.get("sample_stage", [])
    sample_work = sum(r["seconds"] for r in sample_res)
    sample_slots = min(slots, classes)
    sizes = {name: folder_size(out.root / rel) for name, rel in
             (("manifest", "manifest.parquet"), ("latents", "_work/latents"),
              ("centroids", "_work/centroids"), ("train", "train"))}
    result = {
        "classes": classes, "per_class": args.per_class, "files": n_files, "ipc": args.ipc, "steps": args.steps,
        "cpus": slots, "store_capacity_mib": args.store_mib, "prepare_s": prepare_s,
        "list_s": list_s, "files_per_s_listed": n_files / list_s,
        "timings_s": tm, "files_per_s_encode_stage": n_files / tm["encode"],
        "files_per_s_decoded_in_process": decode_rate(listing, prior_info(cfg.model)[0]),
        "plan_work_per_class_s": plan_work / classes,
        "plan_wall_per_class_s": tm["plan"] / classes,
        "plan_overhead_per_class_s": (tm["plan"] * min(slots, classes) - plan_work) / classes,
        "sample_classes": len(sample_res),
        "sample_work_per_class_s": sample_work / max(len(sample_res), 1),
        "sample_wall_per_class_s": tm["sample"] / max(len(sample_res), 1),
        "sample_overhead_per_class_s": (tm["sample"] * sample_slots - sample_work) / max(len(sample_res), 1),
        **read_costs(out, listing.classes),
        "driver_rss_before_run_mib": rss_before / MiB,
        "peak_driver_rss_mib": peaks.peak_rss / MiB,
        "peak_driver_rss_by_stage_mib": stage_peaks(peaks.timeline, tm),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_object_store_mib": peaks.peak_store / MiB,
        "object_store_probe_error": peaks.store_error, "samples": peaks.samples,
        "bytes": {k: v[0] for k, v in sizes.items()}, "file_counts": {k: v[1] for k, v in sizes.items()},
        "images": record["counts"]["images"], "load_average": os.getloadavg(),
        "plan_seconds_by_class": [r["seconds"] for r in stages.get("plan_stage", [])],
        "sample_seconds_by_class": [r["seconds"] for r in sample_res],
    }
    assert result["images"] == classes * args.ipc, result["images"]
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
    import importlib.util

    from threadpoolctl import threadpool_limits

    from ops.selection import select_ipc_nodes
    from pipeline.config import build_config, validate
    from pipeline.distill.plan import plan_class
    from pipeline.inputs.preprocess import decode_image

    spec = importlib.util.spec_from_file_location("bench_ops", HERE.parent / "ops.py")
    bench_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ops)
    X = bench_ops.latent_like(1300, 4096, modes=30, seed=1300)  # what bench/ops.py and bench/gpu.py cluster
    out: dict = {"class_images": 1300, "latent_dim": 4096, "threads": 1}
    with threadpool_limits(1):  # one plan task holds one CPU
        for ipc in (10, 50):
            cfg = validate(build_config({"ipc": ipc}), need_paths=False)
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


def capacity(costs: dict, scale: dict | None, a) -> tuple[list[dict], str]:
    """Hours per stage for each dataset x IPC x GPU count under the stated assumptions (an estimate)."""
    import math

    per_gpu = a.peak_tflops * a.efficiency                       # TFLOP/s achieved per GPU (assumed)
    sample_tflop = 2 * a.steps * DIT_XL_FORWARD_TFLOP + VAE_DECODE_TFLOP  # CFG: two forwards per step
    overhead_plan = scale["plan_overhead_per_class_s"] if scale else 0.0
    overhead_sample = scale["sample_overhead_per_class_s"] if scale else 0.0
    rows = []
    for name, classes, images in DATASETS:
        per_class_images = images / classes
        for ipc in (10, 50):
            # stage 2's divisive tree costs about linearly in the class's images (fixed leaves)
            t_class = costs[f"plan_class_ipc{ipc}_s"] * per_class_images / costs["class_images"]
            for gpus in (1, 8, 32):
                cores = gpus * a.cores_per_gpu
                enc_gpu = images * VAE_ENCODE_TFLOP / (gpus * per_gpu)
                enc_cpu = images / (cores * costs["jpeg_decode_per_s_one_core"])
                enc_io = images * a.jpeg_kb * 1e3 / (a.storage_gbps * 1e9)
                encode = max(enc_gpu, enc_cpu, enc_io) + a.stage_start_s
                plan = math.ceil(classes / cores) * (t_class + overhead_plan)
                # one class goes through one actor (one GPU): fewer classes than GPUs leaves GPUs idle
                sample = (math.ceil(classes / gpus) * (ipc * sample_tflop / per_gpu + overhead_sample)
                          + a.model_load_s)
                stages = {"encode": encode, "plan": plan, "sample": sample}
                bound = max(stages, key=stages.get)
                if bound == "encode":
                    limits = {"VAE": enc_gpu, "JPEG decode": enc_cpu, "storage": enc_io}
                    bound += f" ({max(limits, key=limits.get)})"
                rows.append({"dataset": name, "ipc": ipc, "gpus": gpus, **stages,
                             "total": sum(stages.values()) + a.ray_start_s, "bound": bound,
                             "gpus_used_sampling": min(gpus, classes)})
    lines = ["| dataset | IPC | GPUs | encode h | plan h | sample h | total h | bound by |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        idle_gpus = r["gpus"] - r["gpus_used_sampling"]
        idle = f"; {idle_gpus} GPUs idle while sampling" if idle_gpus else ""
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['gpus']} | {r['encode'] / 3600:.3f} | "
                     f"{r['plan'] / 3600:.3f} | {r['sample'] / 3600:.3f} | {r['total'] / 3600:.2f} | "
                     f"{r['bound']}{idle} |")
    return rows, "\n".join(lines)


def print_capacity(a, work: Path) -> None:
    costs_file = work / "results" / "class_costs.json"
    if not costs_file.exists() or a.remeasure:
        costs_file.parent.mkdir(parents=True, exist_ok=True)
        costs_file.write_text(json.dumps(class_costs(a), indent=2) + "\n")
    costs = json.loads(costs_file.read_text())
    scale_file = work / "results" / "scale_1000.json"
    scale = json.loads(scale_file.read_text()) if scale_file.exists() else None
    print("measured here (one thread of this 2-core box):",
          ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in costs.items()
                    if k != "load_average"))
    if scale:
        print(f"per-class overhead from the 1,000-class rehearsal: plan {scale['plan_overhead_per_class_s']:.3f} s, "
              f"sample {scale['sample_overhead_per_class_s']:.3f} s")
    print(f"assumed: {a.peak_tflops:.0f} TFLOP/s peak bf16 x {a.efficiency:.0%} achieved = "
          f"{a.peak_tflops * a.efficiency:.0f} TFLOP/s per GPU; {a.cores_per_gpu} CPU cores per GPU; "
          f"storage {a.storage_gbps} GB/s for {a.jpeg_kb:.0f} KB JPEGs; {a.model_load_s:.0f} s model load; "
          f"{a.stage_start_s:.0f} s encode start; {a.ray_start_s:.0f} s Ray start; {a.steps} steps with CFG")
    print(capacity(costs, scale, a)[1])


# --------------------------------------------------------------------------------------- table
ROWS = (  # (label, how to read it from a result, format)
    ("files (images in)", lambda r: r["files"], "{:.0f}"),
    ("list: files/s", lambda r: r["files_per_s_listed"], "{:.0f}"),
    ("stage 1 encode: wall s", lambda r: r["timings_s"]["encode"], "{:.1f}"),
    ("stage 1 encode: files/s", lambda r: r["files_per_s_encode_stage"], "{:.0f}"),
    ("decode in one process: files/s", lambda r: r["files_per_s_decoded_in_process"], "{:.0f}"),
    ("stage 2 plan: wall s", lambda r: r["timings_s"]["plan"], "{:.1f}"),
    ("stage 2 plan: work per class s", lambda r: r["plan_work_per_class_s"], "{:.3f}"),
    ("stage 2 plan: overhead per class s", lambda r: r["plan_overhead_per_class_s"], "{:.3f}"),
    ("read one class's latents s (stage 2 now)", lambda r: r["read_class_latents_s"], "{:.4f}"),
    ("  reading its partition only s", lambda r: r.get("read_partition_only_s", float("nan")), "{:.4f}"),
    ("stage 3 sample: wall s", lambda r: r["timings_s"]["sample"], "{:.1f}"),
    ("stage 3 sample: work per class s", lambda r: r["sample_work_per_class_s"], "{:.3f}"),
    ("stage 3 sample: overhead per class s", lambda r: r["sample_overhead_per_class_s"], "{:.3f}"),
    ("total s (run.json)", lambda r: r["timings_s"]["total"], "{:.1f}"),
    ("driver RSS MiB before run (listed, Ray up)", lambda r: r["driver_rss_before_run_mib"], "{:.0f}"),
    ("peak driver RSS MiB (sampled)", lambda r: r["peak_driver_rss_mib"], "{:.0f}"),
    ("  during encode", lambda r: r["peak_driver_rss_by_stage_mib"]["encode"], "{:.0f}"),
    ("  during plan", lambda r: r["peak_driver_rss_by_stage_mib"]["plan"], "{:.0f}"),
    ("  during sample", lambda r: r["peak_driver_rss_by_stage_mib"]["sample"], "{:.0f}"),
    ("peak driver RSS MiB (ru_maxrss)", lambda r: r["ru_maxrss_mib"], "{:.0f}"),
    ("peak object store MiB", lambda r: r["peak_object_store_mib"], "{:.1f}"),
    ("manifest.parquet KiB", lambda r: r["bytes"]["manifest"] / 1024, "{:.1f}"),
    ("_work/latents MiB", lambda r: r["bytes"]["latents"] / MiB, "{:.2f}"),
    ("_work/latents files", lambda r: r["file_counts"]["latents"], "{:.0f}"),
    ("_work/centroids MiB", lambda r: r["bytes"]["centroids"] / MiB, "{:.2f}"),
    ("train/ MiB", lambda r: r["bytes"]["train"] / MiB, "{:.2f}"),
)


def table(results: list[dict]) -> str:
    results = sorted(results, key=lambda r: r["classes"])
    head = ["quantity"] + [f"{r['classes']} classes" for r in results]
    head += [f"x {b['classes']}/{a['classes']}" for a, b in zip(results, results[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, get, fmt in ROWS:
        vals = [get(r) for r in results]
        cells = [fmt.format(v) for v in vals]
        cells += [f"{b / a:.2f}" if a else "-" for a, b in zip(vals, vals[1:])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def marginal(results: list[dict]) -> str:
    """Per-class cost from the difference of two sizes: fixed costs (Ray Data start, actor and model
    start-up, worker imports) cancel, leaving what one more class costs."""
    results = sorted(results, key=lambda r: r["classes"])
    lines = []
    for a, b in zip(results, results[1:]):
        dc = b["classes"] - a["classes"]
        parts = []
        for stage in ("encode", "plan", "sample"):
            per_class = (b["timings_s"][stage] - a["timings_s"][stage]) / dc
            text = f"{stage} {per_class:.3f} s/class"
            if stage != "encode":
                slots = min(b["cpus"], b["classes"])
                # the median: the first class on each worker also pays its imports, a fixed cost
                work = statistics.median(b[f"{stage}_seconds_by_class"])
                text += f" (x {slots} slots - median work {work:.3f} = overhead {per_class * slots - work:.3f})"
            parts.append(text)
        lines.append(f"marginal {a['classes']} -> {b['classes']} classes: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000", help="class counts, each run in a fresh process")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--image-px", type=int, default=32)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--store-mib", type=int, default=1024, help="object store capacity given to Ray")
    ap.add_argument("--work", default="/tmp/mgd-scale")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    ap.add_argument("--report-only", action="store_true", help="print the table from saved results")
    cap = ap.add_argument_group("capacity table (an estimate from measured CPU costs and assumed GPU speed)")
    cap.add_argument("--capacity", action="store_true", help="print the capacity table and exit")
    cap.add_argument("--remeasure", action="store_true", help="measure the one-class CPU costs again")
    cap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200)")
    cap.add_argument("--efficiency", type=float, default=0.40, help="fraction of peak achieved")
    cap.add_argument("--cores-per-gpu", type=int, default=12)
    cap.add_argument("--storage-gbps", type=float, default=2.0, help="aggregate read rate of the images")
    cap.add_argument("--jpeg-kb", type=float, default=110.0, help="mean input file size")
    cap.add_argument("--model-load-s", type=float, default=60.0)
    cap.add_argument("--stage-start-s", type=float, default=30.0)
    cap.add_argument("--ray-start-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.capacity:
        print_capacity(args, work)
        return
    results_dir = work / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.one:
        result = one_size(args.one, args)
        (results_dir / f"scale_{args.one}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)
        return
    if not args.report_only:
        passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}"
                       for k in ("per_class", "image_px", "ipc", "steps", "cpus", "store_mib", "work")]
        for n in (int(s) for s in args.sizes.split(",")):
            print(f"--- {n} classes x {args.per_class} images ({time.strftime('%H:%M:%S')})", flush=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, str(HERE), f"--one={n}", *passthrough], check=True)
            print(f"--- {n} classes done in {time.perf_counter() - start:.0f} s", flush=True)
    wanted = {int(s) for s in args.sizes.split(",")}
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("scale_*.json"))]
    results = [r for r in results if r["classes"] in wanted]
    print(f"per class: {args.per_class} images of {args.image_px} px; IPC {args.ipc}; {args.steps} steps; "
          f"{results[0]['cpus'] if results else '?'} CPUs")
    print(table(results))
    print(marginal(results))


if __name__ == "__main__":
    main()
