"""Shared fixtures: tiny random diffusers models saved in DiT-XL/2's layout, tiny image folders, and one
Ray instance per test session (2 CPUs, quiet, offline, with a no-progress timeout so a hang fails)."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# After the environment above: huggingface_hub reads HF_HUB_OFFLINE when diffusers is first imported.
import numpy as np
import pytest
import torch

from ops.schedule import linear_betas
from pipeline.common.synthetic import save_tiny_prior, tiny_dit, tiny_vae, write_image_folder  # noqa: F401


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory) -> Path:
    return save_tiny_prior(tmp_path_factory.mktemp("prior"))


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray (address="local": never attach to a cluster another test started)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=200 * 1024 * 1024, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Every test that uses the shared Ray session is `slow` (Ray's start, workers and model loads take tens
    of seconds on 2 cores) unless it is marked `smoke` (one small run through Ray): `make test-fast` leaves
    the slow ones to `make test`. Tests marked `cluster` shut the shared session instance down to start
    clusters of their own, so they run last."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("smoke") is None:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def load_script(path: Path, name: str):
    """A script outside the packages (bench/, scripts/) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def faulty_sampler(marker_dir: Path | str = "", **spec) -> type:
    """A test-only sampling actor: ``ClassSampler`` with faults injected before a unit runs. Pass it as
    ``actor_cls`` to ``sample_stage`` / ``run`` / ``distill_command``. ``spec``: ``raise_once_per_class``,
    ``raise_always``, ``exit_units`` / ``kill_units`` / ``hang_units`` (unit indices; on the unit's first
    try: the process exits (Ray restarts the actor), the actor is killed for good (the driver must replace
    it), or the unit sleeps ``hang_s``), ``delay_s`` (a pause before every unit), ``spread_over`` (no unit
    runs until that many actors have each taken one: work lands on several nodes whatever the load). "Once",
    "first try" and the actors seen are markers in ``marker_dir``, so they hold across actor restarts."""
    import ray

    from pipeline.distill.sample import ClassSampler

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    class FaultySampler(ClassSampler):
        SPEC = {"dir": str(marker_dir), **spec}

        def _first(self, name: str) -> bool:
            try:
                fd = os.open(Path(self.SPEC["dir"]) / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.close(fd)
            return True

        def run_unit(self, unit: dict) -> dict:
            spec, uid = self.SPEC, unit["uid"]
            time.sleep(float(spec.get("delay_s", 0)))
            if spec.get("spread_over"):  # no unit runs before that many actors have each taken one
                self._first(f"actor-{ray.get_runtime_context().get_actor_id()}")
                deadline = time.monotonic() + 600
                while (len(list(Path(spec["dir"]).glob("actor-*"))) < spec["spread_over"]
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
            index = int(uid[1:7]) if uid.startswith("u") else -1
            if index in spec.get("exit_units", []) and self._first(f"exit-{uid}"):
                os._exit(1)
            if index in spec.get("kill_units", []) and self._first(f"kill-{uid}"):
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                time.sleep(600)  # the kill is asynchronous: never finish the unit before it lands
            if index in spec.get("hang_units", []) and self._first(f"hang-{uid}"):
                time.sleep(float(spec.get("hang_s", 600)))
            if spec.get("raise_once_per_class"):
                fresh = [c for c in dict.fromkeys(r[0] for r in unit["rows"]) if self._first(f"raise-{c}")]
                if fresh:
                    raise RuntimeError(f"injected fault (test) for class(es) {', '.join(fresh)}")
            if spec.get("raise_always"):
                raise ValueError("injected fault (test), every time")
            return super().run_unit(unit)

    return FaultySampler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_port_flags() -> list[str]:
    """``ray start --head`` flags giving each of the head's other ports a free one of its own: another Ray on
    this machine (a user's, a test's) holds the defaults. Pass ``--port`` and ``--dashboard-port`` besides."""
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]


def wait_for_dashboard(port: int, proc, timeout: float = 120.0) -> None:
    """Until a `ray start --head` process's dashboard answers (or it exits, or the timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")


def stop_process_group(proc, timeout: float = 60.0) -> None:
    """SIGTERM a process started with start_new_session=True (a `ray start --head --block`) and its
    children; SIGKILL them if they are still there after ``timeout``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------ sampler inputs (tests on GuidedSampler)
SAMPLER_LATENT = 8  # latent side of the sampler tests' prior (2 VAE blocks: 16 px images)
D = 4 * SAMPLER_LATENT * SAMPLER_LATENT


def save_sampler_prior(folder: Path, num_classes: int, learned_variance: bool) -> Path:
    """The tiny prior with 8 x 8 latents and a two-layer DiT, as the sampler tests use it."""
    return save_tiny_prior(folder, num_classes=num_classes, latent_size=SAMPLER_LATENT,
                           learned_variance=learned_variance, vae_blocks=2, dit_layers=2)


class GaussianDataDenoiser(torch.nn.Module):
    """A loaded tiny DiT made into a sensible denoiser, so that latents stay O(1) through sampling.

    A random DiT is no denoiser: its x0_hat = x_t / sqrt(abar) at t = 999 is ~150x too large and the
    chain ends at latents in the hundreds, where float32 cannot resolve 1e-5 and guidance overshoots.
    This predicts the exact epsilon for N(0, I) data, sqrt(1 - abar_t) x_t, plus the DiT's output times
    0.1 sqrt(abar_t) (a class- and time-dependent shift of x0_hat by 0.1 * sqrt(1 - abar_t) * DiT), and
    squashes the variance channels into DiT's [-1, 1] learned range.
    """

    def __init__(self, dit, strength: float = 0.1):
        super().__init__()
        self.dit, self.config, self.strength = dit, dit.config, strength
        abar = torch.tensor(np.cumprod(1 - linear_betas(1000)), dtype=torch.float32)
        self.register_buffer("sqrt_abar", abar.sqrt())
        self.register_buffer("sqrt_one_minus_abar", (1 - abar).sqrt())

    @property
    def dtype(self):
        return self.dit.dtype

    @property
    def device(self):
        return self.dit.device

    def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        out = self.dit(hidden_states, timestep=timestep, class_labels=class_labels).sample
        c = hidden_states.shape[1]
        a, b = (v[timestep].view(-1, 1, 1, 1) for v in (self.sqrt_abar, self.sqrt_one_minus_abar))
        eps = b * hidden_states + self.strength * a * out[:, :c]
        return types.SimpleNamespace(sample=torch.cat([eps, torch.tanh(out[:, c:])], dim=1))


def as_denoiser(prior):
    return dataclasses.replace(prior, transformer=GaussianDataDenoiser(prior.transformer))


def random_bases(n, d, seed=0, steps=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n, D, d) if steps is None else (n, steps, D, d)
    q, _ = torch.linalg.qr(torch.randn(shape, generator=g))
    return q


def random_centroids(n, seed=1):
    return torch.randn((n, D), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- loading

def stage_setup(tmp_path, prior, classes, ipc, **sampler):
    """A config and an output folder for stage 3 on its own: each class's plan made from random latents."""
    import io

    from pipeline.common.outputs import OutputDir
    from pipeline.config import build_config
    from pipeline.distill.plan import plan_class

    cfg = build_config({"out": str(tmp_path), "ipc": ipc, "model": {"model": str(prior), "vae": ""},
                        "sampler": {"num_steps": 4, "t_stop": 1, **sampler},
                        "tangent": {"neighbours": 3, "dim": 2}, "runtime": {"progress": False}})
    out = OutputDir(tmp_path)
    out.prepare(cfg, overwrite=False)
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        X = rng.normal(i, 1.0, size=(8, 64)).astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, **plan_class(X, cfg))
        out.centroid_file(c).parent.mkdir(parents=True, exist_ok=True)
        out.centroid_file(c).write_bytes(buf.getvalue())
    return cfg, out


def output_tree(out) -> dict:
    """Every byte a run leaves in train/ and _work/manifest/: what reruns and resumes must reproduce."""
    files = sorted([*out.train.rglob("*"), *(out.work / "manifest").glob("*")])
    return {str(p.relative_to(out.root)): p.read_bytes() for p in files if p.is_file()}


