"""End to end through Ray with a real read stage: layout, manifest, hashes, resume and idempotence."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_image_folder
from PIL import Image

from pipeline.cli import main


def _args(data, out, prior, *extra):
    return ["distill", "--data", str(data), "--out", str(out), "--ipc", "3", "--model", str(prior),
            "--vae", "", "--set", "sampler.num_steps=4", "--set", "sampler.t_stop=1",
            "--set", "tangent.neighbours=4", "--set", "tangent.dim=2", *extra]


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "train").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_prior, ray_session):
    root = tmp_path_factory.mktemp("data")
    data = write_image_folder(root, {"cat": 6, "dog": 5, "eel": 4})
    (data / "train" / "dog" / "notes.txt").write_text("not an image")
    (data / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path_factory.mktemp("out") / "run"
    assert main(_args(data, out, tiny_prior)) == 0
    return data, out


def test_layout_manifest_and_hashes(distilled):
    data, out = distilled
    for cls in ("cat", "dog", "eel"):
        pngs = sorted((out / "train" / cls).glob("*.png"))
        assert [p.name for p in pngs] == [f"{cls}_{k:04d}.png" for k in range(3)]
        assert (out / "train" / cls / "_SUCCESS").exists()
        with Image.open(pngs[0]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 9
    for row in manifest:
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]
        assert row["guidance"] == "manifold"
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["found"] == run["counts"]["encoded"] + run["counts"]["quarantined"] == 17
    assert run["config_hash"] == manifest[0]["config_hash"]
    # The health check: every image scored and recorded; run.json counts what the manifest holds.
    threshold = run["config"]["health"]["threshold"]
    for row in manifest:
        assert row["flagged"] == (row["health_score"] > threshold) and 0 <= row["attempt"] < 3
    assert run["health"]["checked"] == 9
    assert run["health"]["flagged"] == sum(r["flagged"] for r in manifest)
    assert run["health"]["regenerated"] == sum(r["attempt"] > 0 for r in manifest)
    assert sorted(run["health"]["flagged_images"]) == sorted(r["path"] for r in manifest if r["flagged"])
    quarantine = {r["path"]: r["reason"] for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert set(quarantine) == {"dog/notes.txt", "dog/broken.png"}
    assert "extension" in quarantine["dog/notes.txt"] and "decode" in quarantine["dog/broken.png"]


def test_rerun_changes_nothing_and_regenerates_deleted_class(distilled, tiny_prior):
    data, out = distilled
    before = _snapshot(out)
    manifest_before = (out / "manifest.parquet").read_bytes()
    assert main(_args(data, out, tiny_prior)) == 0
    assert _snapshot(out) == before
    assert pq.read_table(out / "manifest.parquet").equals(pq.read_table(__import__("io").BytesIO(manifest_before)))
    shutil.rmtree(out / "train" / "dog")
    (out / "train" / "cat" / "_SUCCESS").unlink()  # an interrupted class
    assert main(_args(data, out, tiny_prior)) == 0
    assert _snapshot(out) == before


def test_different_config_refuses_the_folder(distilled, tiny_prior, capsys):
    data, out = distilled
    assert main(_args(data, out, tiny_prior, "--seed", "7")) == 2
    assert "different config" in capsys.readouterr().err


def test_a_folder_made_on_another_device_kind_is_not_resumed(distilled, tiny_prior, tmp_path, capsys):
    """The device kind is not hashed but changes bytes: a resume on the other kind is refused, by name."""
    data, out = distilled
    assert json.loads((out / "_work" / "device.json").read_text()) == {"device": "cpu"}
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    (moved / "_work" / "device.json").write_text(json.dumps({"device": "cuda"}))
    shutil.rmtree(moved / "train" / "eel")  # an unfinished class this run would otherwise sample on CPU
    assert main(_args(data, moved, tiny_prior)) == 2
    err = capsys.readouterr().err
    assert "made on cuda and this run would use cpu" in err and "runtime.device=cuda" in err
    assert not (moved / "train" / "eel").exists()
    # --overwrite starts the folder again on this device: the CPU bytes, whole
    assert main(_args(data, moved, tiny_prior, "--overwrite")) == 0
    assert _snapshot(moved) == _snapshot(out)
    assert json.loads((moved / "_work" / "device.json").read_text()) == {"device": "cpu"}


def test_guidance_changes_images_but_not_the_noise(distilled, tiny_prior, tmp_path):
    data, out = distilled
    other = tmp_path / "none"
    assert main(_args(data, other, tiny_prior, "--guidance", "none")) == 0
    a = np.asarray(Image.open(out / "train" / "cat" / "cat_0000.png"), dtype=np.int16)
    b = np.asarray(Image.open(other / "train" / "cat" / "cat_0000.png"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() > 0


@pytest.mark.smoke
def test_a_clean_run_prints_no_warning_or_error_line(tiny_prior, tmp_path, ray_session, capfd):
    """Nothing a user would read as a failure: no Ray error-level line (the encode actors' constructor
    arguments with restarts on) and no deprecation notice from how the stages call Ray. (Ray Data's own
    INFO / WARNING lines show here because the tests' Ray session is not the CLI's quiet one.)"""
    import warnings

    data = write_image_folder(tmp_path / "data", {"a": 3, "b": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(_args(data, tmp_path / "out", tiny_prior, "--set", "tangent.neighbours=2",
                          "--set", "tangent.dim=1")) == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "has constructor arguments in the object store" not in text
    assert not [line for line in text.splitlines() if " E " in line[:40] or "Deprecat" in line], text[-3000:]
    # Warnings raised at the project's own calls (Ray attributes its deprecation notices to the caller);
    # Ray's internal DeprecationWarnings are hidden outside __main__ and never reach a user.
    ours = [w for w in caught if "/pipeline/" in str(w.filename)]
    assert not ours, [f"{w.filename}: {w.message}" for w in ours]
