"""The one training loop of `train-prior`: both stages (VAE, then DiT) run through :func:`run_stage`.

A stage brings what differs (its optimiser, its per-batch loss, what happens between ``backward`` and
``step``, what it checkpoints); the loop owns what is the same: resuming from the last checkpoint, the
batch order, the learning rate per step, the optimiser step, the running means and progress lines, and
a report (with a checkpoint every few epochs) at the end of each epoch.

Bytes: a rerun, and a run resumed from any checkpoint, give the same weights as an uninterrupted run.
That holds because every random draw comes from a stream fixed by (seed, stage, epoch) or restored from
the checkpoint (the batch order, torch's global generator for the VAE's posterior samples, each rank's
noise generator for the DiT), and because the loop performs the same operations in the same order.
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from pipeline.common.log import get_logger

log = get_logger("train-prior").info


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(n: int, batch: int, rank: int, world: int, rng: np.random.Generator):
    """One epoch of index batches for this rank: a shared permutation, dealt round-robin to ranks."""
    order = rng.permutation(n)
    per_step = batch * world
    for start in range(0, n - per_step + 1 if n >= per_step else 1, per_step):
        chunk = order[start:start + per_step]
        yield chunk[rank::world]


class _Meter:
    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


class Run:
    """Per-worker run state: progress reports every epoch and a resumable checkpoint every few epochs.

    All ranks call :meth:`epoch_done` at the same points (Ray Train's ``report`` is collective); only
    rank 0 writes the checkpoint. After a crash (a worker, or the whole Ray instance), running the same
    command again resumes from the last checkpoint: the run name is a hash of the config.
    """
    def __init__(self, rank: int, every: int):
        self.rank, self.every = rank, every
        self.history: list[dict] = []
        self.state: dict = {}  # what the last checkpoint held ({} on a fresh run)
        self.extra: dict = {}  # written into every checkpoint from now on
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                if (Path(d) / "state.pt").is_file():
                    self.state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
                    self.history = self.state.get("history", [])

    def say(self, msg: str) -> None:
        """Log on rank 0 only: every rank runs the same loop, one copy of each line is enough."""
        if self.rank == 0:
            log(msg)

    def resume(self, stage: str, label: str, load: Callable[[dict], None]) -> int:
        """The epoch to start ``stage`` at: 0, or, when the last checkpoint is inside this stage, its epoch
        after ``load(state)`` has restored the weights, optimiser and random generators."""
        if self.state.get("stage") != stage:
            return 0
        load(self.state)
        start = self.state["epoch"]
        self.say(f"resuming the {label} after epoch {start}")
        return start

    def stage_summary(self, stage: str) -> tuple[dict, float]:
        """(the last epoch's row, total seconds) of a stage, over every invocation of a resumed run."""
        rows = [r for r in self.history if r["stage"] == stage]
        return (rows[-1] if rows else {}), sum(r.get("seconds", 0.0) for r in rows)

    def epoch_done(self, row: dict, state_fn=None, force: bool = False) -> None:
        self.history.append(row)
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
        checkpoint = None
        if state_fn is not None and (force or row["epoch"] % self.every == 0) and self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="prior-state-"))
            torch.save({**self.extra, **state_fn(), "history": self.history}, tmp / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics, checkpoint=checkpoint)


def _nothing(*_args) -> None:
    return None


@dataclass
class Stage:
    """What differs between the VAE and the DiT stage; :func:`run_stage` does the rest."""
    name: str                 # "vae" | "dit": progress lines, history rows, checkpoints, summary keys
    epochs: int
    batch_size: int           # global: split over the ranks
    lr: float                 # base rate of the warm-up + cosine schedule
    stream: int               # the batch order of an epoch is drawn from default_rng([seed, stream, epoch])
    optimizer: torch.optim.Optimizer
    # batch indices -> (the loss to minimise, {metric: 0-d tensor}); the metrics' formats in progress lines
    loss: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    formats: dict[str, str]
    state: Callable[[], dict]  # the checkpoint's stage-specific entries (called on rank 0 only)
    before_step: Callable[[], None] = _nothing   # gradients are ready: all-reduce or clip them
    after_step: Callable[[int], None] = _nothing  # weights updated (with the new step count): EMA
    # called on every rank at the end of every epoch (may be collective): more checkpoint entries
    collect: Callable[[], dict] = dict


def run_stage(stage: Stage, run: Run, *, n: int, start: int, seed: int, warmup: int, log_every: int,
              world: int) -> dict:
    """Epochs ``start`` .. ``stage.epochs`` of a stage over ``n`` training items; its summary:
    ``{name}_final_epoch_{metric}`` of the last epoch (over every invocation of a resumed run),
    ``{name}_steps`` and ``{name}_seconds``."""
    opt = stage.optimizer
    steps_per_epoch = max(1, n // (stage.batch_size * world))
    total = stage.epochs * steps_per_epoch
    step, t0 = start * steps_per_epoch, time.perf_counter()
    for epoch in range(start, stage.epochs):
        meter, t_epoch = _Meter(), time.perf_counter()
        # The batch order of an epoch depends on (seed, stage, epoch) only, so a resumed run sees the same.
        rng = np.random.default_rng([seed, stage.stream, epoch])
        for idx in batches(n, stage.batch_size, run.rank, world, rng):
            loss, metrics = stage.loss(idx)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, stage.lr, warmup)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            stage.before_step()
            opt.step()
            step += 1
            stage.after_step(step)
            meter.add(**{k: v.item() for k, v in metrics.items()})
            if step % log_every == 0 or step == total:
                m = meter.means()
                values = " ".join(f"{k} {m[k]:{fmt}}" for k, fmt in stage.formats.items())
                run.say(f"{stage.name} step {step}/{total} epoch {epoch + 1} {values} "
                        f"({(step - start * steps_per_epoch) / (time.perf_counter() - t0):.2f} it/s)")
        collected = stage.collect()
        run.epoch_done(
            {"stage": stage.name, "epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t_epoch,
             **meter.means()},
            lambda: {"stage": stage.name, "epoch": epoch + 1, **stage.state(), **collected},
            force=epoch + 1 == stage.epochs)
    last, seconds = run.stage_summary(stage.name)
    return {**{f"{stage.name}_final_epoch_{k}": last.get(k) for k in stage.formats},
            f"{stage.name}_steps": step, f"{stage.name}_seconds": seconds}


def allreduce_grads(model) -> None:
    """Average the gradients over the ranks by hand (for models trained without DDP's wrapper)."""
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def gather_generator_states(gen, world: int) -> list:
    """Every rank's noise-generator state (rank 0 writes them all into the checkpoint)."""
    if world == 1:
        return [gen.get_state()]

    states = [None] * world
    dist.all_gather_object(states, gen.get_state())
    return states
