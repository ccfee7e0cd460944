"""Every YAML under cluster_configs/ parses; every preset (and the local config) loads and validates
through the project's own config loader."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import build_config, load_yaml, validate

ROOT = Path(__file__).resolve().parents[1] / "cluster_configs"
ALL = sorted(ROOT.rglob("*.yaml"))
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def test_the_expected_files_exist():
    names = {p.name for p in ALL}
    for required in ("local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "aws-cluster.yaml"):
        assert required in names
    for ds in ("imagenette", "imagewoof", "imagenet100", "imagenet1k"):
        for ipc in (10, 50):
            assert f"{ds}_ipc{ipc}.yaml" in {p.name for p in PRESETS}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", PRESETS + [ROOT / "local.yaml"], ids=lambda p: p.name)
def test_preset_loads_through_config_loader(path):
    cfg = validate(build_config(load_yaml(path)))
    if path.parent.name == "presets":
        assert cfg.ipc == int(path.stem.rsplit("ipc", 1)[1])
        assert cfg.sampler.guidance == "manifold" and cfg.model.model == "facebook/DiT-XL-2-256"


def test_rayjob_retries_resume_on_shared_volume():
    job = yaml.safe_load((ROOT / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    assert "/shared/" in spec["entrypoint"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
