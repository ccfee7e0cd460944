"""Stages 2 and 3 overlapped: the driver's loop that hands work units to sampling actors as plans arrive.

Overlap with stage 2: the driver takes the plan tasks' refs and dispatches a unit as soon as the plans of
all its classes exist; while plan tasks remain, the sampling actors leave room for at least one of them:
a CPU, and, where plan tasks ask for a share of a GPU (``runtime.gpus_per_plan_task``), that share of the
cluster's GPUs (``actor_limit``). Otherwise actors holding every GPU would wait for plans that can never
be scheduled (a deadlock: on a one-GPU cluster this means no sampling until the last plan).

Faults. Actors are created with ``max_restarts`` (Ray restarts one whose process or node died) and no
task retries of their own: the driver counts every failed attempt of a unit, whatever the cause (an
exception in the unit, CUDA out of memory, a dead actor or node, ``runtime.unit_timeout_s``), requeues the
unit, and after ``runtime.max_unit_attempts`` raises one ``UnitFailedError`` naming the unit, its classes
and the cause. A unit is handed only to an actor that has answered a ``ready`` call, so an actor that is
(re)starting or waiting for a node never holds work; a permanently dead actor is replaced at once (the
replacement waits for resources if it must, and gets work when it is placed: a node that comes back, or
one an autoscaler adds, is used). Every wait has a timeout and re-checks.

The actor class is a parameter (``actor_cls``, a ``ClassSampler`` by default): the scheduler only calls
its ``ready`` and ``run_unit``, which is what tests subclass to inject faults.
"""
from __future__ import annotations

import time
from collections import deque

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from pipeline.common.device import DeviceUnavailableError, device_error_line
from pipeline.common.log import get_logger
from pipeline.common.outputs import OutputDir
from pipeline.config import DistillConfig
from pipeline.distill.plan import log_plan_warnings, plan_task_options
from pipeline.distill.sample import ClassSampler, Unit, finalize_class, make_units, unit_done

log = get_logger().info

POLL_S = 1.0  # longest single wait of the driver loop; every wait re-checks the state after it


class UnitFailedError(RuntimeError):
    """A sampling unit failed ``runtime.max_unit_attempts`` times (or no sampling actor could start)."""


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


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


