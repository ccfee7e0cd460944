"""A model folder brings its own VAE unless --vae says otherwise; an unreachable hub fails at once."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder

from pipeline.config import DEFAULT_VAE
from pipeline.distill.run import resolve_distill_config

REPO = Path(__file__).resolve().parents[1]


def test_a_model_folder_with_a_vae_brings_it(tmp_path, tiny_prior):
    folder = shutil.copytree(tiny_prior, tmp_path / "prior")
    assert resolve_distill_config(data="x", model=str(folder)).model.vae == ""
    assert resolve_distill_config(data="x", model=str(folder), vae="other/vae").model.vae == "other/vae"
    assert resolve_distill_config(data="x", model=str(folder), overrides=["model.vae=my/vae"]).model.vae == "my/vae"
    assert resolve_distill_config(data="x", model="builtin:mnist10k").model.vae == ""
    shutil.rmtree(folder / "vae")
    assert resolve_distill_config(data="x", model=str(folder)).model.vae == DEFAULT_VAE
    assert resolve_distill_config(data="x", model="facebook/DiT-XL-2-256").model.vae == DEFAULT_VAE


@pytest.mark.slow
def test_an_unreachable_hub_fails_with_the_staging_help_without_retrying(tmp_path):
    """No HF_HUB_OFFLINE, an endpoint whose name does not resolve (as on a machine without network), an empty
    cache: exit 2 at the first look-up, in the local cache only, naming the model and how to stage it."""
    data = write_image_folder(tmp_path / "data", {"a": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "RAY_ADDRESS")}
    env.update(HF_ENDPOINT="http://hub.invalid", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pipeline", "distill", "--data", str(data), "--out", str(tmp_path / "o"),
                        "--model", "someone/not-a-cached-model", "--vae", "someone/nor-this-vae"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.model" in r.stderr and "stage the weights" in r.stderr
    assert "hub unreachable: looked in the local cache only" in r.stderr
