"""`manifoldgd distill`: the driver. Lists the data, then runs the three stages on Ray, resumably.

    images -> [1 encode: Ray Data, actor pool] -> latents by class (parquet)
           -> [2 plan: one task per class]     -> centroids + tangent bases (npz)
           -> [3 sample: model-holding actors] -> PNGs, manifest, _SUCCESS

Every stage skips work whose output already exists, so the same command resumes an interrupted run.
The same entrypoint runs locally (starts Ray), under `ray job submit`, or in a KubeRay RayJob.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
import ray.data

from pipeline.common.device import DeviceUnavailableError, device_error_line
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir, atomic_write_json
from pipeline.common.ray_start import init_ray
from pipeline.config import (
    ConfigError,
    DistillConfig,
    build_config,
    choices_text,
    load_yaml,
    parse_set,
    to_yaml,
    validate,
)
from pipeline.distill.encode import decode_failures, encode_devices, encode_stage, latent_counts
from pipeline.distill.health import health_summary
from pipeline.distill.plan import plan_stage, submit_plans
from pipeline.distill.records import (
    TIMINGS_COVER,
    class_map_rows,
    hardware,
    restamp_device,
    stage_devices,
    versions,
    warn_fallbacks,
    write_manifest,
    write_quarantine,
)
from pipeline.distill.sample import ClassSampler
from pipeline.distill.schedule import UnitFailedError, sample_stage
from pipeline.inputs.sources import builtin_names, list_source
from pipeline.models.loading import PriorLoadError
from pipeline.models.refs import BUILTIN, prior_info, resolve

log = get_logger().info

# ---------------------------------------------------------------------------------------- config
def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="ImageFolder root, parquet of (image, label), or a built-in dataset name")
    p.add_argument("--out", help="output folder (created; resumed when it exists)")
    p.add_argument("--ipc", type=int, help="images per class (default 10)")
    p.add_argument("--model", help="DiT hub id or local folder (default facebook/DiT-XL-2-256)")
    p.add_argument("--vae", help="VAE hub id or local folder (default stabilityai/sd-vae-ft-mse)")
    p.add_argument("--guidance", help=f"{choices_text('sampler.guidance')} (default manifold)")
    p.add_argument("--cluster", help=f"{choices_text('cluster.method')} (default divisive)")
    p.add_argument("--seed", type=int, help="generation seed (default 0)")
    p.add_argument("--config", metavar="FILE_OR_PRESET",
                   help="a config file, or a packaged preset by name (e.g. imagenet1k_ipc50)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set sampler.guidance_scale=0.2 (repeatable)")


def resolve_config(args: argparse.Namespace) -> DistillConfig:
    """The config of a parsed ``distill`` / ``print-config`` command line (see ``resolve_distill_config``)."""
    return resolve_distill_config(data=args.data, out=args.out, ipc=args.ipc, seed=args.seed, model=args.model,
                                  vae=args.vae, guidance=args.guidance, cluster=args.cluster,
                                  config_file=args.config, overrides=args.set)


def resolve_distill_config(*, data: str | None = None, out: str | None = None, ipc: int | None = None,
                           seed: int | None = None, model: str | None = None, vae: str | None = None,
                           guidance: str | None = None, cluster: str | None = None, config_file: str | None = None,
                           overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """defaults < ``config_file`` < the named values < ``overrides`` (``key=value`` strings, as ``--set``);
    None means "not given". A built-in dataset brings its shipped prior by default. Not validated: callers do.

    The one place the layering lives: the CLI (``resolve_config``) and ``manifoldgd benchmark`` both call
    it, so a benchmark run has the config, hash and bytes of the equivalent ``manifoldgd distill``."""
    from_file = load_yaml(config_file) if config_file else {}
    flags: dict = {}
    if data is not None:
        flags.setdefault("data", {})["path"] = data
    for key, value in (("out", out), ("ipc", ipc), ("seed", seed)):
        if value is not None:
            flags[key] = value
    if model is not None:
        flags.setdefault("model", {})["model"] = model
    if vae is not None:
        flags.setdefault("model", {})["vae"] = vae
    if guidance is not None:
        flags.setdefault("sampler", {})["guidance"] = guidance
    if cluster is not None:
        flags.setdefault("cluster", {})["method"] = cluster
    settings = parse_set(list(overrides))
    cfg = build_config(from_file, flags, settings)
    model_given = any("model" in layer.get("model", {}) for layer in (from_file, flags, settings))
    if not model_given and builtin_prior_exists(cfg.data.path):
        # The shipped prior's own tuned settings sit just above the defaults: a file, a flag or --set wins.
        # Where no layer names the guidance, the prior's val winner at the nearest tuned IPC is the default.
        guidance_given = any("guidance" in layer.get("sampler", {}) for layer in (from_file, flags, settings))
        section = tuned_section(cfg.data.path, cfg.ipc)  # the file is read once
        chosen = None if guidance_given else section.get("guidance")
        tuned = section.get(chosen or cfg.sampler.guidance) or {}
        if chosen:
            tuned = {**tuned, "sampler": {**tuned.get("sampler", {}), "guidance": chosen}}
        if tuned:
            cfg = build_config(tuned, from_file, flags, settings)
        cfg.model.model = f"builtin:{cfg.data.path}"
    vae_given = any("vae" in layer.get("model", {}) for layer in (from_file, flags, settings))
    if not vae_given and brings_own_vae(cfg.model.model):
        cfg.model.vae = ""  # a built-in prior or a model folder with a vae/ uses its own VAE
    return cfg


def brings_own_vae(ref: str) -> bool:
    """A built-in prior, or a local model folder holding ``vae/config.json`` (hub ids keep model.vae)."""
    try:
        folder = Path(resolve(ref))
    except ConfigError:
        return False
    return (folder.expanduser() / "vae" / "config.json").is_file()


def tuned_file(name: str) -> dict:
    """A built-in prior's ``priors/<name>/distill_defaults.yaml`` (empty when it has none)."""
    path = Path(resolve(BUILTIN + name)) / "distill_defaults.yaml"
    return (load_yaml(str(path)) or {}) if path.is_file() else {}


