"""Parquet input: one file, a folder or a glob of files, rows in any class order; one latent file per class."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.inputs.sources import list_source


def _png(seed: int, channel: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((20, 20, 3), np.float32)
    img[..., channel] = 180
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shuffled_parquet(folder, per_class: int = 6, classes=(0, 1, 2), files: int = 2):
    """Rows of all classes interleaved at random, cut into ``files`` parquet files."""
    rows = [(_png(10 * c + i, c), c) for c in classes for i in range(per_class)]
    order = np.random.default_rng(0).permutation(len(rows))
    folder.mkdir(parents=True, exist_ok=True)
    for part, idx in enumerate(np.array_split(order, files)):
        pq.write_table(pa.table({"image": [rows[i][0] for i in idx], "label": [rows[i][1] for i in idx]}),
                       folder / f"part-{part}.parquet", row_group_size=2)
    return folder


def test_a_folder_a_glob_and_a_file_are_listed(tmp_path):
    folder = write_shuffled_parquet(tmp_path / "pq")
    by_folder = list_source(DataConfig(path=str(folder)))
    by_glob = list_source(DataConfig(path=str(folder / "*.parquet")))
    one = list_source(DataConfig(path=str(folder / "part-0.parquet")))
    assert by_folder.kind == by_glob.kind == one.kind == "parquet"
    assert by_folder.num_items == by_glob.num_items == 18 and one.num_items == 9
    assert len(by_folder.parquet_paths) == 2 and by_folder.classes == ["0", "1", "2"]


def test_class_shuffled_parquet_writes_one_latent_file_per_class(tmp_path, tiny_prior, ray_session):
    folder = write_shuffled_parquet(tmp_path / "pq")
    out = tmp_path / "out"
    args = ["distill", "--data", str(folder), "--out", str(out), "--ipc", "1", "--model", str(tiny_prior),
            "--vae", "", "--set", "sampler.num_steps=3", "--set", "sampler.t_stop=1",
            "--set", "tangent.neighbours=3", "--set", "tangent.dim=1", "--set", "runtime.encode_batch_size=2"]
    assert main(args) == 0
    latents = out / "_work" / "latents"
    per_class = {d.name: len(list(d.glob("*.parquet"))) for d in latents.iterdir() if d.name.startswith("class_name=")}
    assert per_class == {"class_name=0": 1, "class_name=1": 1, "class_name=2": 1}
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["encoded"] == 18 and run["counts"]["images"] == 3
