"""bench/gpu.py stays runnable: its --smoke path (tiny sizes, CPU, numpy on both sides) runs every section
and its own checks hold, so the GPU run that only a lent machine can do does not rot between lends."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]



def _load():
    return load_script(ROOT / "bench" / "gpu.py", "gpu_bench")


def test_smoke_path_runs_every_section(capsys):
    results = _load().main(["--smoke"])
    out = capsys.readouterr().out
    for header in ("1. VAE encode", "2. DiT sampling", "3. divisive clustering", "4. tangent bases"):
        assert header in out

    assert [r["batch"] for r in results["vae"]] == [2, 4]
    assert all(r["images_per_s"] > 0 and r["finite"] and r["latent_dim"] == 4 * 8 * 8 for r in results["vae"])

    assert {r["guidance"] for r in results["dit"]} == {"none", "mode", "manifold"}
    assert all(r["images_per_s"] > 0 for r in results["dit"])

    # the same numpy code on both sides: the partitions must be the same, and hold the leaves asked for
    cluster = results["cluster"]
    assert len(cluster) == 3
    assert all(r["sse_ratio"] == 1.0 and r["sse_numpy"] > 0 for r in cluster)
    assert cluster[0]["leaves"] == 8 and cluster[2]["leaves"] == 8  # 8 leaves; IPC 4 grows 2 x 4

    for row in results["tangent"]:
        assert row["bases"] >= row["centroids"] == 4
        assert row["max_angle_deg"] < 1e-3 and row["orthonormality_error"] < 1e-5
    assert results["seconds"] < 60


def test_angle_and_sse_helpers_measure_what_they_say():
    bench = _load()
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((50, 3)))
    assert bench.max_principal_angle_deg(basis, basis @ np.linalg.qr(rng.standard_normal((3, 3)))[0]) < 1e-6
    turned = basis.copy()
    turned[:, 0] = np.linalg.qr(np.c_[basis, rng.standard_normal(50)])[0][:, 3]  # a direction outside span
    assert abs(bench.max_principal_angle_deg(basis, turned) - 90.0) < 1e-6

    X = np.r_[np.zeros((5, 2)), np.ones((5, 2))]
    assert bench.partition_sse(X, np.r_[np.zeros(5), np.ones(5)]) == 0.0
    assert bench.partition_sse(X, np.zeros(10)) == 5.0  # 10 points at distance sqrt(0.5) from the mean


def test_unknown_section_is_refused():
    import pytest

    with pytest.raises(SystemExit):
        _load().main(["--smoke", "--sections", "vae,nope"])


def test_flop_count_is_twice_dits_published_multiply_adds():
    """DiT reports 118.6 "Gflops" per DiT-XL/2 forward at 256 px; they are multiply-adds, so a counter
    of 2 FLOP per multiply-add (how GPU peaks are quoted) must give twice that. Meta tensors: no compute."""
    bench = _load()
    sampler = bench._load_bench("gpu_sampler")
    counts = bench.count_flops(sampler.XL, sampler.SD_VAE, 256)
    assert abs(counts["dit_forward"] / 2 - 118.6e9) / 118.6e9 < 0.01
    assert abs(counts["vae_encode"] - 0.27e12) / 0.27e12 < 0.05  # the figure for the SD-VAE encoder
    assert counts["vae_decode"] > counts["vae_encode"]
