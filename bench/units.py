"""Stage 3's sampling calls: cross-class work units vs one class per call, same max_batch, one process.

    .venv/bin/python bench/units.py [--classes 24 --ipc 1 10 --steps 50 --max-batch 64 --repeat 1]

For each IPC, runs every unit of a run through ``ClassSampler.run_unit`` (the sampling actor's own method:
the guided sampler with compact bases, VAE decode, PNG writes, the unit's manifest rows), first with
``sampler.units=per_class`` (each class's samples chunked on their own: the layout before cross-class units)
then ``cross_class``, and prints samples/s of each and their ratio. The tiny random prior of the tests and
synthetic latents (plans from ``plan_class``): this measures how full the batches are, not model speed.
Ratios are from one run on this machine; the model is loaded before timing.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

# bench/ holds ops.py and sampler.py: drop it from the path so `ops` and `pipeline` are the packages
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.common.outputs import OutputDir  # noqa: E402
from pipeline.common.synthetic import save_tiny_prior  # noqa: E402
from pipeline.config import build_config  # noqa: E402
from pipeline.distill.plan import plan_class  # noqa: E402
from pipeline.distill.sample import ClassSampler, make_units  # noqa: E402


def setup(root: Path, prior: Path, classes: int, ipc: int, args) -> tuple:
    cfg = build_config({"out": str(root), "ipc": ipc, "model": {"model": str(prior), "vae": ""},
                        "sampler": {"num_steps": args.steps, "t_stop": args.steps // 2, "max_batch": args.max_batch},
                        "tangent": {"neighbours": 12, "dim": 3}, "runtime": {"progress": False}})
    out = OutputDir(root)
    out.prepare(cfg, overwrite=True)
    rng = np.random.default_rng(0)
    names = [f"c{i:03d}" for i in range(classes)]
    for i, c in enumerate(names):
        X = rng.normal(i % 7, 1.0, size=(max(40, 4 * ipc), 64)).astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, **plan_class(X, cfg))
        out.centroid_file(c).parent.mkdir(parents=True, exist_ok=True)
        out.centroid_file(c).write_bytes(buf.getvalue())
    return cfg, names, {c: i for i, c in enumerate(names)}


def measure(sampler: ClassSampler, names, labels, cfg, mode: str, repeat: int) -> tuple[float, int]:
    units = make_units(names, labels, cfg.ipc, cfg.sampler.max_batch, mode)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for u in units:
            sampler.run_unit(u.to_dict())
        best = min(best, time.perf_counter() - t)
    return len(names) * cfg.ipc / best, len(units)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=24)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the fastest is kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a CPU sampling actor uses 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-units-") as tmp:
        prior = save_tiny_prior(Path(tmp) / "prior", num_classes=args.classes)
        print(f"{args.classes} classes, {args.steps} steps, max_batch {args.max_batch}, manifold guidance, "
              f"{args.threads} torch thread(s)")
        print("| IPC | per-class calls | per-class samples/s | cross-class units | cross-class samples/s | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for ipc in args.ipc:
            cfg, names, labels = setup(Path(tmp) / f"ipc{ipc}", prior, args.classes, ipc, args)
            sampler = ClassSampler(cfg.to_dict(), threads=args.threads)
            sampler.run_unit(make_units(names[:1], labels, 1, 1)[0].to_dict())  # warm-up, not timed
            per, n_per = measure(sampler, names, labels, cfg, "per_class", args.repeat)
            cross, n_cross = measure(sampler, names, labels, cfg, "cross_class", args.repeat)
            results.append({"ipc": ipc, "per_class": per, "cross_class": cross, "ratio": cross / per})
            print(f"| {ipc} | {n_per} | {per:.2f} | {n_cross} | {cross:.2f} | **{cross / per:.2f}x** |", flush=True)
    return results


if __name__ == "__main__":
    main()
