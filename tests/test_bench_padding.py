"""bench/encode_padding.py runs the pipeline's own encode stage with a counting VAE actor: every file is
counted once, and the padding it reports is what fixed-size VAE calls add to the batches Ray Data made."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import write_image_folder

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench" / "encode_padding.py"


def _bench():
    spec = importlib.util.spec_from_file_location("encode_padding", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_padding_counts_add_up(tmp_path, ray_session):
    bench = _bench()
    data = write_image_folder(tmp_path / "data", {"a": 9, "b": 7, "c": 5}, size=16)
    res = bench.measure(data, "imagenet1k_ipc50", 16, tmp_path / "run", ["model.encode_batch=4"])
    sizes = res["batch_sizes"]
    assert res["files"] == res["rows_encoded"] == sum(n * k for n, k in sizes.items()) == 21
    assert res["encode_batch_size"] == 128 and res["encode_batch"] == 4  # the preset's batch, the set VAE call
    assert res["rows_padded"] == sum((-n % 4) * k for n, k in sizes.items())
    assert res["vae_calls"] == sum(-(-n // 4) * k for n, k in sizes.items())
    assert res["padded_per_encoded"] == pytest.approx(res["rows_padded"] / 21)
    assert not (tmp_path / "run" / "out" / "_work" / "latents.tmp").exists()  # the stage completed
