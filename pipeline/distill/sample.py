"""Stage 3: sampling actors hold the prior (loaded once each) and run work units across actors and nodes.

Work units. The samples to make are the (class, k) pairs of every class, classes in label order, each
class's k = 0 .. IPC-1 in order, concatenated and cut into chunks of ``sampler.max_batch`` (with
``sampler.units: per_class`` each class is chunked on its own). One unit is one sampling call: up to
max_batch rows from as many classes as needed, each row with its own label, centroid and tangent-basis
index. The units are a function of the config and the class list only, never of scheduling, and noise is
a pure function of (seed, class, k), so a rerun, a resume and a run that lost a node give identical bytes.
A unit's id is its position plus a digest of its rows (``u000012-3fa9c1d2``): a record left by a
different cut can never be mistaken for it.

Who writes what, in order (every file written atomically: temp file + rename):
  1. the actor running a unit writes the unit's PNGs, then ``_work/units/<unit id>.parquet`` (its manifest
     rows): a unit is done when that file exists and every PNG it lists exists;
  2. the driver, once every unit covering a class is done, removes temp files that a killed writer left
     in the class folder, writes the class's manifest part from those unit files, then
     ``train/<class>/_SUCCESS``. Only the driver writes these, and writing them twice
     writes the same bytes, so a crash between any two writes is repaired by the next run.

Faults. Actors are created with ``max_restarts`` (Ray restarts one whose process or node died) and no
task retries of their own: the driver counts every failed attempt of a unit, whatever the cause (an
exception in the unit, CUDA out of memory, a dead actor or node, ``runtime.unit_timeout_s``), requeues the
unit, and after ``runtime.max_unit_attempts`` raises one ``UnitFailedError`` naming the unit, its classes
and the cause. A unit is handed only to an actor that has answered a ``ready`` call, so an actor that is
(re)starting or waiting for a node never holds work; a permanently dead actor is replaced at once (the
replacement waits for resources if it must, and gets work when it is placed: a node that comes back, or
one an autoscaler adds, is used). Every wait has a timeout and re-checks.

Overlap with stage 2: the driver takes the plan tasks' refs and dispatches a unit as soon as the plans of
all its classes exist; while plan tasks remain, the sampling actors leave room for at least one of them:
a CPU, and, where plan tasks ask for a share of a GPU (``runtime.gpus_per_plan_task``), that share of the
cluster's GPUs (``actor_limit``). Otherwise actors holding every GPU would wait for plans that can never
be scheduled (a deadlock: on a one-GPU cluster this means no sampling until the last plan).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from pipeline.common.device import DeviceUnavailableError, device_error_line, torch_device
from pipeline.common.images import png_bytes
from pipeline.common.log import get_logger
from pipeline.common.outputs import SUCCESS, OutputDir, atomic_write_bytes, atomic_write_table, sha256_bytes
from pipeline.config import DistillConfig, build_config
from pipeline.distill.health import HEALTH_COLUMNS, HealthCheck
from pipeline.distill.plan import log_plan_warnings, plan_task_options
from pipeline.models.refs import load_model
from pipeline.models.sampler import GuidedSampler, SamplerConfig

log = get_logger().info

MANIFEST_COLUMNS = ("class", "label", "k", "seed", "path", "centroid_node", "centroid_level",
                    "repeated_centroid", "guidance", "cluster", "model", "vae", "config_hash", "sha256",
                    *HEALTH_COLUMNS)
FAULTS_ENV = "MANIFOLDGD_TEST_FAULTS"  # test-only fault injection (JSON), read by the driver, see _Faults
POLL_S = 1.0  # longest single wait of the driver loop; every wait re-checks the state after it
PLAN_CACHE = 16  # plans an actor keeps loaded (a unit spans few classes unless IPC is small)


class UnitFailedError(RuntimeError):
    """A sampling unit failed ``runtime.max_unit_attempts`` times (or no sampling actor could start)."""


def sampler_config(cfg: DistillConfig):
    s = cfg.sampler
    return SamplerConfig(num_steps=s.num_steps, train_steps=s.train_steps, sampler=s.sampler,
                         cfg_scale=s.cfg_scale, cfg_channels=s.cfg_channels, guidance=s.guidance,
                         guidance_scale=s.guidance_scale, t_stop=s.t_stop, normal_weight=s.normal_weight,
                         sigma=s.sigma, max_batch=s.max_batch, seed=cfg.seed, trust_region=s.trust_region)


# ------------------------------------------------------------------------------------ work units
@dataclass(frozen=True)
class Unit:
    index: int
    uid: str
    rows: tuple  # ((class_name, label, k), ...)

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(r[0] for r in self.rows))

    def to_dict(self) -> dict:
        return {"uid": self.uid, "rows": [list(r) for r in self.rows]}

    def describe(self) -> str:
        names = self.classes
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
        return f"unit {self.uid} ({len(self.rows)} samples; class{'es' if len(names) > 1 else ''} {shown})"


def make_units(classes: list[str], labels: dict, ipc: int, max_batch: int, mode: str = "cross_class") -> list[Unit]:
    """The work units of a run: a pure function of (classes, labels, ipc, max_batch, mode)."""
    order = sorted(classes, key=lambda c: (int(labels[c]), c))
    groups = ([[(c, int(labels[c]), k) for c in order for k in range(ipc)]] if mode == "cross_class"
              else [[(c, int(labels[c]), k) for k in range(ipc)] for c in order])
    units: list[Unit] = []
    for rows in groups:
        for start in range(0, len(rows), max_batch):
            chunk = tuple(rows[start:start + max_batch])
            digest = hashlib.blake2b(json.dumps(chunk).encode(), digest_size=4).hexdigest()
            units.append(Unit(len(units), f"u{len(units):06d}-{digest}", chunk))
    return units


def unit_part(out: OutputDir, uid: str) -> Path:
    return out.work / "units" / f"{uid}.parquet"


def unit_done(out: OutputDir, unit: Unit) -> bool:
    """The unit's manifest rows are written and every PNG they list exists."""
    part = unit_part(out, unit.uid)
    if not part.exists():
        return False
    try:
        paths = pq.read_table(part, columns=["path"]).column("path").to_pylist()
    except (OSError, pa.ArrowException):
        return False
    return len(paths) == len(unit.rows) and all((out.root / p).exists() for p in paths)