class _Pool:
    """The sampling actors: starting (a ``ready`` call in flight), idle (answered), busy (a unit)."""

    def __init__(self, cfg: DistillConfig, actor_cls, options: dict, threads: int, device: str, target: int):
        self.cls = ray.remote(actor_cls).options(max_restarts=cfg.runtime.max_unit_attempts,
                                                  max_task_retries=0, **options)
        self.args = (cfg.to_dict(), threads, cfg.config_hash(), device)
        self.max_attempts, self.target = cfg.runtime.max_unit_attempts, target
        self.starting: dict = {}  # ready() ref -> actor
        self.deferred: list = []  # (monotonic time, actor): restarting actors to ask again after a pause
        self.idle: list = []
        self.busy: dict = {}  # run_unit ref -> (actor, unit, started)
        self.timed_out: dict = {}  # run_unit ref -> the timeout it ran over (its actor was restarted)
        self.start_failures = 0  # actors gone before answering ready(), in a row

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

    def dispatch(self, queue: deque, planned: set) -> None:
        """Hand the first units whose plans all exist to idle, ready actors (never to a starting one)."""
        skipped = []
        while self.idle and queue:
            unit = queue.popleft()
            if not set(unit.classes) <= planned:
                skipped.append(unit)
                continue
            actor = self.idle.pop()
            self.busy[actor.run_unit.remote(unit.to_dict())] = (actor, unit, time.monotonic())
        queue.extendleft(reversed(skipped))

    def check_timeouts(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            return
        now = time.monotonic()
        for ref, (actor, unit, started) in list(self.busy.items()):
            if now - started > timeout_s and ref not in self.timed_out:
                log(f"sample: {unit.describe()} ran over runtime.unit_timeout_s={timeout_s:g}s; restarting its actor")
                self.timed_out[ref] = timeout_s  # its error (the actor restarted under it) is on the way
                ray.kill(actor, no_restart=False)

    def on_ready(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            ray.get(ref, timeout=POLL_S)
        except ActorUnavailableError:  # Ray is restarting it (its process or node died): ask again shortly
            self.deferred.append((time.monotonic() + POLL_S, actor))
            return
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            if device_error_line(exc):  # given a GPU torch cannot use, under runtime.device=cuda: no retry helps
                raise DeviceUnavailableError(device_error_line(exc)) from None
            # Died for good (restarts used up, killed, its constructor failed): replace it (grow, next loop).
            self.start_failures += 1
            if self.start_failures >= self.max_attempts * max(1, self.target):
                raise UnitFailedError(f"sampling actors failed to start {self.start_failures} times in a row; "
                                      f"last error: {_cause(exc)}") from exc
            log(f"sample: a sampling actor is gone ({_cause(exc)}); requesting a replacement")
            return
        self.start_failures = 0
        self.idle.append(actor)

    def on_unit(self, ref, queue: deque, attempts: dict) -> dict | None:
        """The unit's result, or None when it failed and went back to the front of ``queue``."""
        actor, unit, _ = self.busy.pop(ref)
        timeout_s = self.timed_out.pop(ref, None)
        timed_out = timeout_s is not None
        try:
            res = ray.get(ref, timeout=POLL_S)
        except Exception as exc:  # any failure of a unit is retried up to the limit
            attempts[unit.uid] = attempts.get(unit.uid, 0) + 1
            # A timed-out unit's own error only says that its actor restarted under it: name the real cause.
            cause = f"ran over runtime.unit_timeout_s={timeout_s:g}s" if timed_out else _cause(exc)
            if attempts[unit.uid] >= self.max_attempts:
                message = f"sampling {unit.describe()} failed {attempts[unit.uid]} time(s); last error: {cause}"
                log(f"sample: {message}")
                if isinstance(exc, OSError):
                    raise  # disk full, permissions: the CLI reports these with the path and the resume hint
                raise UnitFailedError(message) from exc
            log(f"sample: {unit.describe()} failed (attempt {attempts[unit.uid]}/{self.max_attempts}): "
                f"{cause}; retrying it")
            queue.appendleft(unit)
            if isinstance(exc, (RayActorError, GetTimeoutError)) or timed_out:
                self.restart(actor)  # Ray may be restarting it: no work until it answers ready()
            else:
                self.idle.append(actor)  # the actor is fine; the unit raised
            return None
        self.idle.append(actor)
        return res


class _Progress:
    """What the run has finished: units, images, classes (finalized as their last unit lands), spans."""

    def __init__(self, cfg: DistillConfig, classes: list[str], units: list[Unit], out: OutputDir):
        self.cfg, self.classes, self.out = cfg, classes, out
        self.covering: dict[str, list[str]] = {c: [] for c in classes}
        for u in units:
            for c in u.classes:
                self.covering[c].append(u.uid)
        self.complete = {c for c in classes if out.is_class_done(c)}
        self.todo = [u for u in units if not set(u.classes) <= self.complete and not unit_done(out, u)]
        self.remaining = {c: 0 for c in classes}
        for u in self.todo:
            for c in u.classes:
                self.remaining[c] += 1
        self.results: list[dict] = []
        self.images, self.start = 0, time.perf_counter()

    def finalize(self, c: str) -> None:
        if c not in self.complete:
            finalize_class(self.out, c, self.covering[c], self.cfg.ipc)
            self.complete.add(c)

    def finalize_leftovers(self) -> None:
        """Classes whose units were all done before a crash that came ahead of their ``_SUCCESS``."""
        for c in self.classes:
            if self.remaining[c] == 0:
                self.finalize(c)

    def unit_done(self, res: dict, left: int) -> None:
        self.results.append(res)
        self.images += res["images"]
        for c in res["classes"]:
            self.remaining[c] -= 1
            if self.remaining[c] == 0:
                self.finalize(c)
        if self.cfg.runtime.progress:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / len(self.results) * left
            log(f"sample: {len(self.results)}/{len(self.todo)} units, {len(self.complete)}/{len(self.classes)} "
                f"classes, {self.images / elapsed:.2f} images/s, ETA {eta:.0f}s")


class _Clock:
    """The spans of run.json's ``timings_s``: plan, sample, their overlap, both together."""

    def __init__(self):
        self.begin = time.perf_counter()
        self.sample_start = self.plan_end = self.sample_end = None

    def timings(self) -> dict:
        end = time.perf_counter()
        plan_end = self.plan_end or self.begin
        sample_start = self.sample_start if self.sample_start is not None else end
        sample_end = self.sample_end or end
        overlap = max(0.0, min(plan_end, sample_end) - max(self.begin, sample_start))
        return {"plan": plan_end - self.begin, "sample": sample_end - sample_start,
                "plan_sample_overlap": overlap, "plan_and_sample": end - self.begin}


class _Schedule:
    """One run of the loop: plan refs in flight, the unit queue, the actor pool."""

    def __init__(self, cfg: DistillConfig, classes: list[str], labels: dict, out: OutputDir, plans: dict,
                 actor_cls):
        self.cfg, self.clock = cfg, _Clock()
        self.plans = dict(plans)
        self.planned = set(classes) if not plans else set()
        self.plan_results: list[dict] = []
        units = make_units(classes, labels, cfg.ipc, cfg.sampler.max_batch, cfg.sampler.units)
        self.progress = _Progress(cfg, classes, units, out)
        todo = self.progress.todo
        log(f"sample: {len(self.progress.complete)}/{len(classes)} classes already complete; "
            f"{len(todo)}/{len(units)} units of up to {cfg.sampler.max_batch} samples to run")
        self.progress.finalize_leftovers()
        self.queue = deque(todo)  # in unit order; a failed unit goes back to the front
        self.attempts: dict[str, int] = {}
        self.options, threads, device, n_default = actor_plan(cfg)
        self.target = min(cfg.runtime.sample_actors or n_default, max(len(todo), 1))
        self.pool = _Pool(cfg, actor_cls, self.options, threads, device, self.target) if todo else None
        if self.pool:
            log(f"sample: {self.target} sampling actor(s) on {device.upper()} "
                f"({', '.join(f'{k}={v:g}' for k, v in self.options.items())} each)")
        resources = ray.cluster_resources()
        self.cpus, self.gpus = resources.get("CPU", 1), resources.get("GPU", 0)
        self.plan_gpus = plan_task_options(cfg, self.gpus)["num_gpus"]  # what each plan task asked for

    def busy(self) -> bool:
        return bool(self.plans or self.queue or (self.pool and self.pool.busy))

    def step(self) -> None:
        """Size the pool, hand out work, wait (at most ``POLL_S``) for one result and take it in."""
        pool = self.pool
        if pool and self.queue:
            # While plan tasks remain, leave one of them a CPU and its GPU share (see actor_limit); the
            # GPUs are counted again each time (an autoscaler may be adding GPU nodes for the plans).
            if self.plans and self.plan_gpus > 0:
                self.gpus = ray.cluster_resources().get("GPU", 0)
            limit = actor_limit(self.target, self.options, bool(self.plans), self.cpus, self.gpus, self.plan_gpus)
            if limit and self.clock.sample_start is None:
                self.clock.sample_start = time.perf_counter()
            pool.grow(limit)
        if pool:
            pool.ask_again()
            pool.dispatch(self.queue, self.planned)
            pool.check_timeouts(self.cfg.runtime.unit_timeout_s)
        refs = list(self.plans) + (pool.refs() if pool else [])
        if not refs:  # nothing in flight (cannot happen while work is left; never spin)
            time.sleep(0.05)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
        for ref in ready:
            if ref in self.plans:
                self.take_plan(ref)
            elif ref in pool.starting:
                pool.on_ready(ref)
            else:
                self.take_unit(ref)

    def take_plan(self, ref) -> None:
        c = self.plans.pop(ref)
        res = ray.get(ref, timeout=POLL_S)  # a failed plan task (retried by Ray) ends the run
        self.plan_results.append(res)
        log_plan_warnings(res)
        self.planned.add(c)
        if not self.plans:
            self.clock.plan_end = time.perf_counter()

    def take_unit(self, ref) -> None:
        res = self.pool.on_unit(ref, self.queue, self.attempts)
        if res is None:
            return
        self.progress.unit_done(res, left=len(self.queue) + len(self.pool.busy))
        if not self.queue and not self.pool.busy:
            self.clock.sample_end = time.perf_counter()


def sample_stage(cfg: DistillConfig, classes: list[str], labels: dict, out: OutputDir,
                 plans: dict | None = None, *, actor_cls: type = ClassSampler) -> dict:
    """Run stage 3 (and collect stage 2's tasks when ``plans`` maps plan-task refs to class names).

    Returns {"units": per-unit results of this run, "plans": plan results, "timings": spans (s)}."""
    run = _Schedule(cfg, classes, labels, out, plans or {}, actor_cls)
    try:
        while run.busy():
            run.step()
    finally:
        if run.pool:
            run.pool.kill_all()
    return {"units": run.progress.results, "plans": run.plan_results, "timings": run.clock.timings()}
