"""`manifoldgd benchmark`: every baseline and the ablation ladder, on the same data and the same students.

    for each IPC and generation seed:
        distill (through `manifoldgd distill`) one folder per generative method
        write the real-image baselines as ImageFolders (random real; real images closest to k-means centroids)
    one Ray task per (method, IPC, seed, architecture): a student, tested on the real test split
    distribution metrics of every set vs the real test images, with the named feature extractor
    -> OUT/results.json, OUT/table.md, OUT/chart.png, OUT/samples/<method>_ipc<k>.png

Resumable: a distill folder resumes itself; a finished cell (OUT/cells/...json) whose settings match is
skipped. Generation seed s also seeds the student and picks the random-real subset, so "mean +- std over
seeds" spreads over generation and training alike, as the papers' 3 runs do.

The encoded latents depend only on the data, the VAE and data.hflip (off): the first distill folder's latents
are hard-linked into the others, so the training set is encoded once per benchmark, not once per run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ops.metrics import GaussianReference
from pipeline.cli import build_parser
from pipeline.cli import main as cli_main
from pipeline.common.images import crop_images, png_bytes
from pipeline.common.log import get_logger
from pipeline.common.outputs import atomic_write_bytes, atomic_write_json
from pipeline.common.ray_start import init_ray
from pipeline.config import DataConfig
from pipeline.distill.plan import read_class_latents
from pipeline.distill.run import resolve_config
from pipeline.eval import report
from pipeline.eval.evaluate import (
    StudentJob,
    add_student_arguments,
    load_distilled,
    load_test,
    parse_student_settings,
    resolve_features,
    run_student_jobs,
    set_metrics,
    summarise,
)
from pipeline.eval.features import FeatureLoadError
from pipeline.eval.students import recipe_for
from pipeline.inputs.datasets import builtin_names, load_builtin
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import list_source
from pipeline.models.refs import prior_info

log = get_logger("benchmark").info


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: str                       # real | distill
    guidance: str = ""
    cluster: str = ""
    sets: tuple[str, ...] = field(default_factory=tuple)


METHODS = {m.name: m for m in (
    Method("random", "Random real", "real"),
    Method("kmeans_real", "Real nearest k-means centroids", "real"),
    Method("dit", "DiT (no guidance)", "distill", "none", "divisive"),
    Method("mgd3", "MGD3 (mode + k-means)", "distill", "mode", "kmeans"),
    Method("divisive", "mode + divisive (branching 1)", "distill", "mode", "divisive", ("cluster.branching=1",)),
    Method("levelwise", "mode + divisive level-wise", "distill", "mode", "divisive"),
    Method("manifold", "manifold + level-wise, no annealing", "distill", "manifold", "divisive",
           ("tangent.max_multiplier=1",)),
    Method("manifoldgd", "ManifoldGD", "distill", "manifold", "divisive"),
)}
MAIN = ("random", "kmeans_real", "dit", "mgd3", "manifoldgd")
# METHOD.md section 6: k-means -> divisive -> divisive level-wise -> + manifold guidance -> + radius annealing
LADDER = (("k-means", "mgd3"), ("divisive", "divisive"), ("divisive level-wise", "levelwise"),
          ("+ manifold guidance", "manifold"), ("+ radius annealing (= ManifoldGD)", "manifoldgd"))
ALIASES = {"ladder": [m for _, m in LADDER], "main": list(MAIN), "all": list(METHODS)}


def parse_variants(items: list[str]) -> dict[str, Method]:
    """``NAME=BASE:key=value,key=value`` -> a generative method like BASE with extra distill settings: a
    knob sweep in the same folder, with the same students and seeds as the baselines."""
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        base, sep2, sets = rest.partition(":")
        if not (sep and sep2 and name.isidentifier()) or base not in METHODS or METHODS[base].kind != "distill":
            raise ValueError(f"--variant {item!r}: expected NAME=BASE:key=value[,key=value] with BASE one of "
                             f"{', '.join(n for n, m in METHODS.items() if m.kind == 'distill')}")
        if name in METHODS:
            raise ValueError(f"--variant {item!r}: {name} is a built-in method name")
        extra = tuple(x.strip() for x in sets.split(",") if x.strip())
        b = METHODS[base]
        out[name] = Method(name, f"{b.label} [{', '.join(extra)}]", "distill", b.guidance, b.cluster, b.sets + extra)
    return out


def parse_methods(spec: str, table: dict[str, Method] | None = None) -> list[str]:
    table = table or METHODS
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        names = ALIASES.get(item, [item])
        for n in names:
            if n not in table:
                raise ValueError(f"unknown method {n!r}; methods: {', '.join(METHODS)}; groups: {', '.join(ALIASES)}")
            if n not in out:
                out.append(n)
    if "kmeans_real" in out and "mgd3" not in out:
        out.append("mgd3")  # its k-means centroids come from the MGD3 run's plan
    out += [n for n in table if n not in METHODS and n not in out]  # every variant given runs
    return out


# ------------------------------------------------------------------------------------ real baselines
class RealPool:
    """The training images the distill runs saw, addressed by the ids the encode stage gave them."""
    def __init__(self, data: str, size: int):
        self.size = size
        if data in builtin_names():
            images, labels, names = load_builtin(data, "train")
            self.classes = list(names)
            self.ids = {c: [] for c in names}
            for i, y in enumerate(labels):
                self.ids[names[y]].append(f"{names[y]}/{i:05d}")  # as distill.input_dataset names them
            self._images = images
            self._pixels = lambda ids: crop_images(self._images[[int(i.split("/")[-1]) for i in ids]], size)
        else:
            listing = list_source(DataConfig(path=data))
            if listing.kind != "imagefolder":
                raise ValueError("real baselines need a built-in dataset or an ImageFolder")
            self.classes = listing.classes
            self.ids = {c: [] for c in listing.classes}
            for rel, cls in listing.files:
                self.ids[cls].append(rel)
            root = Path(listing.root)
            self._pixels = lambda ids: np.stack([decode_image((root / i).read_bytes(), size)[0] for i in ids])

    def pixels(self, ids: list[str]) -> np.ndarray:
        return self._pixels(ids)


def random_ids(pool: RealPool, ipc: int, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng([seed, 17])
    return {c: [pool.ids[c][i] for i in sorted(rng.choice(len(pool.ids[c]), min(ipc, len(pool.ids[c])),
                                                          replace=False))] for c in pool.classes}


def kmeans_nearest_ids(distill_dir: Path, classes: list[str]) -> dict[str, list[str]]:
    """Per class, the real image whose latent is nearest each k-means centroid of the MGD3 run (k-means on
    the VAE latents, k = IPC, the same seed), each real image used at most once."""
    out = {}
    for c in classes:
        ids, X = read_class_latents(distill_dir / "_work" / "latents", c)
        with np.load(distill_dir / "_work" / "centroids" / f"{c}.npz") as plan:
            centroids = plan["centroids"]
        d = ((centroids[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        chosen: list[int] = []
        for row in d:
            row = row.copy()
            row[chosen] = np.inf
            if np.isfinite(row).any():
                chosen.append(int(np.argmin(row)))
        out[c] = [str(ids[i]) for i in chosen]
    return out


def write_real_set(pool: RealPool, selection: dict[str, list[str]], out: Path) -> None:
    """An ImageFolder like distill's (train/<class>/<class>_<k>.png), plus the ids it holds."""
    if (out / "_SUCCESS").exists():
        return
    for c, ids in selection.items():
        for k, pixels in enumerate(pool.pixels(ids)):
            atomic_write_bytes(out / "train" / c / f"{c}_{k:04d}.png", png_bytes(pixels))
    atomic_write_json(out / "selection.json", selection)
    (out / "_SUCCESS").write_text("ok\n")


