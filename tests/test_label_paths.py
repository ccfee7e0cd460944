"""Labels are untrusted: a parquet whose labels try to walk out of --out, a 300-character label and null
labels, through `distill --dry-run` and a real `distill --ipc 1`; label ids the model does not know are
caught by the dry run, before any model is loaded."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_prior, write_image_folder
from PIL import Image

from pipeline.cli import main
from pipeline.common.names import folder_name

EVIL = ["../escape", "..", "a/b", "/abs", "ok"]
LONG = "\u00e9tiquette-" + "x" * 290  # 300 characters, 301 bytes
TINY = ["--vae", "", "--set", "sampler.num_steps=3", "--set", "sampler.t_stop=1", "--set", "tangent.neighbours=3",
        "--set", "tangent.dim=1", "--set", "runtime.encode_batch_size=2"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, labels) -> None:
    pq.write_table(pa.table({"image": [_png(i) for i in range(len(labels))], "label": labels}), path)


def _files(root) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs} | \
           {os.path.join(d, x) for d, xs, _ in os.walk(root) for x in xs}


@pytest.fixture(scope="module")
def prior8(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("prior8"), num_classes=8)


@pytest.fixture
def evil_parquet(tmp_path):
    # the 20 images of the five labels (4 each, interleaved), then 4 of a 300-character label and 2 nulls
    labels = EVIL * 4 + [LONG] * 4 + [None, None]
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "evil.parquet", labels)
    return tmp_path / "in" / "evil.parquet"


def test_dry_run_lists_the_mapped_folders_and_the_null_rows_and_writes_nothing(tmp_path, evil_parquet, prior8,
                                                                                capsys):
    out = tmp_path / "deep" / "out"
    before = _files(tmp_path)
    assert main(["distill", "--data", str(evil_parquet), "--out", str(out), "--ipc", "1",
                 "--model", str(prior8), *TINY, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "classes: 6; images: 24; rejected at listing: 2" in text
    assert f"would quarantine {evil_parquet}#row 24: null label" in text
    assert f"would quarantine {evil_parquet}#row 25: null label" in text
    for label in EVIL[:4]:
        assert f"class {label!r}: folder {folder_name(label)} " in text
    assert f"class {LONG[:40]!r}... (300 characters): folder {folder_name(LONG)} " in text
    assert "class 'ok'" not in text  # a safe label keeps its name
    assert "model: 8 classes; label ids 0..5" in text
    assert _files(tmp_path) == before


def test_a_real_run_writes_every_class_inside_out_and_records_the_labels(tmp_path, evil_parquet, prior8,
                                                                          ray_session):
    out = tmp_path / "deep" / "out"
    out.parent.mkdir()
    before = _files(tmp_path)
    assert main(["distill", "--data", str(evil_parquet), "--out", str(out), "--ipc", "1",
                 "--model", str(prior8), *TINY]) == 0
    new = _files(tmp_path) - before
    inside = str(out.resolve()) + os.sep
    assert new and all(p == str(out) or os.path.realpath(p).startswith(inside) for p in new)
    assert not (tmp_path / "deep" / "escape_0000.png").exists() and not (out / ".._0000.png").exists()

    folders = {folder_name(label): label for label in (*EVIL, LONG)}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(folders)
    for folder in folders:
        assert sorted(p.name for p in (out / "train" / folder).iterdir()) == sorted(["_SUCCESS", f"{folder}_0000.png"])
    long_folder = folder_name(LONG)
    assert "~" in long_folder and len(f"{long_folder}_0000.png".encode()) <= 255

    classes = json.loads((out / "classes.json").read_text())
    assert {c["class"]: c["source_label"] for c in classes} == folders
    assert sorted(c["label"] for c in classes) == list(range(6))
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["class"]: r["source_label"] for r in manifest} == folders
    assert all((out / r["path"]).is_file() and (out / r["path"]).resolve().is_relative_to(out.resolve())
               for r in manifest)
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert quarantine == [{"path": f"{evil_parquet}#row {i}", "reason": "null label"} for i in (24, 25)]
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts["found"] == 26 and counts["encoded"] == 24 and counts["quarantined"] == 2
    assert counts["classes"] == 6 and counts["images"] == 6


def test_labels_differing_only_in_case_stop_the_dry_run_naming_both(tmp_path, prior8, capsys):
    _write(tmp_path / "case.parquet", ["Cat", "dog", "cat", "dog"])
    assert main(["distill", "--data", str(tmp_path / "case.parquet"), "--out", str(tmp_path / "out"),
                 "--model", str(prior8), *TINY, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'Cat'" in err and "'cat'" in err and "data.path" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 9, 9], "label ids up to 9 (class '9') but the model knows 8 classes"),
    ([0, -1, 2, 2], "class '-1' has the label id -1"),
])
def test_the_dry_run_stops_on_label_ids_the_model_does_not_know_without_loading_it(tmp_path, prior8, capsys,
                                                                                    monkeypatch, labels, message):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    def no_weights(*args, **kwargs):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", no_weights)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", no_weights)
    _write(tmp_path / "ids.parquet", labels)
    assert main(["distill", "--data", str(tmp_path / "ids.parquet"), "--out", str(tmp_path / "out"),
                 "--model", str(prior8), *TINY, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "data.class_map" in err
    assert not (tmp_path / "out").exists()


def test_the_dry_run_stops_on_an_output_folder_the_real_run_would_refuse(tmp_path, prior8, capsys):
    _write(tmp_path / "ok.parquet", [0, 1, 1, 0])
    common = ["distill", "--data", str(tmp_path / "ok.parquet"), "--model", str(prior8), *TINY, "--dry-run"]
    (tmp_path / "file").write_text("x")
    assert main([*common, "--out", str(tmp_path / "file" / "out")]) == 2
    assert "manifoldgd: error: out: " in capsys.readouterr().err
    (tmp_path / "made" / "_work").mkdir(parents=True)
    (tmp_path / "made" / "_work" / "config.json").write_text('{"config_hash": "another"}')
    assert main([*common, "--out", str(tmp_path / "made")]) == 2
    assert "was made by a different config" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "made"), "--overwrite"]) == 0
    assert (tmp_path / "made" / "_work" / "config.json").read_text() == '{"config_hash": "another"}'


def test_the_encode_stage_keys_rows_by_the_listing_folder_names(tmp_path):
    from pipeline.distill.encode import _label_from_parquet, _label_from_path

    rows = _label_from_path({"path": np.asarray([f"{tmp_path}/chat noir/x.png", f"{tmp_path}/_a/y.png"]),
                             "bytes": np.asarray([b"1", b"2"], dtype=object)},
                            base=str(tmp_path), labels={"chat%20noir": 3, "%5Fa": 1})
    assert list(rows["class_name"]) == ["chat%20noir", "%5Fa"] and list(rows["label"]) == [3, 1]
    batch = pa.table({"image": [b"1", b"2", b"3"], "label": pa.array([7, None, 2], pa.int64())})
    rows = _label_from_parquet(batch, labels={"7": 7, "2": 2}, name="d.parquet")
    assert list(rows["class_name"]) == ["7", "2"] and list(rows["label"]) == [7, 2]
    assert list(rows["bytes"]) == [b"1", b"3"] and len(rows["id"]) == 2


def test_train_prior_class_names_are_the_original_labels_so_its_class_map_matches_them(tmp_path):
    from pipeline.inputs.sources import label_ids
    from pipeline.prior.train import load_training_images

    root = write_image_folder(tmp_path / "d", {"chat noir": 2, "dog": 1})
    pixels, labels, class_names = load_training_images(str(root), 16)
    assert class_names == ["chat noir", "dog"] and list(labels) == [0, 0, 1] and len(pixels) == 3
    (tmp_path / "class_map.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(class_names)))
    assert label_ids(["chat noir", "dog"], str(tmp_path / "class_map.txt")) == {"chat noir": 0, "dog": 1}