def tuned_section(name: str, ipc: int) -> dict:
    """The part of a built-in prior's ``distill_defaults.yaml`` that answers for ``ipc``: the ``ipc<N>:``
    section of the nearest tuned IPC (the smaller on a tie); empty when the prior has no tuned settings."""
    tuned = {int(str(k)[3:]): v for k, v in tuned_file(name).items() if re.fullmatch(r"ipc\d+", str(k))}
    if not tuned:
        return {}
    return tuned[min(tuned, key=lambda k: (abs(k - ipc), k))] or {}


def prior_defaults(name: str, guidance: str, ipc: int) -> dict:
    """Settings tuned for a built-in prior at the nearest tuned IPC, for one guidance mode.

    The published defaults were chosen for DiT-XL/2's 4,096-d latents; a small prior's latent space can
    want others, and IPC 1 need not want IPC 10's. Only a setting that won on val goes in that file
    (docs/ladder.md)."""
    return tuned_section(name, ipc).get(guidance, {}) or {}


def default_guidance(name: str, ipc: int) -> str | None:
    """The guidance mode a built-in prior uses when none is given: the mode that won on val at the nearest
    tuned IPC (``guidance`` of that section). None when the file names none."""
    return tuned_section(name, ipc).get("guidance")


def builtin_prior_exists(name: str) -> bool:
    if name not in builtin_names():
        return False

    try:
        resolve(BUILTIN + name)
        return True
    except ConfigError:
        return False


def check_model(cfg: DistillConfig, listing) -> int:
    """Fail before Ray starts when the model configs cannot be found, or when the data has labels the
    model does not know; returns the image size. Reads the model's config files only, never weights."""
    try:
        size, num_classes = prior_info(cfg.model)
    except PriorLoadError as exc:
        raise ConfigError("model.model", str(exc).splitlines()[0] + " (run with a local folder or stage "
                          "the weights: see docs/models.md)") from None
    check_label_ids(listing, num_classes)
    return size


def check_label_ids(listing, num_classes: int | None) -> None:
    """Every class's label id must be one of the model's (0 .. num_classes - 1; None: not known here)."""
    if not listing.labels:
        return
    low_class, low = min(listing.labels.items(), key=lambda kv: kv[1])
    high_class, top = max(listing.labels.items(), key=lambda kv: kv[1])
    if low < 0:
        raise ConfigError("data.class_map", f"class {listing.source_label(low_class)!r} has the label id {low}; "
                          "label ids are 0 or more")
    if num_classes is not None and top >= num_classes:
        raise ConfigError("data.class_map", f"the data has label ids up to {top} (class "
                          f"{listing.source_label(high_class)!r}) but the model knows {num_classes} classes; "
                          "map the labels to the model's ids with data.class_map ('<label> <id>' per line)")


# ------------------------------------------------------------------------------------ the run
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@dataclass
class RunResult:
    """What ``run_stages`` returns: the run record (also written to run.json) and the stages' own results,
    for callers that measure them (bench/scale.py): per-plan and per-unit results of this run."""

    record: dict
    plans: list[dict] = field(default_factory=list)
    units: list[dict] = field(default_factory=list)
    sample_called_at: float = 0.0  # time.time() when stages 2 and 3 began (the plan tasks' submission)


