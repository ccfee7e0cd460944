"""`manifoldgd evaluate`: train students from scratch on a distilled ImageFolder, test them on real images.

    distilled DIR/train/<class>/*.png + real test split
      -> one Ray task per (architecture, seed): fit a student (pipeline/eval/students.py) with hard labels or
         with soft labels from a teacher (pipeline/eval/teachers.py, loaded inside the task), top-1 on the test set
      -> mean +- std over seeds of the final-epoch top-1 (headline) and of the best-epoch top-1 (labelled)
      -> optional distribution metrics (FID / l2 / MMD) of the distilled set vs the real test images
      -> JSON

Students run as Ray tasks (one CPU each, or one GPU each where the cluster has GPUs), so seeds and
architectures spread over the cluster's workers; ``--workers`` caps how many run at once.
The same pieces (``load_test``, ``run_student_jobs``, ``summarise``) serve ``manifoldgd benchmark``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from ops.metrics import distribution_metrics
from pipeline.common.images import crop_images, load_png_folder
from pipeline.common.ray_start import init_ray
from pipeline.eval.features import FeatureLoadError, default_extractor, load_extractor
from pipeline.eval.stats import mean_std
from pipeline.eval.students import StudentRecipe, fit, recipe_for
from pipeline.eval.teachers import (
    DEFAULT_TEMPERATURE,
    LABELS,
    TeacherError,
    cached_teacher,
    describe_labels,
    label_protocol,
    load_teacher,
    resolve_teacher,
)
from pipeline.inputs.datasets import load_builtin, parse_spec
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import list_imagefolder


# -------------------------------------------------------------------------------------------- data
def train_root(distilled: Path) -> Path:
    """DIR/train when it exists (distill's layout), else DIR itself (a bare ImageFolder)."""
    return distilled / "train" if (distilled / "train").is_dir() else distilled


def distilled_classes(distilled: Path) -> list[str]:
    root = train_root(distilled)
    if not root.is_dir():
        raise FileNotFoundError(f"{distilled} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not classes:
        raise FileNotFoundError(f"{root} holds no class folders (expected <class>/*.png)")
    return classes


def load_distilled(distilled: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, H, W, 3), labels, class names) of a distilled ImageFolder; labels = sorted order."""
    classes = distilled_classes(distilled)
    images, labels = load_png_folder(train_root(distilled), classes)
    return images, labels, classes


def load_test(spec: str, class_names: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real test images at ``size`` px (the encode stage's preprocessing) with labels in ``class_names`` order.

    ``spec``: a built-in dataset, ``NAME`` (its test split) or ``NAME:SPLIT`` (``val``, ``test``, ``heldout``,
    ``train``), or an ImageFolder root holding test/, val/ or the class folders themselves. Every class of
    the distilled set must be present; extra classes are dropped.
    """
    builtin = parse_spec(spec)
    if builtin is not None:
        images, labels, names = load_builtin(*builtin)
        index = _class_index(names, class_names, spec)
        keep = np.isin(labels, list(index))
        return crop_images(images[keep], size), np.asarray([index[y] for y in labels[keep]], dtype=np.int64)
    return _load_test_folder(Path(spec), class_names, size)


def _class_index(names: list[str], wanted: list[str], where: str) -> dict[int, int]:
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise ValueError(f"{where} has no test images for class(es) {missing[:5]}")
    return {names.index(c): i for i, c in enumerate(wanted)}


def _load_test_folder(root: Path, class_names: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    if not root.is_dir():
        raise FileNotFoundError(f"test data {root} is neither a built-in dataset nor a folder")
    split = next((s for s in ("test", "val") if (root / s).is_dir()), "")
    listing = list_imagefolder(root, split or ".")
    index = _class_index(listing.classes, class_names, str(root))
    images, labels = [], []
    for rel, cls in listing.files:
        if listing.classes.index(cls) not in index:
            continue
        pixels, _ = decode_image((Path(listing.root) / rel).read_bytes(), size)
        if pixels is not None:  # an undecodable test file is skipped, as distill quarantines it
            images.append(pixels)
            labels.append(index[listing.classes.index(cls)])
    if not images:
        raise FileNotFoundError(f"no decodable test images under {root}")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------- students
@dataclass
class StudentJob:
    key: str               # identifies the result (e.g. "convnet/seed0")
    images: object         # uint8 (N, H, W, 3) or a Ray object ref to it
    labels: np.ndarray
    num_classes: int
    recipe: dict           # StudentRecipe fields
    seed: int
    soft: dict | None = None  # soft labels: {"teacher": spec, "classes": [...], "temperature": T}; None = hard


def _train_task(images, labels, num_classes: int, recipe: dict, seed: int, test_images, test_labels,
                threads: int, soft: dict | None = None) -> dict:
    """One student. With ``soft``, the teacher is loaded here from its spec (once per worker process), not
    shipped through the object store."""
    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = None if soft is None else cached_teacher(soft["teacher"], tuple(soft["classes"]), device)
    res = fit(images, labels, num_classes, StudentRecipe(**recipe), seed, test=(test_images, test_labels),
              device=device, teacher=teacher, temperature=soft["temperature"] if soft else DEFAULT_TEMPERATURE)
    return {**res.summary(), "device": device}


def run_student_jobs(jobs: list[StudentJob], test: tuple[np.ndarray, np.ndarray], on_done, workers: int = 0,
                     gpus_per_student: float | None = None) -> None:
    """Train every job as a Ray task, at most ``workers`` at once (0 = as many as the cluster's CPUs, or
    GPUs where it has them); ``on_done(job, result)`` is called in the driver as each one finishes, so a
    caller can write results as they come (what makes the benchmark resumable)."""


    if not jobs:
        return
    init_ray()
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus_per_student is None:
        gpus_per_student = 1.0 if gpus else 0.0
    slots = int(gpus / gpus_per_student) if gpus_per_student else int(resources.get("CPU", 1))
    workers = max(1, min(workers or slots, slots or 1))
    task = ray.remote(_train_task).options(num_cpus=1, num_gpus=gpus_per_student, max_retries=2)
    test_refs = (ray.put(test[0]), ray.put(test[1]))
    shared: dict[int, object] = {}  # one object-store copy of a training set that several jobs use
    pending = list(jobs)
    in_flight: dict = {}
    while pending or in_flight:
        while pending and len(in_flight) < workers:
            job = pending.pop(0)
            images = job.images
            if isinstance(images, np.ndarray):
                images = shared.setdefault(id(job.images), ray.put(job.images))
            ref = task.remote(images, job.labels, job.num_classes, job.recipe, job.seed, *test_refs, 1, job.soft)
            in_flight[ref] = job
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        job = in_flight.pop(ready[0])
        on_done(job, ray.get(ready[0]))


def summarise(results: list[dict]) -> dict:
    """Seeds of one (set, architecture) -> headline final-epoch top-1 and labelled best-epoch top-1, in
    percent (mean and population std, 2 decimals)."""
    return {"final_top1": mean_std((r["final_top1"] for r in results), scale=100, digits=2),
            "best_epoch_top1": mean_std((r["best_top1"] for r in results), scale=100, digits=2),
            "seconds": round(float(sum(r["seconds"] for r in results)), 1)}


# ---------------------------------------------------------------------------------------- metrics
def resolve_features(spec: str, test_spec: str):
    """``none`` -> None; ``auto`` -> the shipped net of a built-in test set, else Inception-v3 if staged,
    else None with a note; anything else -> that extractor (a missing one is an error)."""
    if spec == "none":
        return None
    if spec == "auto":
        try:
            return load_extractor(default_extractor(test_spec.partition(":")[0]))
        except FeatureLoadError as exc:
            print(f"note: no distribution metrics: {str(exc).split('. ')[0]}", file=sys.stderr)
            return None
    return load_extractor(spec)


def set_metrics(extractor, real_features: np.ndarray, images: np.ndarray, reference=None) -> dict:
    """Metrics of one set vs the real features; ``reference`` = ``GaussianReference.of(real_features)``
    when many sets are compared with the same real set."""
    values = distribution_metrics(real_features, extractor(images), reference)
    rounded = {k: None if v is None else float(f"{v:.6g}") if k.endswith("gamma") else round(v, 6)
               for k, v in values.items()}
    return {**rounded, "features": extractor.name,
            "n_real": int(len(real_features)), "n_synthetic": int(len(images))}


# --------------------------------------------------------------------------------------- labels
def resolve_labels(labels: str, teacher: str, temperature: float, dataset: str | None,
                   classes: list[str] | None = None) -> tuple[dict, dict | None]:
    """``--labels/--teacher/--soft-temperature`` -> (the protocol recorded in every result, what each student
    task needs to load the teacher, or None for hard labels). With ``classes``, the teacher is loaded once
    here, so that a class it does not know stops the command before any student starts."""
    if labels not in LABELS:
        raise TeacherError(f"--labels must be one of {', '.join(LABELS)}, got {labels!r}")
    if labels == "hard":
        if teacher != "auto" or temperature != DEFAULT_TEMPERATURE:
            raise TeacherError("--teacher and --soft-temperature apply to --labels soft")
        return label_protocol("hard"), None
    if not temperature > 0:
        raise TeacherError(f"--soft-temperature must be > 0, got {temperature}")
    ref = resolve_teacher(teacher, dataset)
    if classes is not None:
        load_teacher(ref.spec, classes)
    soft = {"teacher": ref.spec, "classes": list(classes or []), "temperature": float(temperature)}
    return label_protocol("soft", ref, temperature), soft


# -------------------------------------------------------------------------------------------- CLI
def parse_student_settings(items: list[str]) -> dict:
    """``--student key=value`` -> typed StudentRecipe overrides."""
    fields = StudentRecipe.__dataclass_fields__
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key in ("extra", "profile"):
            raise ValueError(f"--student {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(k for k in fields if k not in ('extra', 'profile'))}")
        kind = type(getattr(StudentRecipe(), key))
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = kind(value)
    return out


def add_student_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="convnet",
                   help="comma-separated: convnet, convnet-N, resnetap10, resnet18 (first = headline)")
    p.add_argument("--profile", default="paper", choices=("paper", "fast"),
                   help="paper: published epochs by IPC; fast: the same recipe for --fast-steps steps")
    p.add_argument("--fast-steps", type=int, default=500, help="optimiser steps of the fast profile")
    p.add_argument("--student", action="append", default=[], metavar="KEY=VALUE",
                   help="override a StudentRecipe field, e.g. --student width=32 --student hflip=false")
    p.add_argument("--workers", type=int, default=0, help="students at once (0 = cluster CPUs, or GPUs)")
    p.add_argument("--features", default="auto",
                   help="auto | none | mnist10k | inception-v3[:PATH] | resnet18[:PATH] | featurenet:PATH")
    p.add_argument("--labels", default="hard", choices=LABELS,
                   help="hard: cross-entropy on the set's labels; soft: every augmented batch relabelled by "
                   "--teacher, KL loss at --soft-temperature (the RDED / SRe2L protocol)")
    p.add_argument("--teacher", default="auto",
                   help="with --labels soft: auto (the shipped net of a built-in dataset, else resnet18 if "
                   "staged) | mnist10k | resnet18[:PATH] | featurenet:PATH")
    p.add_argument("--soft-temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"with --labels soft: softmax temperature T of the KL loss (x T^2); {DEFAULT_TEMPERATURE:g}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        images, labels, classes = load_distilled(Path(args.distilled))
        test_x, test_y = load_test(args.test, classes, images.shape[1])
        overrides = parse_student_settings(args.student)
        protocol, soft = resolve_labels(args.labels, args.teacher, args.soft_temperature, args.test, classes)
        extractor = resolve_features(args.features, args.test)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    ipc = int(np.bincount(labels).max())
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    recipes = {a: recipe_for(args.profile, ipc, len(images), fast_steps=args.fast_steps, **{**overrides, "arch": a})
               for a in archs}
    print(f"evaluate: {len(images)} distilled images ({len(classes)} classes, up to {ipc} per class) -> "
          f"{len(test_y)} real test images; {len(archs)} architecture(s) x {args.seeds} seed(s); "
          f"{describe_labels(protocol)}", flush=True)
    jobs = [StudentJob(f"{a}/seed{s}", images, labels, len(classes), asdict(recipes[a]), s, soft)
            for a in archs for s in range(args.seeds)]
    per_arch: dict[str, list] = {a: [] for a in archs}

    def done(job, result):
        arch = job.key.split("/")[0]
        per_arch[arch].append({"seed": job.seed, **result})
        print(f"  {job.key}: final top-1 {100 * result['final_top1']:.1f}% "
              f"(best epoch {100 * result['best_top1']:.1f}%), {result['seconds']:.0f}s", flush=True)

    run_student_jobs(jobs, (test_x, test_y), done, args.workers)
    report = {"distilled": str(args.distilled), "test": args.test, "n_distilled": int(len(images)),
              "n_test": int(len(test_y)), "classes": classes, "ipc": ipc, "labels": protocol, "results": {}}
    for a in archs:
        runs = sorted(per_arch[a], key=lambda r: r["seed"])
        report["results"][a] = {"recipe": recipes[a].describe(), **summarise(runs), "seeds": runs}
    if extractor is not None:
        report["metrics"] = set_metrics(extractor, extractor(test_x), images)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out) if args.out else Path(args.distilled) / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for a in archs:
        f, b = report["results"][a]["final_top1"], report["results"][a]["best_epoch_top1"]
        print(f"{a}, {describe_labels(protocol)}: top-1 (final epoch) {f['mean']:.2f} +- {f['std']:.2f} %   "
              f"[best epoch: {b['mean']:.2f} +- {b['std']:.2f} %]  over {f['n']} seed(s)")
    if extractor is not None:
        m = report["metrics"]
        paper = "n/a" if m["mmd_paper"] is None else f"{m['mmd_paper']:.5f}"
        print(f"vs real test: FID {m['fid']:.3f}, mean l2 {m['mean_l2']:.3f}, MMD^2 (biased, 1/(2h^2)) "
              f"{m['mmd2']:.5f}, MMD (paper: sqrt unbiased, 1/median d^2) {paper}  [features: {m['features']}]")
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="train students on a distilled set and test them on real images")
    p.add_argument("--distilled", required=True, help="distill output folder (DIR/train/<class>/) or ImageFolder")
    p.add_argument("--test", required=True,
                   help="built-in dataset NAME (its test split) or NAME:SPLIT (val, test, heldout), or a test ImageFolder")
    p.add_argument("--seeds", type=int, default=3, help="student seeds (mean +- std over them)")
    p.add_argument("--out", help="JSON file (default DIR/eval.json)")
    add_student_arguments(p)
    p.set_defaults(func=cmd_evaluate)
