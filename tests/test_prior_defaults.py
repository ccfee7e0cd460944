"""A built-in prior's tuned defaults (pipeline/distill/run.py): the guidance mode chosen on val per IPC is the
default when no layer names one, and everything the user gives still wins."""
import pytest
import yaml

from pipeline.distill import run as run_module
from pipeline.distill.run import default_guidance, resolve_distill_config

TUNED = {"default_guidance": {1: "mode", 10: "manifold"},
         "mode": {"sampler": {"guidance_scale": 0.25, "t_stop": 5}, "cluster": {"method": "kmeans"}},
         "manifold": {"sampler": {"guidance_scale": 0.35}, "tangent": {"dim": 7}}}


@pytest.fixture()
def tuned_file(monkeypatch):
    real = run_module.load_yaml

    def fake(path):
        return TUNED if str(path).endswith("distill_defaults.yaml") else real(path)

    monkeypatch.setattr(run_module, "load_yaml", fake)


def test_the_nearest_tuned_ipc_names_the_default_guidance(tuned_file):
    assert [default_guidance("mnist10k", ipc) for ipc in (1, 3, 5, 6, 10, 50)] == \
        ["mode", "mode", "mode", "manifold", "manifold", "manifold"]  # 5.5 is the midpoint; a tie takes IPC 1


def test_the_default_guidance_brings_its_own_tuned_section(tuned_file):
    one = resolve_distill_config(data="mnist10k", ipc=1)
    assert one.sampler.guidance == "mode" and one.cluster.method == "kmeans"
    assert one.sampler.guidance_scale == 0.25 and one.sampler.t_stop == 5
    ten = resolve_distill_config(data="mnist10k", ipc=10)
    assert ten.sampler.guidance == "manifold" and ten.tangent.dim == 7 and ten.cluster.method == "divisive"


def test_anything_the_user_names_wins(tuned_file, tmp_path):
    flag = resolve_distill_config(data="mnist10k", ipc=1, guidance="manifold")
    assert flag.sampler.guidance == "manifold" and flag.sampler.guidance_scale == 0.35
    assert resolve_distill_config(data="mnist10k", ipc=1, cluster="divisive").cluster.method == "divisive"
    assert resolve_distill_config(data="mnist10k", ipc=1, overrides=["sampler.guidance=none"]).sampler.guidance == "none"
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"sampler": {"guidance": "manifold"}}))
    assert resolve_distill_config(data="mnist10k", ipc=1, config_file=str(preset)).sampler.guidance == "manifold"
    # another model: the published defaults, whatever the built-in prior's file says
    other = resolve_distill_config(data="mnist10k", ipc=1, model=str(tmp_path / "elsewhere"))
    assert other.sampler.guidance == "manifold" and other.sampler.guidance_scale == 0.1


def test_without_a_default_guidance_entry_the_published_mode_stays(monkeypatch):
    monkeypatch.setattr(run_module, "load_yaml", lambda path: {"mode": {"sampler": {"t_stop": 3}}})
    assert default_guidance("mnist10k", 10) is None
    assert resolve_distill_config(data="mnist10k", ipc=10).sampler.guidance == "manifold"
