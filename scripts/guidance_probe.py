"""Per-step evidence for one class of a distill run: what the guidance term does to each sample.

    .venv/bin/python scripts/guidance_probe.py RUN_DIR CLASS [--k 0,1,2] [--set tangent.dim=3 ...]

RUN_DIR is a finished (or at least encoded) ``manifoldgd distill`` output folder; its run config is read
from ``run.json`` (or its stamp), ``--set`` overrides fields on top, and the class's plan is recomputed
in-process from the encoded latents with that config (so tangent settings can be probed without a new run).
The class is sampled in-process with the run's sampler settings and, per guided step and sample, the table
shows:

  i        respaced step index (sampling runs 49 -> 0)
  |x_t|    norm of the current latent;  |x0|: norm of the predicted clean latent x0_hat
  nn(x0)   distance of x0_hat to the class's nearest real latent, in units of the class's median
           nearest-neighbour spacing (ops.health): ~1-2 on the manifold
  |tan|    |U U^T (c - x0_hat)|;  |nrm|: |(I - U U^T)(c - x0_hat)|
  |step|   |lambda sigma_i g|, the guided displacement;  |dmu|: |mu - x_t|, the unguided step's move
  d, K, ev the basis dimension, neighbours in the step's neighbourhood, and the share of that
           neighbourhood's variance the d directions explain
At the end: the final latent's health score.

    .venv/bin/python scripts/guidance_probe.py RUN_DIR --scan 0,1,2,3,4 [--set ...] [--sheet DIR]

Scan mode: every class at each seed (plans recomputed in-process, sampled without Ray), one line per
(seed, class) with the ten health scores, the samples above each threshold of ``--thresholds``, and with
``--sheet`` a contact sheet per seed (flagged samples framed in red at ``health.threshold``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ops.health import health_scores, reference_spacing
from ops.tangent import annealed_radius, default_radius
from pipeline.common.images import contact_sheet
from pipeline.common.outputs import OutputDir
from pipeline.config import build_config, parse_set
from pipeline.distill.plan import guided_steps, plan_class, read_class_latents
from pipeline.distill.sample import sampler_config
from pipeline.models.refs import load_model
from pipeline.models.sampler import GuidedSampler


def run_config(run_dir: str, sets: list[str]):
    """The run's config (its ``_work/config.json`` stamp) with ``--set`` overrides on top."""
    cfg_dict = json.loads((Path(run_dir) / "_work" / "config.json").read_text())["config"]
    cfg_dict["model"].pop("fingerprint", None)
    return build_config(cfg_dict, parse_set(sets))


def neighbourhood_stats(X, centroid, cfg, n_steps):
    """(K, explained share of the top-d directions) per guided step, the plan's radius rule re-traced."""
    t = cfg.tangent
    dim = min(t.dim, X.shape[0] - 1)
    dist = np.sqrt(((X - centroid[None]) ** 2).sum(1))
    order = np.argsort(dist, kind="stable")
    radius = default_radius(X, centroid, t.neighbours)
    out = []
    for step in range(n_steps):
        r = annealed_radius(step, radius, t.warm_steps, t.schedule, t.max_multiplier)
        k = max(int((dist <= r).sum()), dim + 1)
        k = min(k, t.max_neighbours)
        pts = X[order[:k]].astype(np.float64)
        s = np.linalg.svd(pts - pts.mean(0), compute_uv=False) ** 2
        out.append((k, float(s[:dim].sum() / s.sum())))
    return out


