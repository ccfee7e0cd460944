"""Padding waste of stage 1 (encode): rows padded / rows encoded, through the real ``encode_stage``.

The VAE runs in calls of exactly ``model.encode_batch`` rows (``VAEEncoder._encode_padded`` zero-pads the last
call of each Ray Data batch, so that each latent's bytes do not depend on its batch-mates). Ray Data hands the
VAE actors batches of ``runtime.encode_batch_size`` rows cut from bundles of the decode stage's blocks; every
bundle's remainder is a short batch, and every short batch ends in a padded call. How many rows that pads
depends on the block structure Ray Data makes, so it is measured, not computed: this script runs the
pipeline's own ``encode_stage`` (read, decode, the VAE actor pool, the parquet write) on an ImageFolder, with
the VAE actor replaced by one that counts instead of encoding (the same ``__call__``, only
``_encode_padded`` swapped), at the batch sizes of a preset. ``--gpus N`` declares logical GPUs to Ray, so the
VAE operator asks for a GPU as it does on a GPU cluster (``runtime.device`` auto): Ray Data then runs decoding
as separate tasks instead of fusing it into the VAE actors, and the bundles the actors get differ.

    .venv/bin/python bench/encode_padding.py --classes 1000 --per-class 50 --preset imagenet1k_ipc50
    .venv/bin/python bench/encode_padding.py --data /tmp/mgd-scale/data_1000 --preset imagenet1k_ipc50 --gpus 1
    .venv/bin/python bench/encode_padding.py --smoke          # 3 classes, a few seconds after Ray is up

Prints rows encoded, rows padded, the ratio, VAE calls, Ray Data batches and their size histogram.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]  # bench/ops.py is not `ops`
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))


def counting_encoder(base, report_dir: str):
    """A VAEEncoder that loads no model: it counts the rows each fixed-size VAE call would encode and pad.
    Defined here (not importable by the workers), so Ray ships the class itself, counters included."""
    import numpy as np

    class CountingEncoder(base):
        def __init__(self, model: dict, threads: int = 0, micro_batch: int = 64, device: str = "auto",
                     report_dir_: str = report_dir, **_):
            self.micro_batch = micro_batch
            self.device = "cpu"
            self.counts = collections.Counter()
            self.sizes = collections.Counter()
            self.path = Path(report_dir_) / f"{os.getpid()}-{id(self)}.json"

        def latent_dim(self, image_size: int) -> int:
            return 4

        def _encode_padded(self, pixels):
            n = len(pixels)
            calls = -(-n // self.micro_batch)
            self.counts["rows_encoded"] += n
            self.counts["rows_padded"] += calls * self.micro_batch - n
            self.counts["vae_calls"] += calls
            self.counts["batches"] += 1
            self.sizes[n] += 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"counts": self.counts, "sizes": self.sizes}))
            return np.zeros((n, 4), np.float32)

    return CountingEncoder


def measure(data: Path, preset: str, image_px: int, work: Path, overrides: list[str]) -> dict:
    import ray

    from pipeline.common.outputs import OutputDir
    from pipeline.config import validate
    from pipeline.distill import encode
    from pipeline.distill.run import resolve_distill_config
    from pipeline.inputs.sources import list_source

    cfg = resolve_distill_config(data=str(data), out=str(work / "out"), config_file=preset,
                                 overrides=["runtime.progress=false", *overrides])
    cfg.model.model, cfg.model.vae = "unused", ""
    validate(cfg, need_paths=False)
    listing = list_source(cfg.data)
    out = OutputDir(cfg.out)
    out.root.mkdir(parents=True, exist_ok=True)
    reports = work / "counts"
    real = encode.VAEEncoder
    encode.VAEEncoder = counting_encoder(real, str(reports))
    try:
        t = time.perf_counter()
        encode.encode_stage(cfg, listing, out, image_px)
        seconds = time.perf_counter() - t
    finally:
        encode.VAEEncoder = real
    counts, sizes = collections.Counter(), collections.Counter()
    for f in reports.glob("*.json"):
        rec = json.loads(f.read_text())
        counts.update(rec["counts"])
        sizes.update({int(k): v for k, v in rec["sizes"].items()})
    assert counts["rows_encoded"] == listing.num_items, (counts, listing.num_items)
    return {"files": listing.num_items, "encode_batch_size": cfg.runtime.encode_batch_size,
            "encode_batch": cfg.model.encode_batch, "cpus": ray.cluster_resources().get("CPU", 0),
            "gpus": ray.cluster_resources().get("GPU", 0),
            "seconds": round(seconds, 1), **counts, "padded_per_encoded": counts["rows_padded"] / counts["rows_encoded"],
            "batch_sizes": dict(sorted(sizes.items()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an ImageFolder (default: write --classes x --per-class small PNGs)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--image-px", type=int, default=32)
    ap.add_argument("--preset", default="imagenet1k_ipc50", help="a packaged preset or config file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=0,
                    help="logical GPUs declared to Ray: the VAE operator then asks for a GPU as on a GPU cluster, "
                         "which changes how Ray Data fuses and bundles the stages (the counting actor needs none)")
    ap.add_argument("--work", default="")
    ap.add_argument("--smoke", action="store_true", help="3 classes x 10 images")
    args = ap.parse_args(argv)
    if args.smoke:
        args.classes, args.per_class = 3, 10
    import ray
    from conftest import write_image_folder

    work = Path(args.work or tempfile.mkdtemp(prefix="mgd-padding-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else work / f"data_{args.classes}x{args.per_class}"
    if not args.data and not (data / "_DONE").exists():
        write_image_folder(data, {f"c{i:04d}": args.per_class for i in range(args.classes)}, size=args.image_px)
        (data / "_DONE").write_text("ok\n")
    ray.init(address="local", num_cpus=args.cpus, num_gpus=args.gpus, include_dashboard=False, logging_level="ERROR",
             object_store_memory=1024 * 2**20)
    try:
        res = measure(data, args.preset, args.image_px, work / f"run-{time.time_ns()}", args.set)
    finally:
        ray.shutdown()
    print(json.dumps(res, indent=1))
    print(f"{res['files']} files, Ray Data batches of {res['encode_batch_size']}, VAE calls of {res['encode_batch']}: "
          f"{res['rows_padded']} rows padded / {res['rows_encoded']} encoded = {res['padded_per_encoded']:.3f} "
          f"({res['vae_calls']} VAE calls, {res['batches']} batches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