# ---------------------------------------------------------------------------------------- distill
def distill_args(args, method: Method, ipc: int, seed: int, out: Path) -> list[str]:
    argv = ["distill", "--data", args.data, "--out", str(out), "--ipc", str(ipc), "--seed", str(seed),
            "--guidance", method.guidance, "--cluster", method.cluster]
    if args.model is not None:
        argv += ["--model", args.model]
    if args.vae is not None:
        argv += ["--vae", args.vae]
    for s in [*args.set, *method.sets]:  # the method's own settings win over the common ones
        argv += ["--set", s]
    return argv


def latent_key(cfg_dict: dict) -> str:
    """What the encoded latents depend on: the data section and the model section (VAE, dtype, revision)."""
    return json.dumps({"data": cfg_dict["data"], "model": cfg_dict["model"]}, sort_keys=True)


def share_latents(out_root: Path, target: Path, key: str) -> None:
    """Hard-link (or copy across filesystems) the encoded latents of any finished run under
    ``out_root/distill`` whose data and model match ``key`` into a new run folder, so that the training
    set is encoded once per benchmark. A folder made with another model or data is never a source."""
    if (target / "_work" / "latents" / "_DONE").exists():
        return
    src = None
    for stamp in sorted(out_root.glob("distill/*/*/_work/config.json")):
        work = stamp.parent
        if (work / "latents" / "_DONE").exists() and latent_key(json.loads(stamp.read_text())["config"]) == key:
            src = work / "latents"
            break
    if src is None:
        return

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, target / "_work" / "latents", copy_function=link, dirs_exist_ok=True)


