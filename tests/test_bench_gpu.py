"""bench/gpu.py stays runnable: its --smoke path (tiny sizes, CPU, numpy on both sides) runs every section in
a Python without Ray or scikit-learn (as on the GPU machine), a failing section does not stop the run, and
the target lines judge what they say, so the GPU run that only a lent machine can do does not rot between
lends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]



def _load():
    return load_script(ROOT / "bench" / "gpu.py", "gpu_bench")


def site_packages_without(tmp_path: Path, blocked=("ray", "sklearn", "scikit_learn")) -> Path:
    """A view of this environment's site-packages (symlinks) without Ray and scikit-learn: run with
    ``python -S`` and this folder on PYTHONPATH, they are as absent as on the GPU machine (not importable,
    no metadata, ``importlib.util.find_spec`` says None)."""
    import site

    view = tmp_path / "site-packages"
    view.mkdir()
    for folder in site.getsitepackages():
        for entry in Path(folder).iterdir():
            stem = entry.name.split("-")[0].split(".")[0].lower()
            if stem in blocked or entry.suffix == ".pth" or (view / entry.name).exists():
                continue
            (view / entry.name).symlink_to(entry)
    return view


def run_without_ray_and_sklearn(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    view = site_packages_without(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(view)
    probe = "import importlib.util as u; assert u.find_spec('ray') is None and u.find_spec('sklearn') is None"
    subprocess.run([sys.executable, "-S", "-c", probe], env=env, check=True, timeout=60)
    return subprocess.run([sys.executable, "-S", str(ROOT / "bench" / "gpu.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)


def test_smoke_runs_every_section_without_ray_or_sklearn(tmp_path):
    """The whole script, in a Python where Ray and scikit-learn cannot be imported, through the same code
    as the GPU run (warm-ups included: a 2-step warm-up has no guided step) at tiny sizes on the CPU."""
    proc = run_without_ray_and_sklearn(tmp_path, "--smoke", "--out", str(tmp_path / "out"))
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ray absent" in out and "scikit-learn absent" in out  # the environment line says what the run saw
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert results["errors"] == {}
    for header in ("--- stage 2", "--- VAE encode", "--- DiT sampling", "--- guidance overhead",
                   "--- divisive clustering", "--- tangent bases", "--- targets"):
        assert header in out

    st = results["stage2"]
    assert st["backend"] == "numpy" and st["route"] == "gram" and st["seconds"] > 0 and st["bases"] >= st["ipc"]

    assert [r["batch"] for r in results["vae"]] == [2, 4]
    assert all(r["images_per_s"] > 0 and r["finite"] and r["latent_dim"] == 4 * 8 * 8 for r in results["vae"])

    assert {r["guidance"] for r in results["dit"]} == {"none", "mode", "manifold"}
    assert all(r["images_per_s"] > 0 for r in results["dit"])
    assert set(results["ratio"]["ratio"]) == {"mode", "manifold"} and all(
        v > 0 for v in results["ratio"]["ratio"].values())

    # the same numpy code on both sides: the partitions must be the same, and hold the leaves asked for
    cluster = results["cluster"]
    assert len(cluster) == 3
    assert all(r["sse_ratio"] == 1.0 and r["sse_numpy"] > 0 for r in cluster)
    assert cluster[0]["leaves"] == 8 and cluster[2]["leaves"] == 8  # 8 leaves; IPC 4 grows 2 x 4

    for row in results["tangent"]:
        assert row["bases"] >= row["centroids"] == 4
        assert row["max_angle_deg"] < 1e-3 and row["orthonormality_error"] < 1e-5

    # one line per target, each with its figure, none judged on the CPU
    targets = [line for line in out.splitlines() if line.startswith("TARGET ")]
    assert targets == results["targets"] and len(targets) == 6
    assert all(line.endswith("-> n/a (cpu)") and "no figure" not in line for line in targets)
    for key in ("dit manifold batch", "dit manifold best batch", "time mode/none", "time manifold/none",
                "stage 2 of a 120 x 64 class at IPC 4 (numpy, gram)", "vae encode"):
        assert sum(key in line for line in targets) == 1, key


def test_a_failing_section_prints_its_traceback_and_the_run_goes_on(capsys, monkeypatch):
    bench = _load()

    def broken(ctx):
        raise SystemExit("no CUDA device")  # what a section's own check might do: must not end the run

    monkeypatch.setitem(bench.SECTION_FUNCS, "stage2", broken)
    results = bench.main(["--smoke", "--sections", "stage2,cluster"])
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "no CUDA device" in captured.err
    assert results["errors"] == {"stage2": "SystemExit: no CUDA device"}
    assert len(results["cluster"]) == 3  # the next section ran
    stage2_line = next(line for line in results["targets"] if "stage 2" in line)
    assert stage2_line.endswith("FAIL (section failed)")
    assert any(line.endswith("SKIPPED (section not run)") for line in results["targets"])


def test_targets_pass_and_fail_on_the_figures():
    bench = _load()
    dit = [{"guidance": "manifold", "batch": b, "images_per_s": ips, "peak_gib": 30.0}
           for b, ips in ((32, 20.0), (64, 25.0), (128, 27.5))]
    results = {"errors": {}, "dit": dit,
               "ratio": {"batch": 64, "ratio": {"mode": 1.01, "manifold": 1.06}, "peak_gib": 31.0},
               "stage2": {"seconds": 0.8, "backend": "cupy", "route": "gram", "ipc": 50, "n": 1300, "d": 4096,
                          "peak_gib": 0.4},
               "vae": [{"batch": 128, "images_per_s": 1500.0, "peak_gib": 12.0}]}
    lines = bench.target_lines(results, smoke=False)
    verdicts = [line.rsplit("-> ", 1)[1] for line in lines]
    assert verdicts == ["FAIL", "PASS", "PASS", "FAIL", "PASS", "PASS"], lines
    assert "25.000 images/s" in lines[0] and "best batch (128)" in lines[1] and "peak GPU 30.0 GiB" in lines[0]
    results["stage2"]["backend"] = "numpy"  # a fallback to the CPU is not a GPU figure
    assert bench.target_lines(results, smoke=False)[4].endswith("FAIL (ran on numpy, not the GPU)")


def test_a_two_step_warm_up_builds_bases_for_no_guided_step():
    """2 steps with t_stop 1 guide no step: the bases are (n, 0, D, d), which the sampler takes."""
    sampler = _load()._load_bench("gpu_sampler")
    centroids, bases = sampler.guidance_inputs(3, 256, 0, 3, "cpu")
    assert tuple(centroids.shape) == (3, 256) and tuple(bases.shape) == (3, 0, 256, 3)
    prior = sampler.build_prior(sampler.TINY, sampler.TINY_VAE, "cpu")
    assert sampler.sample_once(prior, "manifold", 2, 2, "cpu") > 0


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
