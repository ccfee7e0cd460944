"""End-to-end Ray run vs the same stages called in one process, on the same small input.

    .venv/bin/python bench/ray_overhead.py [--classes 4 --per-class 40 --ipc 4 --steps 10]

Prints wall time of each and their ratio (Ray start-up excluded: Ray is initialised before timing), then
VAE-encode throughput with 1 and 2 encode actors. Uses a tiny random prior and generated images, so it
measures orchestration overhead, not model speed. Ratios are from one run on this machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# bench/ holds ops.py and sampler.py: drop it from the path so `ops` and `pipeline` are the packages
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.common.synthetic import save_tiny_prior, write_image_folder  # noqa: E402


def in_process(cfg, listing, image_size):
    """Stages 1-3 without Ray: the same functions, called in a loop."""
    import numpy as np

    from pipeline.common.outputs import OutputDir
    from pipeline.distill.encode import VAEEncoder, decode_batch
    from pipeline.distill.plan import plan_class
    from pipeline.distill.sample import ClassSampler

    out = OutputDir(cfg.out)
    base = Path(listing.root)
    enc = VAEEncoder(cfg.to_dict()["model"], threads=0)
    by_class: dict[str, list] = {}
    for i in range(0, len(listing.files), cfg.runtime.encode_batch_size):
        chunk = listing.files[i:i + cfg.runtime.encode_batch_size]
        batch = {"id": np.asarray([r for r, _ in chunk], dtype=object),
                 "class_name": np.asarray([c for _, c in chunk], dtype=object),
                 "label": np.asarray([listing.labels[c] for _, c in chunk]),
                 "bytes": np.asarray([(base / r).read_bytes() for r, _ in chunk], dtype=object)}
        res = enc(decode_batch(batch, image_size=image_size, hflip=False, seed=cfg.seed))
        for c, lat in zip(res["class_name"], res["latent"]):
            by_class.setdefault(c, []).append(lat)
    sampler = ClassSampler(cfg.to_dict(), threads=0)
    import io

    for c, lats in sorted(by_class.items()):
        plan = plan_class(np.stack(lats), cfg)
        buf = io.BytesIO()
        np.savez(buf, **plan)
        out.centroid_file(c).parent.mkdir(parents=True, exist_ok=True)
        out.centroid_file(c).write_bytes(buf.getvalue())
        sampler.run_class(c, listing.labels[c])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--ipc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import ray

    from pipeline.common.outputs import OutputDir
    from pipeline.config import build_config, validate
    from pipeline.distill.encode import encode_stage
    from pipeline.distill.run import run
    from pipeline.inputs.sources import list_source
    from pipeline.models.refs import prior_info

    tmp = Path(tempfile.mkdtemp(prefix="mgd-bench-"))
    prior = save_tiny_prior(tmp / "prior", num_classes=args.classes)
    data = write_image_folder(tmp / "data", {f"c{i}": args.per_class for i in range(args.classes)})

    def config(out):
        return validate(build_config({
            "data": {"path": str(data)}, "out": str(out), "ipc": args.ipc,
            "model": {"model": str(prior), "vae": ""}, "tangent": {"neighbours": 4, "dim": 2},
            "sampler": {"num_steps": args.steps, "t_stop": args.steps // 2},
            "runtime": {"progress": False}}))

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cfg = config(tmp / "ray")
    listing = list_source(cfg.data)
    size = prior_info(cfg.model)[0]
    t = time.perf_counter()
    run(cfg, listing)
    t_ray = time.perf_counter() - t

    cfg_local = config(tmp / "local")
    OutputDir(cfg_local.out).work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    in_process(cfg_local, listing, size)
    t_local = time.perf_counter() - t
    n = args.classes * args.per_class
    print(f"input: {args.classes} classes x {args.per_class} images, IPC {args.ipc}, {args.steps} steps, "
          f"{os.cpu_count()} CPUs")
    print(f"end-to-end through Ray: {t_ray:.2f}s   in one process: {t_local:.2f}s   "
          f"ratio {t_ray / t_local:.2f}x (target <= 1.5x)")

    for actors in (1, 2):
        cfg_a = config(tmp / f"enc{actors}")
        cfg_a.runtime.encode_actors = actors
        out = OutputDir(cfg_a.out)
        out.prepare(cfg_a, overwrite=False)
        t = time.perf_counter()
        encode_stage(cfg_a, listing, out, size)
        dt = time.perf_counter() - t
        print(f"encode with {actors} actor(s): {n / dt:.1f} images/s ({dt:.2f}s)")
    ray.shutdown()


if __name__ == "__main__":
    main()
