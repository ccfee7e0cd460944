"""Relative paths are resolved once, on the driver: Ray workers do not share its working directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_image_folder

from pipeline.config import build_config, validate

REPO = Path(__file__).resolve().parents[1]


def test_relative_local_paths_become_absolute_and_names_stay(tmp_path, monkeypatch, tiny_prior):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data", {"a": 2})
    shutil.copytree(tiny_prior, tmp_path / "prior")
    (tmp_path / "map.txt").write_text("a 0\n")
    cfg = validate(build_config({"data": {"path": "data", "class_map": "map.txt"}, "out": "out/run1",
                                 "model": {"model": "prior", "vae": "./vae-not-there"}}))
    assert cfg.data.path == str(tmp_path / "data") and cfg.out == str(tmp_path / "out" / "run1")
    assert cfg.data.class_map == str(tmp_path / "map.txt")
    assert cfg.model.model == str(tmp_path / "prior") and cfg.model.vae == str(tmp_path / "vae-not-there")
    named = validate(build_config({"data": {"path": "mnist10k", "classes": "imagenette"}, "out": "o",
                                   "model": {"model": "builtin:mnist10k", "vae": "stabilityai/sd-vae-ft-mse"}}))
    assert named.data.path == "mnist10k" and named.data.classes == "imagenette"
    assert named.model.model == "builtin:mnist10k" and named.model.vae == "stabilityai/sd-vae-ft-mse"
    remote = validate(build_config({"data": {"path": "s3://bucket/train"}, "out": "o"}))
    assert remote.data.path == "s3://bucket/train"


@pytest.mark.slow
def test_cli_from_another_directory_with_relative_paths(tmp_path, tiny_prior):
    """The reported crash: `distill --data digits/test` with a relative path failed in the encode stage."""
    work = tmp_path / "elsewhere"
    write_image_folder(work / "digits", {"a": 3, "b": 3})
    shutil.copytree(tiny_prior, work / "models" / "prior")
    (work / "cfg.yaml").write_text("sampler:\n  num_steps: 3\n  t_stop: 1\ntangent:\n  neighbours: 3\n  dim: 1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-m", "pipeline", "distill", "--data", "digits", "--out", "out/run",
                        "--config", "cfg.yaml", "--model", "models/prior", "--vae", "", "--ipc", "2"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = json.loads((work / "out" / "run" / "run.json").read_text())
    assert run["config"]["data"]["path"] == str(work / "digits")
    assert run["config"]["model"]["model"] == str(work / "models" / "prior")
    assert len(list((work / "out" / "run" / "train").rglob("*.png"))) == 4