def run(cfg: DistillConfig, listing, *, overwrite: bool = False, actor_cls: type = ClassSampler) -> dict:
    """Run (or resume) a distillation; returns the run record also written to run.json."""
    return run_stages(cfg, listing, overwrite=overwrite, actor_cls=actor_cls).record


def run_stages(cfg: DistillConfig, listing, *, overwrite: bool = False, actor_cls: type = ClassSampler,
               plan_barrier: bool = False) -> RunResult:
    """``run``, returning the stages' results too. ``actor_cls``: the sampling actor (a ``ClassSampler``;
    tests pass a subclass). ``plan_barrier``: every plan before the first unit instead of overlapping
    stages 2 and 3 (the same bytes; a comparison for benchmarks)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image_size = check_model(cfg, listing)
    out = OutputDir(cfg.out)
    out.prepare(cfg, overwrite)
    init_ray()
    if threading.current_thread() is threading.main_thread():
        # After ray.init, which installs its own handler: SIGTERM (kubectl delete, a job timeout) unwinds
        # like Ctrl-C, so temp files are removed and the next run resumes.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    kind = "cuda" if cfg.runtime.use_gpu(ray.cluster_resources().get("GPU", 0)) else "cpu"
    out.check_device(cfg, kind, overwrite)
    atomic_write_json(out.root / "classes.json", class_map_rows(listing))  # after check_device's clear
    timings["ray_init"] = time.perf_counter() - t0

    t = time.perf_counter()
    encode_stage(cfg, listing, out, image_size)
    kind = restamp_device(out, kind, {"encode": encode_devices(out)})
    failures = decode_failures(out)
    n_quarantined = write_quarantine(out, listing, failures)
    counts = latent_counts(out)
    timings["encode"] = time.perf_counter() - t
    classes = [c for c in listing.classes if counts.get(c, 0) > 0]
    skipped = [c for c in listing.classes if counts.get(c, 0) == 0]
    for c in skipped:
        log(f"class {c}: no usable image, no output for it (see quarantine.parquet)")

    called_at = time.time()
    stage = _plan_and_sample(cfg, classes, listing.labels, out, actor_cls, plan_barrier)
    timings.update(stage["timings"])
    n_rows = write_manifest(out, classes, listing)
    timings["total"] = time.perf_counter() - t0
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.config_hash(), "versions": versions(),
        "hardware": hardware(), "timings_s": timings, "timings_cover": TIMINGS_COVER,
        "counts": _counts(listing, counts, n_quarantined, classes, skipped, stage, n_rows),
        "plan_backends": sorted({p["backend"] for p in stage["plans"] if p.get("backend")}),
        "nodes_used": sorted({r["node_id"] for r in stage["units"]}),
        "health": (health := health_summary(out.root / "manifest.parquet")),
        "devices": stage_devices(out, stage["plans"], stage["units"]),
    }
    warn_fallbacks(record["devices"])
    restamp_device(out, kind, record["devices"])
    atomic_write_json(out.root / "run.json", record)
    log(f"done: {n_rows} images in {out.train} ({len(classes)} classes); "
        f"{n_quarantined} file(s) quarantined; {health['flagged']} flagged by the health check "
        f"({health['regenerated']} regenerated); {timings['total']:.1f}s")
    return RunResult(record, stage["plans"], stage["units"], called_at)


def _plan_and_sample(cfg: DistillConfig, classes: list[str], labels: dict, out: OutputDir, actor_cls: type,
                     plan_barrier: bool) -> dict:
    """Stages 2 and 3: overlapped (plan tasks submitted first, a sampling unit starts as soon as the plans
    of all its classes exist: pipeline/distill/schedule.py), or stage 2 as a barrier first."""
    if not plan_barrier:
        return sample_stage(cfg, classes, labels, out, plans=submit_plans(cfg, classes, out), actor_cls=actor_cls)
    start = time.perf_counter()
    plans = plan_stage(cfg, classes, out)
    plan_s = time.perf_counter() - start
    stage = sample_stage(cfg, classes, labels, out, actor_cls=actor_cls)
    t = stage["timings"]
    t.update(plan=plan_s, plan_sample_overlap=0.0, plan_and_sample=plan_s + t["plan_and_sample"])
    return {**stage, "plans": plans}


def _counts(listing, counts: dict, n_quarantined: int, classes: list[str], skipped: list[str], stage: dict,
            n_rows: int) -> dict:
    plans, sampled = stage["plans"], stage["units"]
    return {"found": listing.num_items + len(listing.rejected), "encoded": sum(counts.values()),
            "quarantined": n_quarantined, "classes": len(classes), "classes_without_images": skipped,
            "classes_sampled_this_run": len({c for r in sampled for c in r["classes"]}),
            "units_sampled_this_run": len(sampled), "images": n_rows,
            "classes_with_repeated_centroids": sorted(p["class_name"] for p in plans if p.get("repeated"))}


# ------------------------------------------------------------------------------------- the CLI
SHOWN_RENAMES = 20  # class folders named in a dry run's output, at most (the rest are counted)


def dry_run(cfg: DistillConfig, listing, *, overwrite: bool = False) -> None:
    """Print what a run would do; raise ConfigError on what it would stop on: listing (done by the caller),
    label ids out of the model's range (from its config files when they can be read here; no weights are
    loaded), an output folder that cannot be written or was made by another config. Writes nothing."""
    try:
        _, num_classes = prior_info(cfg.model)
        model_note = f"model: {num_classes} classes; label ids {min(listing.labels.values(), default=0)}.." \
                     f"{max(listing.labels.values(), default=0)}"
    except PriorLoadError as exc:
        num_classes = None
        model_note = (f"model: its configs cannot be read here, so the label ids were not checked against it "
                      f"(the real run stops if they cannot be read there either): {str(exc).splitlines()[0]}")
    check_label_ids(listing, num_classes)
    OutputDir(cfg.out).check_writable()
    OutputDir(cfg.out).check_config(cfg, overwrite)
    print(f"data: {listing.kind} {listing.root}")
    print(f"classes: {len(listing.classes)}; images: {listing.num_items}; rejected at listing: {len(listing.rejected)}")
    for rel, reason in listing.rejected:
        print(f"  would quarantine {rel}: {reason}")
    for c in listing.empty_classes():
        print(f"  class {c}: empty folder")
    renamed = listing.renamed()
    for label, folder in renamed[:SHOWN_RENAMES]:
        shown = repr(label) if len(label) <= 60 else f"{label[:40]!r}... ({len(label)} characters)"
        print(f"  class {shown}: folder {folder} (the label is not kept as a file name; see classes.json)")
    if len(renamed) > SHOWN_RENAMES:
        print(f"  ... and {len(renamed) - SHOWN_RENAMES} more classes with an encoded folder name")
    print(model_note)
    print(f"plan: encode {listing.num_items} images with {cfg.model.vae or cfg.model.model + '/vae'}; "
          f"{cfg.cluster.method} clustering to {cfg.ipc} centroids per class; "
          f"{cfg.sampler.guidance} guidance, {cfg.sampler.num_steps} {cfg.sampler.sampler} steps; "
          f"{cfg.ipc * len(listing.classes)} images into {cfg.out}/train (config {cfg.config_hash()})")


def distill_command(resolve: Callable[[], DistillConfig], *, dry_run_only: bool = False,
                    overwrite: bool = False, actor_cls: type = ClassSampler) -> int:
    """Resolve, validate, list and run, turning every expected failure into one message and an exit code
    (2: a bad setting, 130: interrupted, 1: a write failed). The `distill` command and the demo use it;
    ``actor_cls`` is ``run``'s."""
    cfg = None
    try:
        cfg = validate(resolve())
        listing = list_source(cfg.data)
        if dry_run_only:
            dry_run(cfg, listing, overwrite=overwrite)
            return 0
        run(cfg, listing, overwrite=overwrite, actor_cls=actor_cls)
    except ConfigError as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    except UnitFailedError as exc:
        print(f"manifoldgd: error: {exc}. Finished units and classes are kept: rerun the same command to "
              "resume", file=sys.stderr)
        return 1
    except DeviceUnavailableError as exc:  # a worker given a GPU it cannot use, under runtime.device=cuda
        print(f"manifoldgd: error: {device_error_line(exc) or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("manifoldgd: interrupted; finished classes are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as exc:  # includes a Ray task's OSError (disk full, permissions) on any node
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's exception
        errno_name = os.strerror(cause.errno) if getattr(cause, "errno", None) else str(cause).splitlines()[-1]
        where = getattr(cause, "filename", None) or (cfg.out if cfg else "the output folder")
        print(f"manifoldgd: error: cannot write {where}: {errno_name}. Nothing written is corrupt (files are "
              "renamed into place when complete); fix the cause and rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    return distill_command(lambda: resolve_config(args), dry_run_only=args.dry_run, overwrite=args.overwrite)


def cmd_print_config(args: argparse.Namespace) -> int:
    try:
        cfg = validate(resolve_config(args), need_paths=False)
    except ConfigError as exc:
        print(f"manifoldgd: error: {exc}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    print(f"# config hash: {cfg.config_hash()}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill a labelled image dataset into IPC synthetic images per class")
    add_config_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="list and count, print the plan, run nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder made by another config")
    p.set_defaults(func=cmd_distill)
    q = sub.add_parser("print-config", help="print the resolved config as YAML")
    add_config_arguments(q)
    q.set_defaults(func=cmd_print_config)