def resolved_config(args, method: Method, ipc: int, seed: int, out: Path):
    return resolve_config(build_parser().parse_args(distill_args(args, method, ipc, seed, out)))


def distill_finished(args, method: Method, ipc: int, seed: int, out: Path) -> bool:
    """The folder holds a completed run (run.json written last) of exactly this config. A folder of another
    config is not skipped: distill then refuses it, rather than the benchmark reusing stale images."""
    stamp = out / "_work" / "config.json"
    if not ((out / "run.json").exists() and stamp.exists()):
        return False
    expected = resolved_config(args, method, ipc, seed, out).config_hash()
    return json.loads(stamp.read_text()).get("config_hash") == expected


def run_distill(args, method: Method, ipc: int, seed: int, out: Path) -> float:
    cfg = resolved_config(args, method, ipc, seed, out)
    if args.share_latents and not cfg.data.hflip:  # flipped latents depend on the seed: never shared
        share_latents(Path(args.out), out, latent_key(cfg.hashed_dict()))
    start = time.perf_counter()
    code = cli_main(distill_args(args, method, ipc, seed, out))
    if code:
        raise RuntimeError(f"distill failed (exit {code}) for {method.name} IPC {ipc} seed {seed}: "
                           f"manifoldgd {' '.join(distill_args(args, method, ipc, seed, out))}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------ cells
def eval_key(recipe: dict, test: str, features: str | None) -> str:
    blob = json.dumps({"recipe": recipe, "test": test, "features": features}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def set_dir(out: Path, method: Method, ipc: int, seed: int) -> Path:
    return out / ("distill" if method.kind == "distill" else "real") / method.name / f"ipc{ipc}_seed{seed}"


def cell_path(out: Path, method: str, ipc: int, seed: int, arch: str) -> Path:
    return out / "cells" / method / f"ipc{ipc}_seed{seed}_{arch}.json"


def load_cell(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("eval_key") == key else None


def run_benchmark(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {**METHODS, **parse_variants(args.variant)}
    methods = parse_methods(args.methods, table)
    ipcs = [int(x) for x in str(args.ipc).split(",") if x.strip()]
    seeds = list(range(args.seeds))
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    overrides = parse_student_settings(args.student)
    test_spec = args.test or args.data
    try:
        extractor = resolve_features(args.features, test_spec)
    except FeatureLoadError as exc:
        raise ValueError(str(exc)) from None
    timings: dict[str, float] = {}
    if args.report_only:
        return write_report(args, out, table, methods, ipcs, seeds, archs, overrides, extractor, timings)
    init_ray()

    # 1. the sets: distill runs, then the real baselines (k-means-nearest needs the MGD3 run's plan)
    for ipc in ipcs:
        for seed in seeds:
            for name in methods:
                m = table[name]
                if m.kind != "distill":
                    continue
                d = set_dir(out, m, ipc, seed)
                if distill_finished(args, m, ipc, seed, d):
                    continue
                log(f"distill {name} IPC {ipc} seed {seed}")
                timings[f"distill/{name}/ipc{ipc}_seed{seed}"] = round(run_distill(args, m, ipc, seed, d), 1)
    size = _image_size(out, [table[m] for m in methods], ipcs, seeds, args)
    pool = None
    for name in ("random", "kmeans_real"):
        if name not in methods:
            continue
        for ipc in ipcs:
            for seed in seeds:
                d = set_dir(out, table[name], ipc, seed)
                if (d / "_SUCCESS").exists():
                    continue
                pool = pool or RealPool(args.data, size)
                sel = (random_ids(pool, ipc, seed) if name == "random" else
                       kmeans_nearest_ids(set_dir(out, table["mgd3"], ipc, seed), pool.classes))
                write_real_set(pool, sel, d)

    # 2. students and metrics, one cell per (method, IPC, seed, architecture)
    test_x = test_y = real_features = reference = None
    jobs: list[StudentJob] = []
    metrics: dict[tuple, dict] = {}
    for name in methods:
        for ipc in ipcs:
            for seed in seeds:
                d = set_dir(out, table[name], ipc, seed)
                images, labels, classes = load_distilled(d)
                if test_x is None:
                    test_x, test_y = load_test(test_spec, classes, images.shape[1])
                    if extractor is not None:
                        real_features = extractor(test_x)
                        reference = GaussianReference.of(real_features)  # the D x D work, once
                for arch in archs:
                    recipe = asdict(recipe_for(args.profile, ipc, len(images), fast_steps=args.fast_steps,
                                               **{**overrides, "arch": arch}))
                    key = eval_key(recipe, test_spec, extractor.name if extractor else None)
                    if load_cell(cell_path(out, name, ipc, seed, arch), key):
                        continue
                    if (name, ipc, seed) not in metrics:
                        metrics[(name, ipc, seed)] = (set_metrics(extractor, real_features, images, reference)
                                                      if extractor else {})
                    jobs.append(StudentJob(f"{name}|{ipc}|{seed}|{arch}|{key}", images, labels, len(classes),
                                           recipe, seed))
    log(f"students: {len(jobs)} to train ({len(methods) * len(ipcs) * len(seeds) * len(archs) - len(jobs)} "
        f"cells already done)")

    def done(job, result):
        name, ipc, seed, arch, key = job.key.split("|")
        ipc, seed = int(ipc), int(seed)
        cell = {"method": name, "ipc": ipc, "seed": seed, "arch": arch, "eval_key": key, "recipe": job.recipe,
                "student": result, "metrics": metrics.get((name, ipc, seed), {}),
                "n_images": int(len(job.labels)), "command": args.command_line,
                "distill_seconds": _distill_seconds(out, table[name], ipc, seed)}
        atomic_write_json(cell_path(out, name, ipc, seed, arch), cell)
        log(f"{name} IPC {ipc} seed {seed} {arch}: final top-1 {100 * result['final_top1']:.1f}% "
            f"(best epoch {100 * result['best_top1']:.1f}%), {result['seconds']:.0f}s")

    t = time.perf_counter()
    run_student_jobs(jobs, (test_x, test_y), done, args.workers)
    timings["students"] = round(time.perf_counter() - t, 1)

    return write_report(args, out, table, methods, ipcs, seeds, archs, overrides, extractor, timings)


def write_report(args, out: Path, table, methods, ipcs, seeds, archs, overrides, extractor, timings) -> dict:
    """results.json, table.md, chart.png and the sample grids, from the cells that exist."""
    test_spec = args.test or args.data
    results = collect(out, methods, ipcs, seeds, archs, table)
    results.update({"data": args.data, "test": test_spec, "profile": args.profile, "archs": archs,
                    "recipe": {a: recipe_for(args.profile, max(ipcs), 10 * max(ipcs), fast_steps=args.fast_steps,
                                             **{**overrides, "arch": a}).describe() for a in archs},
                    "features": extractor.name if extractor else None, "command": args.command_line,
                    "timings_this_run_s": timings})
    atomic_write_json(out / "results.json", results)
    (out / "table.md").write_text(report.markdown(results))
    report.bar_chart(results, out / "chart.png")
    (out / "samples").mkdir(exist_ok=True)
    for name in methods:
        for ipc in ipcs:
            report.sample_grid(set_dir(out, table[name], ipc, 0), out / "samples" / f"{name}_ipc{ipc}.png")
    return results


def _image_size(out: Path, methods: list[Method], ipcs, seeds, args) -> int:
    for m in methods:
        if m.kind == "distill":
            images, _, _ = load_distilled(set_dir(out, m, ipcs[0], seeds[0]))
            return int(images.shape[1])

    ns = argparse.Namespace(data=args.data, out=None, ipc=None, seed=None, model=args.model, vae=args.vae,
                            guidance=None, cluster=None, config=None, set=args.set)
    return prior_info(resolve_config(ns).model)[0]


def _distill_seconds(out: Path, method: Method, ipc: int, seed: int) -> float | None:
    run = set_dir(out, method, ipc, seed) / "run.json"
    if method.kind != "distill" or not run.exists():
        return None
    timings = json.loads(run.read_text()).get("timings_s", {})
    return round(float(timings.get("total", 0.0)), 1)


def collect(out: Path, methods, ipcs, seeds, archs, table: dict[str, Method] | None = None) -> dict:
    """Aggregate the finished cells: mean +- std over seeds per (method, IPC, architecture)."""
    table = table or METHODS
    rows, commands = [], set()
    for name in methods:
        for ipc in ipcs:
            for arch in archs:
                cells = [json.loads(p.read_text()) for s in seeds
                         if (p := cell_path(out, name, ipc, s, arch)).exists()]
                if not cells:
                    continue
                metric_names = ("fid", "mean_l2", "mmd2")
                row = {"method": name, "label": table[name].label, "ipc": ipc, "arch": arch,
                       "seeds": [c["seed"] for c in cells], **summarise([c["student"] for c in cells]),
                       "metrics": {k: _mean_std_raw([c["metrics"].get(k) for c in cells]) for k in metric_names},
                       "distill_seconds": _mean_std_raw([c.get("distill_seconds") for c in cells])}
                rows.append(row)
                commands.update(c.get("command", "") for c in cells)
    return {"rows": rows, "main": [m for m in MAIN if m in methods],
            "ladder": [(label, m) for label, m in LADDER if m in methods],
            "commands": sorted(c for c in commands if c), "labels": {m: table[m].label for m in methods},
            "variants": [m for m in methods if m not in METHODS],
            "variant_settings": {m: list(table[m].sets) for m in methods if m not in METHODS}}


def _mean_std_raw(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def command_line(args) -> str:
    """The command that reproduces (and resumes) this benchmark, with every default spelled out."""
    parts = ["manifoldgd benchmark", f"--data {args.data}", f"--out {args.out}", f"--ipc {args.ipc}",
             f"--seeds {args.seeds}", f"--methods {args.methods}", f"--arch {args.arch}", f"--profile {args.profile}",
             f"--features {args.features}"]
    parts += [f"--fast-steps {args.fast_steps}"] if args.profile == "fast" else []
    parts += [f"--test {args.test}"] if args.test else []
    parts += [f"--model {args.model}"] if args.model is not None else []
    parts += [f"--vae '{args.vae}'"] if args.vae is not None else []
    parts += [f"--set {s}" for s in args.set] + [f"--student {s}" for s in args.student]
    parts += [f"--variant {v}" for v in args.variant]
    return " ".join(parts)


def cmd_benchmark(args: argparse.Namespace) -> int:
    args.command_line = command_line(args)
    start = time.perf_counter()
    try:
        results = run_benchmark(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a distill run failed: its own message was printed above
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("manifoldgd: interrupted; finished cells are kept: rerun the same command to resume", file=sys.stderr)
        return 130

    print(report.markdown(results))
    print(f"benchmark finished in {time.perf_counter() - start:.0f}s; wrote {Path(args.out) / 'table.md'}, "
          f"results.json, chart.png, samples/")
    return 0


def register(sub) -> None:
    p = sub.add_parser("benchmark", help="baselines + ManifoldGD + the ablation ladder: table, JSON, chart, samples")
    p.add_argument("--data", required=True, help="built-in dataset name or ImageFolder (what distill takes)")
    p.add_argument("--test", help="test data (default: --data's test split, for a built-in dataset)")
    p.add_argument("--out", default="runs/benchmark", help="output folder; rerunning resumes it")
    p.add_argument("--ipc", default="1,10,50", help="comma-separated IPCs")
    p.add_argument("--seeds", type=int, default=3, help="generation seeds 0..N-1 (each also seeds its student)")
    p.add_argument("--methods", default="all",
                   help=f"comma-separated methods or groups; methods: {', '.join(METHODS)}; "
                   f"groups: {', '.join(ALIASES)}")
    p.add_argument("--model", help="DiT hub id or folder (a built-in dataset brings its shipped prior)")
    p.add_argument("--vae", help="VAE hub id or folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a distill setting applied to every generative method (theirs win)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=BASE:KEY=VALUE[,KEY=VALUE]",
                   help="an extra generative method: BASE plus distill settings, e.g. "
                   "lam03=manifoldgd:sampler.guidance_scale=0.3 (repeatable; a recorded knob sweep)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the table, JSON, chart and grids from the cells already finished")
    p.add_argument("--no-share-latents", dest="share_latents", action="store_false",
                   help="encode the training set again in every distill folder")
    add_student_arguments(p)
    p.set_defaults(func=cmd_benchmark)
