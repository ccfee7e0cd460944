"""A built-in prior's tuned defaults (pipeline/distill/run.py): each tuned IPC has its own section; the nearest
one answers, its guidance mode is the default when no layer names one, and everything the user gives wins."""
import pytest
import yaml

from pipeline.distill import run as run_module
from pipeline.distill.run import default_guidance, prior_defaults, resolve_distill_config

TUNED = {"ipc1": {"guidance": "mode",
                  "mode": {"sampler": {"guidance_scale": 0.25, "t_stop": 5}, "cluster": {"method": "kmeans"}},
                  "manifold": {"sampler": {"guidance_scale": 0.45}}},
         "ipc10": {"guidance": "manifold",
                   "mode": {"sampler": {"guidance_scale": 0.15}},
                   "manifold": {"sampler": {"guidance_scale": 0.35}, "tangent": {"dim": 7}}}}


def fake_file(monkeypatch, content):
    real = run_module.load_yaml
    monkeypatch.setattr(run_module, "load_yaml",
                        lambda path: content if str(path).endswith("distill_defaults.yaml") else real(path))


@pytest.fixture()
def tuned_file(monkeypatch):
    fake_file(monkeypatch, TUNED)


def test_the_nearest_tuned_ipc_answers(tuned_file):
    assert [default_guidance("mnist10k", ipc) for ipc in (1, 3, 5, 6, 10, 50)] == \
        ["mode", "mode", "mode", "manifold", "manifold", "manifold"]  # 5.5 is the midpoint; a tie takes IPC 1
    assert [prior_defaults("mnist10k", "manifold", ipc)["sampler"]["guidance_scale"] for ipc in (1, 5, 6, 50)] == \
        [0.45, 0.45, 0.35, 0.35]
    assert prior_defaults("mnist10k", "public", 10) == {}


def test_the_default_guidance_brings_its_own_tuned_section(tuned_file):
    one = resolve_distill_config(data="mnist10k", ipc=1)
    assert one.sampler.guidance == "mode" and one.cluster.method == "kmeans"
    assert one.sampler.guidance_scale == 0.25 and one.sampler.t_stop == 5
    ten = resolve_distill_config(data="mnist10k", ipc=10)
    assert ten.sampler.guidance == "manifold" and ten.tangent.dim == 7 and ten.cluster.method == "divisive"
    # a mode named by the user gets that mode's section at the run's IPC, not the other IPC's
    assert resolve_distill_config(data="mnist10k", ipc=10, guidance="mode").sampler.guidance_scale == 0.15


def test_anything_the_user_names_wins(tuned_file, tmp_path):
    flag = resolve_distill_config(data="mnist10k", ipc=1, guidance="manifold")
    assert flag.sampler.guidance == "manifold" and flag.sampler.guidance_scale == 0.45
    assert resolve_distill_config(data="mnist10k", ipc=1, cluster="divisive").cluster.method == "divisive"
    assert resolve_distill_config(data="mnist10k", ipc=1, overrides=["sampler.guidance=none"]).sampler.guidance == "none"
    assert resolve_distill_config(data="mnist10k", ipc=1, overrides=["sampler.t_stop=7"]).sampler.t_stop == 7
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"sampler": {"guidance": "manifold"}}))
    assert resolve_distill_config(data="mnist10k", ipc=1, config_file=str(preset)).sampler.guidance == "manifold"
    # another model: the published defaults, whatever the built-in prior's file says
    other = resolve_distill_config(data="mnist10k", ipc=1, model=str(tmp_path / "elsewhere"))
    assert other.sampler.guidance == "manifold" and other.sampler.guidance_scale == 0.1


@pytest.mark.parametrize("content", [{}, {"mode": {"sampler": {"t_stop": 3}}}, {"ipc10": None}])
def test_without_tuned_sections_the_published_defaults_stay(monkeypatch, content):
    fake_file(monkeypatch, content)
    assert default_guidance("mnist10k", 10) is None and prior_defaults("mnist10k", "mode", 10) == {}
    cfg = resolve_distill_config(data="mnist10k", ipc=10)
    assert cfg.sampler.guidance == "manifold" and cfg.sampler.t_stop == 25 and cfg.model.model == "builtin:mnist10k"
