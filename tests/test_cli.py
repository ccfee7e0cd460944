"""The command line: help, version, print-config, dry-run, and bad configuration rejected up front."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import write_image_folder

from pipeline.cli import main
from pipeline.config import DistillConfig, build_config, parse_set


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "manifoldgd 0.1.0" in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("distill", "print-config", "export-dataset", "train-prior", "prior-quality", "evaluate",
                    "benchmark", "demo"):
        assert command in out


def test_python_dash_m_entrypoint():
    r = subprocess.run([sys.executable, "-m", "pipeline", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "manifoldgd" in r.stdout


def test_print_config_layers_and_hash(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"distill": {"ipc": 20, "sampler": {"guidance_scale": 0.3}}}))
    assert main(["print-config", "--config", str(preset), "--ipc", "30", "--set", "tangent.dim=5"]) == 0
    text = capsys.readouterr().out
    cfg = yaml.safe_load(text)["distill"]
    assert cfg["ipc"] == 30  # flag beats file
    assert cfg["sampler"]["guidance_scale"] == 0.3  # file beats default
    assert cfg["tangent"]["dim"] == 5
    assert cfg["model"]["model"] == "facebook/DiT-XL-2-256" and cfg["sampler"]["cfg_scale"] == 4.0
    assert "config hash:" in text


def test_hash_ignores_runtime_but_not_method_knobs():
    base = DistillConfig()
    same = build_config({"runtime": {"sample_actors": 7, "encode_batch_size": 3}, "out": "/elsewhere"})
    assert base.config_hash() == same.config_hash()
    for change in ({"seed": 1}, {"sampler": {"max_batch": 8}}, {"tangent": {"dim": 4}}, {"ipc": 11}):
        assert build_config(change).config_hash() != base.config_hash()


def test_hash_follows_the_weights_of_a_local_model_folder(tmp_path):
    """A prior retrained in place keeps its path; the hash must still change, or an old output folder
    would resume as finished with images from the old weights."""
    from conftest import save_tiny_prior

    folder = save_tiny_prior(tmp_path / "prior", seed=0)
    cfg = build_config({"model": {"model": str(folder), "vae": ""}})
    first = cfg.config_hash()
    assert cfg.hashed_dict()["model"]["fingerprint"]
    assert build_config({"model": {"model": str(folder), "vae": ""}}).config_hash() == first  # stable
    save_tiny_prior(folder, seed=1)  # retrained in place: same path, other weights
    assert build_config({"model": {"model": str(folder), "vae": ""}}).config_hash() != first
    # hub ids are pinned by `revision` instead; their hash does not look at the disk
    assert "fingerprint" not in DistillConfig().hashed_dict()["model"]


def test_builtin_prior_brings_its_tuned_settings_below_the_users(tmp_path):
    """--data mnist10k uses the shipped prior and the settings tuned for it at the run's IPC, per guidance mode
    (the other mode's section does not leak); with no guidance named it gets the val winner's mode; a config
    file, a flag or --set still wins, and another model gets the published defaults."""
    import argparse

    from pipeline.cli import build_parser
    from pipeline.distill.run import resolve_config, tuned_section

    published = DistillConfig()
    section = tuned_section("mnist10k", published.ipc)
    assert section.get("mode") and section.get("manifold"), "pipeline/priors/mnist10k/distill_defaults.yaml"

    def cfg(*argv):
        args = build_parser().parse_args(["distill", "--data", "mnist10k", "--out", str(tmp_path / "o"), *argv])
        assert isinstance(args, argparse.Namespace)
        return resolve_config(args)

    def applied(c, fields):
        return all(getattr(getattr(c, g), f) == v for g, values in fields.items() for f, v in values.items())

    plain = cfg()
    assert plain.model.model == "builtin:mnist10k" and plain.sampler.guidance == section["guidance"]
    assert applied(plain, section[section["guidance"]])
    manifold, mode = cfg("--guidance", "manifold"), cfg("--guidance", "mode")
    assert applied(manifold, section["manifold"]) and applied(mode, section["mode"])
    assert manifold.tangent.dim == section["manifold"]["tangent"]["dim"] != published.tangent.dim
    assert mode.tangent.dim == published.tangent.dim  # the manifold section does not reach mode guidance
    assert cfg("--set", "sampler.guidance_scale=0.05").sampler.guidance_scale == 0.05  # --set wins
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"tangent": {"dim": 5}}))
    assert cfg("--guidance", "manifold", "--config", str(preset)).tangent.dim == 5  # a file wins
    other = cfg("--model", str(tmp_path / "elsewhere"))
    assert other.tangent.dim == published.tangent.dim and other.sampler.guidance_scale == published.sampler.guidance_scale
    assert other.sampler.guidance == published.sampler.guidance


def test_parse_set_types():
    assert parse_set(["a.b=1", "c=x", "d=true", "e=0.5"]) == {"a": {"b": 1}, "c": "x", "d": True, "e": 0.5}


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("cli"), {"a": 2, "b": 2})


@pytest.mark.parametrize("extra, field", [
    (["--ipc", "0"], "ipc"),
    (["--set", "sampler.t_stop=51"], "sampler.t_stop"),
    (["--set", "sampler.t_stop=-1"], "sampler.t_stop"),
    (["--set", "sampler.guidance_scale=-0.1"], "sampler.guidance_scale"),
    (["--set", "sampler.cfg_scale=-1"], "sampler.cfg_scale"),
    (["--guidance", "sideways"], "sampler.guidance"),
    (["--cluster", "spectral"], "cluster.method"),
    (["--set", "tangent.dim=12"], "tangent.dim"),
    (["--set", "tangent.bogus=1"], "tangent.bogus"),
    (["--set", "ipc=many"], "ipc"),
    (["--model", "/no/such/model/folder"], "model.model"),
])
def test_bad_config_exits_2_naming_the_field(extra, field, small_folder, tmp_path, tiny_prior, capsys):
    args = ["distill", "--data", str(small_folder), "--out", str(tmp_path / "o"), "--model", str(tiny_prior),
            "--vae", "", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"manifoldgd: error: {field}:"), err
    assert not (tmp_path / "o").exists()  # rejected before any work


def test_missing_dataset_exits_2(tmp_path, capsys):
    assert main(["distill", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "data.path" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_exits_2(small_folder, tmp_path, tiny_prior, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(["distill", "--data", str(small_folder), "--out", str(ro / "x"), "--model", str(tiny_prior),
                 "--vae", ""]) == 2
    assert "out:" in capsys.readouterr().err


def test_output_on_a_file_exits_2(small_folder, tmp_path, tiny_prior, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["distill", "--data", str(small_folder), "--out", str(blocker / "x"), "--model", str(tiny_prior),
                 "--vae", ""]) == 2
    assert "manifoldgd: error: out:" in capsys.readouterr().err


def test_labels_beyond_the_model_exit_2(tmp_path, tiny_prior, capsys):
    data = write_image_folder(tmp_path / "d", {c: 1 for c in "abcde"})  # 5 classes, the prior knows 4
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "o"), "--model", str(tiny_prior),
                 "--vae", ""]) == 2
    assert "data.class_map" in capsys.readouterr().err


def test_dry_run_counts_and_lists_quarantine(small_folder, tmp_path, tiny_prior, capsys):
    (small_folder / "train" / "a" / "readme.txt").write_text("x")
    try:
        assert main(["distill", "--data", str(small_folder), "--out", str(tmp_path / "o"), "--ipc", "2",
                     "--model", str(tiny_prior), "--vae", "", "--dry-run"]) == 0
    finally:
        (small_folder / "train" / "a" / "readme.txt").unlink()
    out = capsys.readouterr().out
    assert "classes: 2; images: 4; rejected at listing: 1" in out
    assert "would quarantine a/readme.txt" in out
    assert not (tmp_path / "o").exists()


def test_wnid_folders_map_to_imagenet_ids(tmp_path):
    from pipeline.inputs.sources import label_ids

    assert label_ids(["n01440764", "n15075141"]) == {"n01440764": 0, "n15075141": 999}
    assert label_ids(["dog", "cat"]) == {"cat": 0, "dog": 1}
    cmap = tmp_path / "map.txt"
    cmap.write_text("cat 7\ndog 3\n")
    assert label_ids(["dog", "cat"], str(cmap)) == {"cat": 7, "dog": 3}
