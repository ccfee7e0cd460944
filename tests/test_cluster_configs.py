"""Every YAML under cluster_configs/ parses; every packaged preset (and the local config) loads and validates
through the project's own config loader, by path and by bare name."""
from pathlib import Path

import pytest
import yaml

from pipeline.config import build_config, load_yaml, validate

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "cluster_configs"
ALL = sorted(ROOT.rglob("*.yaml"))
PRESETS = sorted((REPO / "pipeline" / "presets").glob("*.yaml"))


def test_the_expected_files_exist():
    names = {p.name for p in ALL}
    for required in ("local.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "aws-cluster.yaml"):
        assert required in names
    for ds in ("imagenette", "imagewoof", "imagenet100", "imagenet1k"):
        for ipc in (10, 50):
            assert f"{ds}_ipc{ipc}.yaml" in {p.name for p in PRESETS}


@pytest.mark.parametrize("path", ALL + PRESETS, ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", PRESETS + [ROOT / "local.yaml"], ids=lambda p: p.name)
def test_preset_loads_through_config_loader(path):
    cfg = validate(build_config(load_yaml(path)))
    if path.parent.name == "presets":
        assert cfg.ipc == int(path.stem.rsplit("ipc", 1)[1])
        assert cfg.sampler.guidance == "manifold" and cfg.model.model == "facebook/DiT-XL-2-256"


def test_a_bare_preset_name_loads_the_packaged_preset(tmp_path, monkeypatch):
    from pipeline.config import ConfigError, preset_names

    assert preset_names() == sorted(p.stem for p in PRESETS)
    monkeypatch.chdir(tmp_path)  # not the repo: the name must resolve through the package
    assert load_yaml("imagenet1k_ipc50") == load_yaml(PRESETS[[p.stem for p in PRESETS].index("imagenet1k_ipc50")])
    assert load_yaml("imagenette_ipc10.yaml")["ipc"] == 10
    (tmp_path / "imagenette_ipc10").write_text("ipc: 7\n")  # a file of that name in the working directory wins
    assert load_yaml("imagenette_ipc10")["ipc"] == 7
    with pytest.raises(ConfigError, match="nor a packaged preset: .*imagenet1k_ipc50"):
        load_yaml("imagenet1k_ipc5")
    with pytest.raises(ConfigError, match="cannot read sub/imagenet1k_ipc50.yaml: No such file"):
        load_yaml("sub/imagenet1k_ipc50.yaml")


def test_rayjob_retries_resume_on_shared_volume():
    job = yaml.safe_load((ROOT / "kuberay-rayjob.yaml").read_text())
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0
    assert "/shared/" in spec["entrypoint"]
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
