"""--data s3://bucket/prefix: listed and read through pyarrow's filesystems, against a real S3 endpoint
(moto's server on 127.0.0.1), not a mock of the client. Outputs stay on a local/shared filesystem."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from conftest import free_port
from PIL import Image

from pipeline.config import DataConfig
from pipeline.inputs.sources import list_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    s3 = pafs.S3FileSystem(endpoint_override=url, access_key="test", secret_key="test", region="us-east-1",
                           allow_bucket_creation=True)
    deadline = time.time() + 60
    while True:
        try:
            s3.create_dir("data")
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.5)
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(("cat", "dog")):
        for i in range(3):
            img = np.zeros((20, 20, 3), np.float32)
            img[..., ci] = 180
            buf = io.BytesIO()
            Image.fromarray(np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)).save(buf, "PNG")
            with s3.open_output_stream(f"data/imgs/train/{cls}/{i}.png") as f:
                f.write(buf.getvalue())
    with s3.open_output_stream("data/imgs/train/cat/notes.txt") as f:
        f.write(b"not an image")
    yield env
    proc.kill()
    proc.wait()


def test_an_s3_imagefolder_lists_like_a_local_one(s3_endpoint, monkeypatch):
    for k, v in s3_endpoint.items():
        monkeypatch.setenv(k, v)
    listing = list_source(DataConfig(path="s3://data/imgs"))
    assert listing.root == "s3://data/imgs/train" and listing.classes == ["cat", "dog"]
    assert sorted(rel for rel, _ in listing.files) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert listing.rejected == [("cat/notes.txt", "not an image file extension (.txt)")]


@pytest.mark.slow
def test_distill_reads_images_from_s3(s3_endpoint, tmp_path, tiny_prior):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_endpoint, PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline", "distill", "--data", "s3://data/imgs", "--out", str(out),
                        "--ipc", "1", "--model", str(tiny_prior), "--vae", "", "--set", "sampler.num_steps=3",
                        "--set", "sampler.t_stop=1", "--set", "tangent.neighbours=2", "--set", "tangent.dim=1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["encoded"] == 6 and run["counts"]["quarantined"] == 1 and run["counts"]["images"] == 2
    assert sorted(p.parent.name for p in (out / "train").rglob("*.png")) == ["cat", "dog"]
