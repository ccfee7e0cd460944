"""Interruptions and write failures lose nothing: reruns complete byte-identical to a clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image_folder
from PIL import Image

from pipeline.cli import main


def _args(data, out, prior, steps=3):
    return ["distill", "--data", str(data), "--out", str(out), "--ipc", "2", "--model", str(prior), "--vae", "",
            "--set", f"sampler.num_steps={steps}", "--set", "sampler.t_stop=1", "--set", "tangent.neighbours=3",
            "--set", "tangent.dim=1", "--set", "sampler.max_batch=3"]  # 3 units, 2 straddling classes


def _tree(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "train").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("faults"), {c: 4 for c in "abcd"})


# The interrupted run: the distill command with a sampling actor whose second unit hangs (conftest's
# faulty_sampler); it leaves a marker when that unit starts, the event the test waits for.
HANGING_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import faulty_sampler
from pipeline.cli import build_parser
from pipeline.distill.run import distill_command, resolve_config
args = build_parser(["distill"]).parse_args(sys.argv[3:])
sys.exit(distill_command(lambda: resolve_config(args), actor_cls=faulty_sampler(sys.argv[2], hang_units=[1])))
"""


def test_sigterm_then_rerun_is_byte_identical(dataset, tiny_prior, tmp_path, ray_session):
    clean, interrupted, markers = tmp_path / "clean", tmp_path / "interrupted", tmp_path / "markers"
    assert main(_args(dataset, clean, tiny_prior)) == 0
    markers.mkdir()
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", HANGING_RUN, str(Path(__file__).parent), str(markers),
           *_args(dataset, interrupted, tiny_prior), "--set", "runtime.sample_actors=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Units (IPC 2, max_batch 3): a0 a1 b0 | b1 c0 c1 | d0 d1, on one actor in order. When the second one
    # starts (and hangs), the first has been taken in: class a is finalized, b to d are not.
    while proc.poll() is None and not list(markers.glob("hang-u000001-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-2000:]
    assert "rerun the same command" in output
    assert sorted(p.parent.name for p in (interrupted / "train").glob("*/_SUCCESS")) == ["a"]
    leftovers = [p for p in (interrupted / "train").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    for png in (interrupted / "train").rglob("*.png"):
        with Image.open(png) as im:
            im.load()  # every PNG present is complete
    assert main(_args(dataset, interrupted, tiny_prior)) == 0
    assert _tree(interrupted) == _tree(clean)


def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_fails_clearly_and_a_rerun_completes(dataset, tiny_prior, tmp_path, ray_session, capsys):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, 1024):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        clean = tmp_path / "clean"
        assert main(_args(dataset, clean, tiny_prior)) == 0
        ballast = mnt / "ballast"
        st = os.statvfs(mnt)
        ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 48 * 1024))  # leave 48 KB
        out = mnt / "out"
        assert main(_args(dataset, out, tiny_prior)) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and "rerun the same command" in err
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        for png in out.rglob("*.png"):
            with Image.open(png) as im:
                im.load()
        ballast.unlink()
        assert main(_args(dataset, out, tiny_prior)) == 0
        assert _tree(out) == _tree(clean)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