def finalize_class(out: OutputDir, class_name: str, uids: list[str], ipc: int) -> None:
    """Write the class's manifest part from its units' files, then ``_SUCCESS`` (idempotent)."""
    parts = [pq.read_table(unit_part(out, uid)) for uid in uids]
    table = pa.concat_tables(parts, promote_options="default")  # units written before the health columns
    rows = table.filter(pc.equal(table.column("class"), class_name))
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("k", "ascending")]))
    if rows.column("k").to_pylist() != list(range(ipc)):
        raise RuntimeError(f"class {class_name}: unit files {uids} hold samples {rows.column('k').to_pylist()}, "
                           f"not 0..{ipc - 1}")
    # Temp files of a writer killed mid-write (its node lost: no chance to clean up). Every unit of the
    # class is done, so no live writer of this folder is left.
    for tmp in out.class_dir(class_name).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    atomic_write_table(out.manifest_part(class_name), rows)
    atomic_write_bytes(out.class_dir(class_name) / SUCCESS, b"")


# ---------------------------------------------------------------------------------- the actor
class _Faults:
    """Test-only fault injection, from ``$MANIFOLDGD_TEST_FAULTS`` on the driver (JSON):
    ``{"dir": marker folder, "raise_once_per_class": true, "raise_always": true,
    "exit_units": [unit index, ...], "kill_units": [...], "hang_units": [...], "hang_s": seconds,
    "delay_s": seconds per unit}``. Markers in ``dir`` make "once" hold across actor restarts. On a unit's
    first try: ``exit_units`` ends the actor's process (os._exit: Ray restarts it), ``kill_units`` kills the
    actor for good (``ray.kill(no_restart=True)``: the driver must replace it), ``hang_units`` sleeps
    ``hang_s`` (for ``runtime.unit_timeout_s``)."""

    def __init__(self, spec: dict | None):
        self.spec = spec or {}

    def _first(self, name: str) -> bool:
        try:
            fd = os.open(Path(self.spec["dir"]) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def before_unit(self, unit: dict) -> None:
        if not self.spec:
            return
        time.sleep(float(self.spec.get("delay_s", 0)))
        index = int(unit["uid"][1:7]) if unit["uid"].startswith("u") else -1
        if index in self.spec.get("exit_units", []) and self._first(f"exit-{unit['uid']}"):
            os._exit(1)
        if index in self.spec.get("kill_units", []) and self._first(f"kill-{unit['uid']}"):
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            time.sleep(600)  # the kill is asynchronous: never finish the unit before it lands
        if index in self.spec.get("hang_units", []) and self._first(f"hang-{unit['uid']}"):
            time.sleep(float(self.spec.get("hang_s", 600)))
        if self.spec.get("raise_once_per_class"):
            fresh = [c for c in dict.fromkeys(r[0] for r in unit["rows"]) if self._first(f"raise-{c}")]
            if fresh:
                raise RuntimeError(f"injected fault (test) for class(es) {', '.join(fresh)}")
        if self.spec.get("raise_always"):
            raise ValueError("injected fault (test), every time")


class ClassSampler:
    """Holds the prior; ``run_unit`` writes one work unit. Used as a Ray actor and in-process."""

    def __init__(self, cfg_dict: dict, threads: int = 0, config_hash: str = "", device: str = "auto",
                 faults: dict | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = build_config(cfg_dict)
        # runtime.device decides what a GPU torch cannot use means: an error (cuda) or a warning (auto)
        self.worker = torch_device("sample", "cpu" if device == "cpu" else self.cfg.runtime.device)
        self.device = "cuda" if self.worker.on_gpu else "cpu"
        self.sampler = GuidedSampler(load_model(self.cfg.model, self.device), sampler_config(self.cfg))
        # The driver passes the hash it stamped the output folder with: recomputing it here would read a
        # local model folder's weights once more per actor (the hash covers their digest).
        self.hash = config_hash or self.cfg.config_hash()
        self.out = OutputDir(self.cfg.out)
        self.plans: OrderedDict = OrderedDict()
        self.faults = _Faults(faults)
        h = self.cfg.health
        self.health = HealthCheck(self.out, h.threshold, h.policy, h.max_attempts)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def ready(self) -> str:
        """Answers once the model is loaded; the driver hands units only to actors that answered."""
        return self.node_id()

    def _plan(self, class_name: str) -> dict:
        if class_name not in self.plans:
            with np.load(self.out.centroid_file(class_name)) as f:
                self.plans[class_name] = {k: f[k] for k in f.files}
            while len(self.plans) > PLAN_CACHE:
                self.plans.popitem(last=False)
        self.plans.move_to_end(class_name)
        return self.plans[class_name]

    def _guidance_rows(self, rows):
        """Per-row centroids, and the compact bases (only those the rows use) with their (n, S) index."""
        guidance = self.cfg.sampler.guidance
        if guidance == "none":
            return None, None, None
        plans = [self._plan(c) for c, _, _ in rows]
        centroids = np.stack([p["centroids"][k] for p, (_, _, k) in zip(plans, rows)])
        if guidance != "manifold":
            return centroids, None, None
        sets, index, offset = [], [], 0
        for p, (_, _, k) in zip(plans, rows):
            lo, hi = int(p["offsets"][k]), int(p["offsets"][k + 1])
            sets.append(p["bases"][lo:hi])
            index.append(offset + p["step_index"][k])
            offset += hi - lo
        return centroids, np.concatenate(sets), np.stack(index).astype(np.int64)

    def run_unit(self, unit: dict) -> dict:
        start = time.perf_counter()
        self.faults.before_unit(unit)
        cfg, out = self.cfg, self.out
        rows = [(str(c), int(y), int(k)) for c, y, k in unit["rows"]]
        centroids, bases, basis_index = self._guidance_rows(rows)
        health = self.health.sample_rows(self.sampler, rows, centroids, bases, basis_index)
        images = self.sampler.decode(health["latents"])
        done = {c for c in dict.fromkeys(r[0] for r in rows) if out.is_class_done(c)}
        table = {c: [] for c in MANIFEST_COLUMNS}
        for r, ((class_name, label, k), image) in enumerate(zip(rows, images)):
            plan = self._plan(class_name)
            data = png_bytes(image)
            path = out.image_path(class_name, k)
            if class_name not in done:  # a complete class is never touched again
                atomic_write_bytes(path, data)
            for col, value in (("class", class_name), ("label", label), ("k", k), ("seed", cfg.seed),
                               ("path", str(path.relative_to(out.root))),
                               ("centroid_node", int(plan["node_ids"][k])),
                               ("centroid_level", int(plan["levels"][k])),
                               ("repeated_centroid", bool(plan["repeated"])),
                               ("guidance", cfg.sampler.guidance), ("cluster", cfg.cluster.method),
                               ("model", cfg.model.model), ("vae", cfg.model.vae or f"{cfg.model.model}/vae"),
                               ("config_hash", self.hash), ("sha256", sha256_bytes(data)),
                               *((col, health[col][r].item()) for col in HEALTH_COLUMNS)):
                table[col].append(value)
        atomic_write_table(unit_part(out, unit["uid"]), pa.table(table))
        return {"uid": unit["uid"], "images": len(rows), "classes": list(dict.fromkeys(r[0] for r in rows)),
                "seconds": time.perf_counter() - start, "ended_at": time.time(), "node_id": self.node_id(),
                "actor_id": ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None,
                "device": self.device, "worker": self.worker.record(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []}

    def run_class(self, class_name: str, label: int) -> dict:
        """One whole class in one call, then its manifest part and ``_SUCCESS`` (in-process use, benches)."""
        start = time.perf_counter()
        unit = Unit(0, f"class-{class_name}", tuple((class_name, int(label), k) for k in range(self.cfg.ipc)))
        res = self.run_unit(unit.to_dict())
        finalize_class(self.out, class_name, [unit.uid], self.cfg.ipc)
        return {"class_name": class_name, "images": res["images"], "seconds": time.perf_counter() - start,
                "node_id": res["node_id"]}


# ---------------------------------------------------------------------------------- the stage driver
def actor_plan(cfg: DistillConfig) -> tuple[dict, int, str, int]:
    """(Ray resource options, torch threads, device, default actor count) for the sampling actors."""
    res = ray.cluster_resources()
    rt = cfg.runtime
    if rt.use_gpu(res.get("GPU", 0)):
        g = rt.gpus_per_sample_actor
        return {"num_gpus": g, "num_cpus": 1}, 0, "cuda", max(1, int(res.get("GPU", 0) / g + 1e-9))
    return {"num_cpus": 1}, 1, "cpu", max(1, int(res.get("CPU", 1)))


def actor_limit(target: int, options: dict, plans_left: bool, cpus: float, gpus: float, plan_gpus: float) -> int:
    """How many sampling actors to hold now. While plan tasks remain, leave one plan task its resources:
    a CPU (a 2-core machine would otherwise deadlock: actors on every CPU, waiting for plans that cannot
    run) and, where plan tasks ask for ``plan_gpus`` of a GPU, that much of the cluster's ``gpus``."""
    if not plans_left:
        return target
    limit = min(target, max(0, int(cpus - options["num_cpus"])))
    share = options.get("num_gpus", 0)
    if plan_gpus > 0 and share > 0:
        limit = min(limit, max(0, int((gpus - plan_gpus) / share + 1e-9)))
    return limit


class _Pool:
    """The sampling actors: starting (a ``ready`` call in flight), idle (answered), busy (a unit)."""

    def __init__(self, cfg: DistillConfig, options: dict, threads: int, device: str, faults: dict | None):
        self.cls = ray.remote(ClassSampler).options(max_restarts=cfg.runtime.max_unit_attempts,
                                                     max_task_retries=0, **options)
        self.args = (cfg.to_dict(), threads, cfg.config_hash(), device, faults)
        self.starting: dict = {}  # ready() ref -> actor
        self.deferred: list = []  # (monotonic time, actor): restarting actors to ask again after a pause
        self.idle: list = []
        self.busy: dict = {}  # run_unit ref -> (actor, unit, started)
        self.timed_out: dict = {}  # run_unit ref -> the timeout it ran over (its actor was restarted)
        self.start_failures, self.last_start_error = 0, None
        self.ever_ready = False
        self.nodes: set[str] = set()

    def size(self) -> int:
        return len(self.starting) + len(self.deferred) + len(self.idle) + len(self.busy)

    def ask_again(self) -> None:
        now = time.monotonic()
        for item in [d for d in self.deferred if d[0] <= now]:
            self.deferred.remove(item)
            self.restart(item[1])

    def grow(self, target: int) -> None:
        while self.size() < target:
            actor = self.cls.remote(*self.args)
            self.starting[actor.ready.remote()] = actor

    def restart(self, actor) -> None:
        """Wait (through a ready call) for an actor that Ray may be restarting; it gets no work until then."""
        self.starting[actor.ready.remote()] = actor

    def refs(self) -> list:
        return [*self.starting, *self.busy]

    def kill_all(self) -> None:
        for actor in [*self.starting.values(), *(a for _, a in self.deferred), *self.idle,
                      *(a for a, _, _ in self.busy.values())]:
            ray.kill(actor)
        self.starting.clear(), self.deferred.clear(), self.idle.clear(), self.busy.clear()


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def sample_stage(cfg: DistillConfig, classes: list[str], labels: dict, out: OutputDir,
                 plans: dict | None = None) -> dict:
    """Run stage 3 (and collect stage 2's tasks when ``plans`` maps plan-task refs to class names).

    Returns {"units": per-unit results of this run, "plans": plan results, "timings": spans (s)}."""
    t_begin = time.perf_counter()
    rt = cfg.runtime
    plans = dict(plans or {})
    planned = set(classes) if not plans else set()
    plan_results: list[dict] = []
    units = make_units(classes, labels, cfg.ipc, cfg.sampler.max_batch, cfg.sampler.units)
    covering: dict[str, list[str]] = {c: [] for c in classes}
    for u in units:
        for c in u.classes:
            covering[c].append(u.uid)
    complete = {c for c in classes if out.is_class_done(c)}
    todo = [u for u in units if not set(u.classes) <= complete and not unit_done(out, u)]
    remaining = {c: 0 for c in classes}
    for u in todo:
        for c in u.classes:
            remaining[c] += 1
    log(f"sample: {len(complete)}/{len(classes)} classes already complete; "
        f"{len(todo)}/{len(units)} units of up to {cfg.sampler.max_batch} samples to run")

    def finalize(c: str) -> None:
        if c not in complete:
            finalize_class(out, c, covering[c], cfg.ipc)
            complete.add(c)

    for c in classes:
        if remaining[c] == 0:
            finalize(c)  # every unit was done before a crash that came ahead of _SUCCESS

    queue = deque(todo)  # in unit order; a failed unit goes back to the front
    attempts: dict[str, int] = {}
    results: list[dict] = []
    options, threads, device, n_default = actor_plan(cfg)
    target = min(rt.sample_actors or n_default, max(len(todo), 1))
    faults = json.loads(os.environ[FAULTS_ENV]) if os.environ.get(FAULTS_ENV) else None
    pool = _Pool(cfg, options, threads, device, faults) if todo else None
    if pool:
        log(f"sample: {target} sampling actor(s) on {device.upper()} "
            f"({', '.join(f'{k}={v:g}' for k, v in options.items())} each)")
    t_sample_start = t_plan_end = t_sample_end = None
    images, start = 0, time.perf_counter()
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    plan_gpus = plan_task_options(cfg, gpus)["num_gpus"]  # what submit_plans asked for each plan task
    try:
        while plans or queue or (pool and pool.busy):
            if pool and queue:
                # While plan tasks remain, leave one of them a CPU and its GPU share (see actor_limit); the
                # GPUs are counted again each time (an autoscaler may be adding GPU nodes for the plans).
                if plans and plan_gpus > 0:
                    gpus = ray.cluster_resources().get("GPU", 0)
                limit = actor_limit(target, options, bool(plans), cpus, gpus, plan_gpus)
                if limit and t_sample_start is None:
                    t_sample_start = time.perf_counter()
                pool.grow(limit)
            if pool:
                pool.ask_again()
                _dispatch(pool, queue, planned)
                _check_timeouts(pool, rt.unit_timeout_s)
            refs = list(plans) + (pool.refs() if pool else [])
            if not refs:  # nothing in flight (cannot happen while work is left; never spin)
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref in plans:
                    c = plans.pop(ref)
                    res = ray.get(ref, timeout=POLL_S)  # a failed plan task (retried by Ray) ends the run
                    plan_results.append(res)
                    log_plan_warnings(res)
                    planned.add(c)
                    if not plans:
                        t_plan_end = time.perf_counter()
                elif ref in pool.starting:
                    _on_ready(pool, ref, rt.max_unit_attempts, target)
                else:
                    res = _on_unit(pool, ref, queue, attempts, rt.max_unit_attempts)
                    if res is None:
                        continue
                    results.append(res)
                    images += res["images"]
                    for c in res["classes"]:
                        remaining[c] -= 1
                        if remaining[c] == 0:
                            finalize(c)
                    if rt.progress:
                        elapsed = time.perf_counter() - start
                        left = len(queue) + len(pool.busy)
                        eta = elapsed / len(results) * left
                        log(f"sample: {len(results)}/{len(todo)} units, {len(complete)}/{len(classes)} classes, "
                            f"{images / elapsed:.2f} images/s, ETA {eta:.0f}s")
                    if not queue and not pool.busy:
                        t_sample_end = time.perf_counter()
    finally:
        if pool:
            pool.kill_all()
    t_end = time.perf_counter()
    t_plan_end = t_plan_end or t_begin
    if t_sample_start is None:
        t_sample_start = t_sample_end = t_end
    t_sample_end = t_sample_end or t_end
    overlap = max(0.0, min(t_plan_end, t_sample_end) - max(t_begin, t_sample_start))
    timings = {"plan": t_plan_end - t_begin, "sample": t_sample_end - t_sample_start,
               "plan_sample_overlap": overlap, "plan_and_sample": t_end - t_begin}
    return {"units": results, "plans": plan_results, "timings": timings, "nodes": sorted(pool.nodes) if pool else []}


def _dispatch(pool: _Pool, queue: deque, planned: set) -> None:
    """Hand the first units whose plans all exist to idle, ready actors (never to a starting one)."""
    skipped = []
    while pool.idle and queue:
        unit = queue.popleft()
        if not set(unit.classes) <= planned:
            skipped.append(unit)
            continue
        actor = pool.idle.pop()
        pool.busy[actor.run_unit.remote(unit.to_dict())] = (actor, unit, time.monotonic())
    queue.extendleft(reversed(skipped))


def _check_timeouts(pool: _Pool, timeout_s: float) -> None:
    if timeout_s <= 0:
        return
    now = time.monotonic()
    for ref, (actor, unit, started) in list(pool.busy.items()):
        if now - started > timeout_s and ref not in pool.timed_out:
            log(f"sample: {unit.describe()} ran over runtime.unit_timeout_s={timeout_s:g}s; restarting its actor")
            pool.timed_out[ref] = timeout_s  # its error (the actor restarted under it) is on the way
            ray.kill(actor, no_restart=False)


def _on_ready(pool: _Pool, ref, max_attempts: int, target: int) -> None:
    actor = pool.starting.pop(ref)
    try:
        pool.nodes.add(ray.get(ref, timeout=POLL_S))
    except ActorUnavailableError:  # Ray is restarting it (its process or node died): ask again shortly
        pool.deferred.append((time.monotonic() + POLL_S, actor))
        return
    except (RayActorError, RayTaskError, GetTimeoutError) as exc:
        if device_error_line(exc):  # given a GPU torch cannot use, under runtime.device=cuda: no retry helps
            raise DeviceUnavailableError(device_error_line(exc)) from None
        # Died for good (restarts used up, killed, its constructor failed): replace it (grow, next loop).
        pool.start_failures += 1
        pool.last_start_error = exc
        if pool.start_failures >= max_attempts * max(1, target):
            raise UnitFailedError(f"sampling actors failed to start {pool.start_failures} times in a row; "
                                  f"last error: {_cause(exc)}") from exc
        log(f"sample: a sampling actor is gone ({_cause(exc)}); requesting a replacement")
        return
    pool.start_failures = 0
    pool.ever_ready = True
    pool.idle.append(actor)


def _on_unit(pool: _Pool, ref, queue: deque, attempts: dict, max_attempts: int) -> dict | None:
    actor, unit, _ = pool.busy.pop(ref)
    timeout_s = pool.timed_out.pop(ref, None)
    timed_out = timeout_s is not None
    try:
        res = ray.get(ref, timeout=POLL_S)
    except Exception as exc:  # any failure of a unit is retried up to the limit
        attempts[unit.uid] = attempts.get(unit.uid, 0) + 1
        # A timed-out unit's own error only says that its actor restarted under it: name the real cause.
        cause = f"ran over runtime.unit_timeout_s={timeout_s:g}s" if timed_out else _cause(exc)
        if attempts[unit.uid] >= max_attempts:
            message = f"sampling {unit.describe()} failed {attempts[unit.uid]} time(s); last error: {cause}"
            log(f"sample: {message}")
            if isinstance(exc, OSError):
                raise  # disk full, permissions: the CLI reports these with the path and the resume hint
            raise UnitFailedError(message) from exc
        log(f"sample: {unit.describe()} failed (attempt {attempts[unit.uid]}/{max_attempts}): "
            f"{cause}; retrying it")
        queue.appendleft(unit)
        if isinstance(exc, (RayActorError, GetTimeoutError)) or timed_out:
            pool.restart(actor)  # Ray may be restarting it: no work until it answers ready()
        else:
            pool.idle.append(actor)  # the actor is fine; the unit raised
        return None
    pool.idle.append(actor)
    pool.nodes.add(res["node_id"])
    return res
