"""What a run leaves beside its images, and what it says about itself: run.json's record (package versions,
hardware, timings' meanings, the device each stage's workers used), manifest.parquet, quarantine.parquet,
classes.json's rows and the output folder's device stamp."""
from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.common.device import summarize
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_table
from pipeline.distill.encode import encode_devices

log = get_logger().info

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


def write_manifest(out: OutputDir, classes: list[str], listing) -> int:
    """manifest.parquet: the classes' manifest parts, plus ``source_label`` (each row's original label)."""
    parts = [pq.read_table(out.manifest_part(c)) for c in classes if out.manifest_part(c).exists()]
    if not parts:
        return 0
    table = pa.concat_tables(parts)
    source = [listing.source_label(c) for c in table.column("class").to_pylist()]
    table = table.add_column(table.schema.get_field_index("class") + 1, "source_label",
                             pa.array(source, type=pa.string()))
    atomic_write_table(out.root / "manifest.parquet", table)
    return table.num_rows


def class_map_rows(listing) -> list[dict]:
    """One row per class, in label order: folder name, label id, original label (what classes.json holds)."""
    return [{"class": c, "label": int(listing.labels[c]), "source_label": listing.source_label(c)}
            for c in sorted(listing.classes, key=lambda c: (listing.labels[c], c))]


TIMINGS_COVER = {
    "ray_init": "from the start of run() to Ray being up (model check and output folder included)",
    "encode": "stage 1, wall: encode, quarantine list, latent counts",
    "plan": "stage 2 span: from submitting the plan tasks to the last plan result (overlaps 'sample')",
    "sample": "stage 3 span: from requesting the first sampling actor to the last unit done (model loads "
              "included; overlaps 'plan')",
    "plan_sample_overlap": "seconds during which both spans ran (plan + sample - overlap <= plan_and_sample)",
    "plan_and_sample": "wall time of stages 2 and 3 together, from submitting the plans to the last class "
                       "finalized",
    "total": "wall time of run(), manifest included",
}


def stage_devices(out: OutputDir, plans: list[dict], sampled: list[dict]) -> dict:
    """Per stage, the device each worker actually used (one record per worker process: its node, pid, the GPU
    ids Ray gave it, the device it ran on, and why it fell back to CPU if it did). Plans and units this run
    did not compute (a resume) have no record."""
    return {"encode": encode_devices(out), "plan": summarize(p.get("worker") for p in plans),
            "sample": summarize(r.get("worker") for r in sampled)}


def warn_fallbacks(devices: dict) -> None:
    """One driver line per stage whose workers were given a GPU but ran on CPU (runtime.device=auto)."""
    for stage, records in devices.items():
        fell = [r for r in records if r.get("fallback")]
        if fell:
            log(f"warning: {stage}: {len(fell)} of {len(records)} worker(s) were given a GPU but ran on CPU "
                f"(run.json 'devices'); first: {fell[0]['fallback']}")


def used_device_kind(devices: dict) -> str | None:
    """The kind of device the torch stages' workers of this run really used (``cuda``, ``cpu``, ``mixed``), or
    None when they computed nothing this run (a resume that found the work done)."""
    kinds = {"cuda" if str(r["device"]).startswith("cuda") else "cpu"
             for stage in ("encode", "sample") for r in devices.get(stage, [])}
    return None if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


def restamp_device(out: OutputDir, kind: str, devices: dict) -> str:
    """When workers fell back to CPU (runtime.device=auto on a GPU torch cannot use), stamp the folder with the
    kind they really used, so that a resume on the other kind is refused rather than mixing two devices' bytes.
    Returns the kind the folder is stamped with."""
    used = used_device_kind(devices)
    if used is None or used == kind:
        return kind
    out.stamp_device(used)
    log(f"warning: this run asked for {kind} but its workers ran on {used}; the output folder is stamped {used}, "
        "so a resume on another kind of device is refused (docs/pipeline.md, Devices)")
    return used
