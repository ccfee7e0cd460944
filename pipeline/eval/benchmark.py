"""`manifoldgd benchmark`: every baseline and the ablation ladder, on the same data and the same students.

    for each IPC and generation seed:
        distill one folder per generative method (the distill driver, in-process, with config objects)
        write the real-image baselines as ImageFolders (random real; real images closest to k-means centroids)
    one Ray task per (method, IPC, seed, architecture): a student, tested on the real test split
    distribution metrics of every set vs the real test images, with the named feature extractor
    -> OUT/results.json, OUT/table.md, OUT/chart.png, OUT/samples/<method>_ipc<k>.png

Resumable: a distill folder resumes itself; a finished cell (OUT/cells/...json) whose settings match is
skipped. Generation seed s also seeds the student and picks the random-real subset, so "mean +- std over
seeds" spreads over generation and training alike, as the papers' 3 runs do.

The encoded latents depend only on the data, the VAE and data.hflip (off): the first distill folder's latents
are hard-linked into the others, so the training set is encoded once per benchmark, not once per run.

The pieces: ``methods`` (the method table), ``baselines`` (the real sets), ``cells`` (folders, cells, the
aggregate, shared latents), ``evaluate`` (students, test set, metrics), ``report`` (table, chart, grids).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ops.metrics import GaussianReference
from pipeline.common.copies import copy_check, copy_references
from pipeline.common.log import get_logger
from pipeline.common.outputs import atomic_write_json
from pipeline.common.ray_start import init_ray
from pipeline.config import DistillConfig, validate
from pipeline.distill.run import resolve_distill_config, run
from pipeline.eval import report
from pipeline.eval.baselines import RealPool, kmeans_nearest_ids, random_ids, write_real_set
from pipeline.eval.benchmark_options import BenchmarkOptions, parse_seeds
from pipeline.eval.cells import (
    aggregate,
    cell_path,
    cells_in,
    distill_seconds,
    eval_key,
    latent_key,
    load_cell,
    save_cell,
    set_dir,
    share_latents,
)
from pipeline.eval.evaluate import (
    StudentJob,
    add_student_arguments,
    load_distilled,
    load_test,
    parse_student_settings,
    resolve_features,
    resolve_labels,
    run_student_jobs,
    set_metrics,
)
from pipeline.eval.features import FeatureLoadError
from pipeline.eval.methods import ALIASES, METHODS, Method, parse_methods, parse_variants
from pipeline.eval.results import methods_of, read_records, record, rewrite_blocks, write_records
from pipeline.eval.students import StudentRecipe, recipe_for
from pipeline.eval.teachers import HARD, labels_of, load_teacher
from pipeline.inputs.sources import list_source
from pipeline.models.refs import prior_info

log = get_logger("benchmark").info


@dataclass
class Grid:
    """What one command asks for: a set per (method, IPC, seed), a student per set and architecture."""
    out: Path
    table: dict[str, Method]        # the built-in methods and this command's variants
    methods: list[str]
    ipcs: list[int]
    seeds: list[int]
    archs: list[str]
    student: dict                   # StudentRecipe overrides (--student)
    test: str                       # the test data (--test, else --data)
    extractor: object | None        # the feature extractor of the distribution metrics, or None
    labels: dict = field(default_factory=lambda: dict(HARD))  # the label protocol, recorded in every cell
    soft: dict | None = None        # soft labels: the teacher spec and temperature each student task loads

    def sets(self, kind: str | None = None):
        """(method, ipc, seed) of every set, methods outermost; only methods of ``kind`` when given."""
        for name in self.methods:
            if kind is None or self.table[name].kind == kind:
                for ipc in self.ipcs:
                    for seed in self.seeds:
                        yield self.table[name], ipc, seed


def parse_grid(opts: BenchmarkOptions) -> Grid:
    table = {**METHODS, **parse_variants(opts.variant)}
    test = opts.test or opts.data
    try:
        extractor = resolve_features(opts.features, test)
    except FeatureLoadError as exc:
        raise ValueError(str(exc)) from None
    labels, soft = resolve_labels(opts.labels, opts.teacher, opts.soft_temperature, opts.data)
    return Grid(out=Path(opts.out), table=table, methods=parse_methods(opts.methods, table),
                ipcs=[int(x) for x in str(opts.ipc).split(",") if x.strip()], seeds=parse_seeds(opts.seeds),
                archs=[a.strip() for a in opts.arch.split(",") if a.strip()],
                student=parse_student_settings(opts.student), test=test, extractor=extractor,
                labels=labels, soft=soft)


def run_benchmark(opts: BenchmarkOptions) -> dict:
    if opts.results_file and not opts.report_only:
        raise ValueError("--results-file reads a finished results file: use it with --report-only")
    grid = parse_grid(opts)
    grid.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if not opts.report_only:
        init_ray()
        make_distilled_sets(opts, grid, timings)
        make_real_sets(opts, grid)  # after distill: the k-means-nearest set needs the MGD3 run's plan
        train_students(opts, grid, timings)
    return write_report(opts, grid, timings)


# ---------------------------------------------------------------------------------------- 1. the sets
def distill_config(opts: BenchmarkOptions, method: Method, ipc: int, seed: int, out: Path) -> DistillConfig:
    """The config ``manifoldgd distill --data .. --out OUT --ipc IPC --seed SEED --guidance .. --cluster ..
    [--model ..] [--vae ..] [--set ..]`` resolves to: the benchmark's --set, then the method's own (which win)."""
    return resolve_distill_config(data=opts.data, out=str(out), ipc=ipc, seed=seed, model=opts.model, vae=opts.vae,
                                  guidance=method.guidance, cluster=method.cluster,
                                  overrides=[*opts.set, *method.sets])


def distill_finished(cfg: DistillConfig) -> bool:
    """The folder holds a completed run (run.json written last) of exactly this config. A folder of another
    config is not skipped: distill then refuses it, rather than the benchmark reusing stale images."""
    out = Path(cfg.out)
    stamp = out / "_work" / "config.json"
    if not ((out / "run.json").exists() and stamp.exists()):
        return False
    return json.loads(stamp.read_text()).get("config_hash") == cfg.config_hash()


def run_distill(cfg: DistillConfig, share_from: Path | None) -> float:
    """Run (or resume) one distill folder in-process; borrow the encoded latents of a finished folder
    under ``share_from`` first. Returns the seconds it took."""
    if share_from is not None and not cfg.data.hflip:  # flipped latents depend on the seed: never shared
        share_latents(share_from, Path(cfg.out), latent_key(cfg.hashed_dict()))
    start = time.perf_counter()
    run(cfg, list_source(cfg.data))
    return time.perf_counter() - start


def make_distilled_sets(opts: BenchmarkOptions, grid: Grid, timings: dict) -> None:
    for ipc in grid.ipcs:
        for seed in grid.seeds:
            for name in grid.methods:
                m = grid.table[name]
                if m.kind != "distill":
                    continue
                cfg = validate(distill_config(opts, m, ipc, seed, set_dir(grid.out, m, ipc, seed)))
                if distill_finished(cfg):
                    continue
                log(f"distill {name} IPC {ipc} seed {seed}")
                seconds = run_distill(cfg, grid.out if opts.share_latents else None)
                timings[f"distill/{name}/ipc{ipc}_seed{seed}"] = round(seconds, 1)


def image_size(opts: BenchmarkOptions, grid: Grid) -> int:
    """The size of the distilled images: a distilled set's, else (no generative method) the prior's."""
    for m, ipc, seed in grid.sets("distill"):
        images, _, _ = load_distilled(set_dir(grid.out, m, ipc, seed))
        return int(images.shape[1])
    cfg = resolve_distill_config(data=opts.data, model=opts.model, vae=opts.vae, overrides=opts.set)
    return prior_info(cfg.model)[0]


def make_real_sets(opts: BenchmarkOptions, grid: Grid) -> None:
    pool = None
    for m, ipc, seed in grid.sets("real"):
        d = set_dir(grid.out, m, ipc, seed)
        if (d / "_SUCCESS").exists():
            continue
        pool = pool or RealPool(opts.data, image_size(opts, grid))
        if m.name == "random":
            selection = random_ids(pool, ipc, seed)
        else:
            selection = kmeans_nearest_ids(set_dir(grid.out, grid.table["mgd3"], ipc, seed), pool.classes)
        write_real_set(pool, selection, d)


# ------------------------------------------------------------------------- 2. students and metrics
@dataclass
class TestSet:
    images: np.ndarray
    labels: np.ndarray
    features: np.ndarray | None = None         # the extractor's features of the images
    reference: GaussianReference | None = None  # their Gaussian fit: the D x D work, done once
    copy_refs: dict | None = None               # the training set's copy references (None: copies off)


def load_test_set(opts: BenchmarkOptions, grid: Grid, classes: list[str], size: int) -> TestSet:
    images, labels = load_test(grid.test, classes, size)
    refs = copy_references_for(opts, grid, size)
    if grid.extractor is None:
        return TestSet(images, labels, copy_refs=refs)
    features = grid.extractor(images)
    return TestSet(images, labels, features, GaussianReference.of(features), refs)


def copy_references_for(opts: BenchmarkOptions, grid: Grid, size: int) -> dict | None:
    """The real training images' copy references (pixels, and the grid's features), at the distilled
    size; None with --no-copies or when the training set is larger than --copies-max-train (the
    leave-one-out pass is quadratic in it)."""
    if not opts.copies:
        return None
    pool = RealPool(opts.data, size)
    ids = [i for c in pool.classes for i in pool.ids[c]]
    if len(ids) > opts.copies_max_train:
        log(f"copy detection off: {len(ids)} training images > --copies-max-train {opts.copies_max_train}")
        return None
    log(f"copy detection: nearest-neighbour references of {len(ids)} training images")
    return copy_references(pool.pixels(ids), grid.extractor)


def set_measures(grid: Grid, test: TestSet, images: np.ndarray) -> dict:
    """What every cell of a set records about the set itself: its distribution metrics vs the real test
    images (empty without a feature extractor) and its copy detection vs the training images (None when
    off)."""
    metrics = {} if grid.extractor is None else set_metrics(grid.extractor, test.features, images, test.reference)
    copies = None if test.copy_refs is None else copy_check(images, test.copy_refs, grid.extractor)
    return {"metrics": metrics, "copies": copies}


def pending_students(opts: BenchmarkOptions, grid: Grid) -> tuple[list[StudentJob], dict[str, dict], TestSet | None]:
    """A student job for every cell not finished with these settings, the cell each will fill (by job
    key), and the test set (None when every cell is finished)."""
    jobs: list[StudentJob] = []
    cells: dict[str, dict] = {}
    test = None
    for m, ipc, seed in grid.sets():
        images, labels, classes = load_distilled(set_dir(grid.out, m, ipc, seed))
        measures = None
        for arch in grid.archs:
            recipe = asdict(recipe_for(opts.profile, ipc, len(images), fast_steps=opts.fast_steps,
                                       **{**grid.student, "arch": arch}))
            key = eval_key(recipe, grid.test, grid.extractor.name if grid.extractor else None, grid.labels)
            if load_cell(cell_path(grid.out, m.name, ipc, seed, arch), key):
                continue
            if test is None and grid.soft is not None:
                load_teacher(grid.soft["teacher"], classes)  # a class the teacher does not know: stop here
            test = test or load_test_set(opts, grid, classes, images.shape[1])
            measures = set_measures(grid, test, images) if measures is None else measures
            soft = None if grid.soft is None else {**grid.soft, "classes": classes}
            job = StudentJob(f"{m.name}|{ipc}|{seed}|{arch}", images, labels, len(classes), recipe, seed, soft)
            cells[job.key] = {"method": m.name, "ipc": ipc, "seed": seed, "arch": arch, "eval_key": key,
                              "recipe": recipe, "labels": grid.labels, **measures}
            jobs.append(job)
    return jobs, cells, test


def train_students(opts: BenchmarkOptions, grid: Grid, timings: dict) -> None:
    """One Ray task per pending cell; each cell is written as its student finishes (what makes a stopped
    benchmark resume where it stopped)."""
    jobs, cells, test = pending_students(opts, grid)
    total = len(grid.methods) * len(grid.ipcs) * len(grid.seeds) * len(grid.archs)
    log(f"students: {len(jobs)} to train ({total - len(jobs)} cells already done)")

    def done(job: StudentJob, result: dict) -> None:
        c = cells[job.key]
        cell = {**{k: c[k] for k in ("method", "ipc", "seed", "arch", "eval_key", "recipe", "labels")}, "student": result,
                "metrics": c["metrics"], "copies": c["copies"], "n_images": int(len(job.labels)),
                "command": opts.command_line(),
                "distill_seconds": distill_seconds(grid.out, grid.table[c["method"]], c["ipc"], c["seed"])}
        save_cell(grid.out, cell)
        log(f"{c['method']} IPC {c['ipc']} seed {c['seed']} {c['arch']}: final top-1 "
            f"{100 * result['final_top1']:.1f}% (best epoch {100 * result['best_top1']:.1f}%), {result['seconds']:.0f}s")

    t = time.perf_counter()
    if jobs:
        run_student_jobs(jobs, (test.images, test.labels), done, opts.workers)
    timings["students"] = round(time.perf_counter() - t, 1)


# ------------------------------------------------------------------------------------------ 3. report
def write_report(opts: BenchmarkOptions, grid: Grid, timings: dict) -> dict:
    """results.json, results.jsonl, table.md, chart.png and the sample grids, from the cells that exist
    (or, with --results-file, from that file's records alone); then the marked blocks of every --into."""
    out = grid.out
    if opts.results_file:
        records = [r for r in read_records(Path(opts.results_file))
                   if r["test"] == grid.test and labels_of(r) == grid.labels]
        table = {**methods_of(records), **grid.table}
        methods = parse_methods(opts.methods, table)
        records = [r for r in records if r["seed"] in grid.seeds]
    else:
        table, methods = grid.table, grid.methods
        records = [record(c, table[c["method"]], grid.test, recipe_text(c["recipe"]))
                   for c in cells_in(out, methods, grid.ipcs, grid.seeds, grid.archs)
                   if labels_of(c) == grid.labels]  # one protocol per table
        write_records(out / "results.jsonl", records)
    results = aggregate(records, methods, grid.ipcs, grid.archs, table)
    recipes = {a: recipe_for(opts.profile, max(grid.ipcs), 10 * max(grid.ipcs), fast_steps=opts.fast_steps,
                             **{**grid.student, "arch": a}).describe() for a in grid.archs}
    results.update({"data": opts.data, "test": grid.test, "profile": opts.profile, "archs": grid.archs,
                    "protocol": grid.labels,  # the label protocol ("labels" names the methods)
                    "recipe": recipes, "features": grid.extractor.name if grid.extractor else None,
                    "seeds_requested": grid.seeds, "command": opts.command_line(), "timings_this_run_s": timings})
    atomic_write_json(out / "results.json", results)
    (out / "table.md").write_text(report.markdown(results))
    report.bar_chart(results, out / "chart.png")
    if not opts.results_file:
        (out / "samples").mkdir(exist_ok=True)
        for name in methods:
            for ipc in grid.ipcs:
                report.sample_grid(set_dir(out, table[name], ipc, grid.seeds[0]), out / "samples" / f"{name}_ipc{ipc}.png")
    for path in opts.into:
        names = rewrite_blocks(Path(path), report.blocks(results))
        log(f"rewrote {', '.join(names) or 'no'} results block(s) in {path}")
    return results


def recipe_text(recipe: dict) -> str:
    return StudentRecipe(**recipe).describe()


# ------------------------------------------------------------------------------------------- the CLI
def cmd_benchmark(args: argparse.Namespace) -> int:
    opts = BenchmarkOptions.from_namespace(args)
    start = time.perf_counter()
    try:
        results = run_benchmark(opts)
    except (ValueError, FileNotFoundError) as exc:  # a bad option or distill setting (ConfigError), missing data
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # a distill run failed (the log says which), a write failed
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("manifoldgd: interrupted; finished cells are kept: rerun the same command to resume", file=sys.stderr)
        return 130

    print(report.markdown(results))
    print(f"benchmark finished in {time.perf_counter() - start:.0f}s; wrote {Path(opts.out) / 'table.md'}, "
          f"results.json, chart.png, samples/")
    return 0


def register(sub) -> None:
    p = sub.add_parser("benchmark", help="baselines + ManifoldGD + the ablation ladder: table, JSON, chart, samples")
    p.add_argument("--data", required=True, help="built-in dataset name or ImageFolder (what distill takes)")
    p.add_argument("--test", help="test data (default: --data's test split, for a built-in dataset)")
    p.add_argument("--out", default="runs/benchmark", help="output folder; rerunning resumes it")
    p.add_argument("--ipc", default="1,10,50", help="comma-separated IPCs")
    p.add_argument("--seeds", default="3",
                   help="generation seeds (each also seeds its student): N = 0..N-1, A-B, or a list like 3,4,5")
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
    p.add_argument("--results-file", metavar="FILE",
                   help="with --report-only: build the tables from this results file (one record per cell, as "
                   "OUT/results.jsonl) instead of OUT/cells; records scored on another --test are ignored")
    p.add_argument("--into", action="append", default=[], metavar="FILE",
                   help="rewrite the <!-- results:NAME begin/end --> blocks of FILE with this report's tables "
                   "(repeatable; names: " + ", ".join(report.BLOCKS) + ")")
    p.add_argument("--no-copies", dest="copies", action="store_false",
                   help="skip copy detection (nearest training image of every set, in pixels and features)")
    p.add_argument("--copies-max-train", type=int, default=50_000,
                   help="copy detection only when the training set has at most this many images (50000)")
    p.add_argument("--no-share-latents", dest="share_latents", action="store_false",
                   help="encode the training set again in every distill folder")
    add_student_arguments(p)
    p.set_defaults(func=cmd_benchmark)
