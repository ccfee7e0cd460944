"""The same entrypoint under `ray job submit`, and on a multi-node cluster that loses a node mid-run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, head_port_flags, stop_process_group, wait_for_dashboard, write_image_folder

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]




def _distill_args(data, out, prior):
    return ["distill", "--data", str(data), "--out", str(out), "--ipc", "2", "--model", str(prior), "--vae", "",
            "--set", "sampler.num_steps=6", "--set", "sampler.t_stop=2", "--set", "tangent.neighbours=3",
            "--set", "tangent.dim=2", "--set", "runtime.progress=false",
            "--set", "sampler.max_batch=3"]  # several units, some straddling two classes


def _tree(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "train").rglob("*")) if p.is_file()}




def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def test_ray_job_submit(tmp_path, tiny_prior):
    import ray

    ray.shutdown()  # the session's private instance is not needed any more (cluster tests run last)
    data = write_image_folder(tmp_path / "data", {"a": 4, "b": 4})
    out = tmp_path / "out"
    port, dash = free_port(), free_port()
    env = _env()
    # `ray start --block` in its own process group: stopping it ends this cluster only (`ray stop` would
    # end every Ray process on the machine, other users' included).
    ports = head_port_flags()
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", *ports,
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
                             f"--temp-dir={tempfile.mkdtemp(prefix='rayjob', dir='/tmp')}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_dashboard(dash, head)
        for _ in range(20):  # the job agent comes up some seconds after the dashboard
            job = subprocess.run(
                [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
                 "--", str(BIN / "manifoldgd"), *_distill_args(data, out, tiny_prior)],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
    finally:
        stop_process_group(head)
    assert sorted(p.name for p in (out / "train" / "a").glob("*.png")) == ["a_0000.png", "a_0001.png"]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["images"] == 4


def test_multi_node_with_a_lost_worker_is_byte_identical(tmp_path):
    import ray
    from conftest import faulty_sampler, save_tiny_prior
    from ray.cluster_utils import Cluster

    from pipeline.cli import build_parser
    from pipeline.distill.run import distill_command, resolve_config

    ray.shutdown()
    # Units of a tiny model take a fraction of a second: the first actor to load its model could run
    # them all before the others are up. A test-only actor (conftest.faulty_sampler) holds every unit until
    # two actors have taken one, so the clean run uses several nodes and the lost one held work.
    tiny_prior = save_tiny_prior(tmp_path / "prior", num_classes=6)
    data = write_image_folder(tmp_path / "data", {c: 4 for c in "abcdef"})
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"

    def cluster_run(out: Path, kill_after_first_class: bool) -> dict:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        stop = threading.Event()

        def killer():
            while not stop.is_set():
                if any((out / "train").glob("*/_SUCCESS")) if (out / "train").exists() else False:
                    cluster.remove_node(workers[0])
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=killer, daemon=True)
        if kill_after_first_class:
            thread.start()
        try:
            args = build_parser(["distill"]).parse_args(_distill_args(data, out, tiny_prior))
            (tmp_path / f"{out.name}-actors").mkdir()
            spread = faulty_sampler(tmp_path / f"{out.name}-actors", spread_over=2)
            assert distill_command(lambda: resolve_config(args), actor_cls=spread) == 0
        finally:
            stop.set()
            ray.shutdown()
            cluster.shutdown()
        return json.loads((out / "run.json").read_text())

    run = cluster_run(clean, False)
    assert len(run["nodes_used"]) >= 2, run["nodes_used"]  # classes ran on more than one node
    cluster_run(faulty, True)
    assert _tree(faulty) == _tree(clean)
    shutil.rmtree(tmp_path / "data")
