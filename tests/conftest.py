"""Shared fixtures: tiny random diffusers models saved in DiT-XL/2's layout, tiny image folders, and one
Ray instance per test session (2 CPUs, quiet, offline, with a no-progress timeout so a hang fails)."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_tiny_prior(folder: Path, *, num_classes: int = 4, latent_size: int = 4, learned_variance: bool = True,
                    seed: int = 0) -> Path:
    """A random-init DiT + VAE in the diffusers layout (folder/transformer, folder/vae): 16 px images."""
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=8 if learned_variance else 4, num_layers=1, sample_size=latent_size,
                                patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=4)
    vae.save_pretrained(folder / "vae")
    dit.save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory) -> Path:
    return save_tiny_prior(tmp_path_factory.mktemp("prior"))


def write_image_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """root/train/<class>/img_<i>.png with class-dependent colour blobs, so classes differ."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, (cls, n) in enumerate(classes.items()):
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.zeros((size, size, 3), np.float32)
            base[..., ci % 3] = 180
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return root


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
    """Tests marked `cluster` shut the shared session instance down to start clusters of their own, so
    they run last."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def load_script(path: Path, name: str):
    """A script outside the packages (bench/, scripts/) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