def scan(args) -> None:
    out = OutputDir(args.run_dir)
    names = sorted(p.name.split("=", 1)[1] for p in out.latents.iterdir() if p.name.startswith("class_name="))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    for seed in [int(x) for x in args.scan.split(",")]:
        cfg = run_config(args.run_dir, [*args.set, f"seed={seed}"])
        sampler = GuidedSampler(load_model(cfg.model, "cpu"), sampler_config(cfg))
        rows, marked = [], set()
        for label, name in enumerate(names):
            if args.classes and name not in args.classes.split(","):
                continue
            _, X = read_class_latents(out.latents, name)
            plan = plan_class(X, cfg)
            bases = plan["bases"][plan["offsets"][:-1, None] + plan["step_index"]]
            with torch.inference_mode():
                z = sampler.sample_latents(label, range(cfg.ipc), plan["centroids"], bases)
            scores = health_scores(z.flatten(1).numpy(), X)
            over = {t: [int(k) for k in np.flatnonzero(scores > t)] for t in thresholds}
            print(f"seed {seed} class {name}: " + " ".join(f"{v:5.2f}" for v in scores) + "  over "
                  + " ".join(f"{t:g}:{over[t]}" for t in thresholds), flush=True)
            rows.append(list(sampler.decode(z)))
            marked |= {(len(rows) - 1, int(k)) for k in np.flatnonzero(scores > cfg.health.threshold)}
        if args.sheet:
            Path(args.sheet).mkdir(parents=True, exist_ok=True)
            contact_sheet(rows, zoom=3, marked=marked).save(Path(args.sheet) / f"seed{seed}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("class_name", nargs="?", default="")
    ap.add_argument("--k", default="", help="sample indices (default: all)")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--every", type=int, default=1, help="print every n-th guided step")
    ap.add_argument("--scan", default="", help="seeds (comma-separated): scan every class")
    ap.add_argument("--thresholds", default="3,4,5,6")
    ap.add_argument("--classes", default="", help="scan: only these classes (comma-separated)")
    ap.add_argument("--sheet", default="", help="scan: folder for one contact sheet per seed")
    args = ap.parse_args()
    if args.scan:
        return scan(args)
    out = OutputDir(args.run_dir)
    cfg = run_config(args.run_dir, args.set)
    _, X = read_class_latents(out.latents, args.class_name)
    names = sorted(p.name.split("=", 1)[1] for p in out.latents.iterdir() if p.name.startswith("class_name="))
    label = names.index(args.class_name)
    plan = plan_class(X, cfg)
    ks = [int(k) for k in args.k.split(",")] if args.k else list(range(cfg.ipc))
    n_steps = guided_steps(cfg.sampler.num_steps, cfg.sampler.t_stop)
    spacing = reference_spacing(X)
    sampler = GuidedSampler(load_model(cfg.model, "cpu"), sampler_config(cfg))
    rows: dict[int, list] = {k: [] for k in ks}
    basis_of = {}
    for k in ks:
        lo = int(plan["offsets"][k])
        basis_of[k] = [plan["bases"][lo + int(plan["step_index"][k][j])] for j in range(n_steps)]

    def callback(info):
        if info.guided_step is None:
            return
        j = info.guided_step
        for r, k in enumerate(info.sample_indices):
            x0 = info.x0_hat[r].flatten().numpy()
            u = basis_of[k][j]
            u = u[:, np.abs(u).sum(0) > 0]
            c = plan["centroids"][k]
            delta = c - x0
            tan = u @ (u.T @ delta)
            step = (info.guided_mean[r] - info.mean[r]).flatten().numpy()
            dmu = (info.mean[r] - info.x_t[r]).flatten().numpy()
            nn = float(health_scores(x0[None].astype(np.float32), X, spacing)[0])
            rows[k].append((info.index, float(np.linalg.norm(info.x_t[r])), float(np.linalg.norm(x0)), nn,
                            float(np.linalg.norm(tan)), float(np.linalg.norm(delta - tan)),
                            float(np.linalg.norm(step)), float(np.linalg.norm(dmu)), u.shape[1]))

    centroids = plan["centroids"][ks]
    bases = np.stack([np.stack(basis_of[k]) for k in ks])
    with torch.inference_mode():
        z = sampler.sample_latents(label, ks, centroids, bases, step_callback=callback)
    final = health_scores(z.flatten(1).numpy(), X, spacing)
    print(f"class {args.class_name} (label {label}): {X.shape[0]} real latents, D={X.shape[1]}, "
          f"spacing {spacing:.3f}; lambda {cfg.sampler.guidance_scale}, normal weight "
          f"{cfg.sampler.normal_weight}, d {cfg.tangent.dim}, K {cfg.tangent.neighbours}, "
          f"schedule {cfg.tangent.schedule}; {' '.join(args.set)}")
    for k in ks:
        stats = neighbourhood_stats(X, plan["centroids"][k], cfg, n_steps)
        print(f"\nk={k}  centroid node {int(plan['node_ids'][k])} level {int(plan['levels'][k])}  "
              f"final health score {final[ks.index(k)]:.2f}")
        print("   i   |x_t|    |x0|  nn(x0)   |tan|   |nrm|  |step|   |dmu|   d    K     ev")
        for j, row in enumerate(rows[k]):
            if j % args.every and j != len(rows[k]) - 1:
                continue
            i, xt, x0n, nn, tn, nr, st, dm, d = row
            kk, ev = stats[j]
            print(f"  {i:2d} {xt:7.2f} {x0n:7.2f} {nn:7.2f} {tn:7.2f} {nr:7.2f} {st:7.2f} {dm:7.2f} "
                  f"{d:3d} {kk:4d} {ev:6.3f}")


if __name__ == "__main__":
    main()
