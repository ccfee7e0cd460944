"""runtime.device=cuda on an autoscaling cluster whose GPU nodes start at zero: every stage asks Ray for
GPUs, so the autoscaler adds GPU nodes; the run waits for them and runs there (not on the GPU-less head).

The cluster is Ray's fake multi-node provider on this machine, the one ``ray.cluster_utils.AutoscalingCluster``
drives: a real autoscaler (monitor) process that launches a real raylet per node it decides to add. The GPUs
are logical (no CUDA here): with ``MANIFOLDGD_LOGICAL_GPUS`` set, the VAE and sampling actors that see no
CUDA device run on CPU and say so (without it, runtime.device=cuda fails there: tests/test_device.py).

``AutoscalingCluster`` itself is not used, for two reasons found in Ray 2.60.0:
- its constructor reads ``ray/autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does not
  ship (``FileNotFoundError``; the file is only in Ray's source tree);
- its ``start()`` and ``shutdown()`` run ``ray stop --force``, which ends every Ray process on the machine,
  other users' and other tests' included.
So the head is started as ``AutoscalingCluster.start()`` starts it (the same config keys as that
example.yaml, ``RAY_FAKE_CLUSTER=1``, ``AUTOSCALER_UPDATE_INTERVAL_S=1``, ``--autoscaling-config``), with
``--block`` in its own process group and ports of its own, and stopped by stopping that group.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, head_port_flags, stop_process_group, wait_for_dashboard, write_image_folder

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent
MB = 1024 * 1024


def fake_autoscaling_config(gcs_address: str, head_cpus: int, worker_types: dict) -> dict:
    """A fake-multinode autoscaler config (the keys of Ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "fake_multinode", "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        # gcs_address: the provider's nodes join this head, not the default port 6379
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **worker_types},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_device_cuda_waits_for_and_runs_on_the_gpu_nodes_the_autoscaler_adds(tmp_path, tiny_prior, monkeypatch):
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.util.state import list_actors, list_tasks

    from pipeline.cli import main
    from pipeline.common.device import LOGICAL_GPUS_ENV

    monkeypatch.setenv(LOGICAL_GPUS_ENV, "1")  # the GPUs are logical: run on CPU under runtime.device=cuda
    ray.shutdown()  # cluster tests run last; the session's private instance is not needed any more
    data = write_image_folder(tmp_path / "data", {c: 4 for c in "abc"})
    out = tmp_path / "out"
    ip, port, dash = ray.util.get_node_ip_address(), free_port(), free_port()
    gpu_worker = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150 * MB}, "node_config": {},
                  "min_workers": 0, "max_workers": 2}
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(fake_autoscaling_config(f"{ip}:{port}", 1, {"gpu_worker": gpu_worker})))
    temp_dir = tempfile.mkdtemp(prefix="rayautoscale", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", **{LOGICAL_GPUS_ENV: "1"}, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--block", f"--port={port}", f"--autoscaling-config={config}",
                             "--num-cpus=1", "--num-gpus=0", f"--object-store-memory={150 * MB}", *head_port_flags(),
                             "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        wait_for_dashboard(dash, head)
        ray.init(address=f"{ip}:{port}", logging_level="ERROR", log_to_driver=False)
        before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        assert before == [FAKE_HEAD_NODE_ID] and ray.cluster_resources().get("GPU", 0) == 0
        start = time.monotonic()
        head_up = start - t0
        assert main(["distill", "--data", str(data), "--out", str(out), "--ipc", "2", "--model", str(tiny_prior),
                     "--vae", "", "--set", "sampler.num_steps=4", "--set", "sampler.t_stop=2",
                     "--set", "tangent.neighbours=3", "--set", "tangent.dim=2", "--set", "sampler.max_batch=3",
                     "--set", "runtime.progress=false", "--set", "runtime.device=cuda"]) == 0
        seconds = time.monotonic() - start
        added = {n["NodeID"] for n in ray.nodes() if n["NodeID"] != FAKE_HEAD_NODE_ID}
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU", 0) >= 1}
        state = f"http://127.0.0.1:{dash}"
        actors = list_actors(address=state, detail=True, limit=1000, raise_on_missing_output=False)
        for _ in range(30):  # task events reach the state API a little after the tasks end
            plans = list_tasks(address=state, filters=[("name", "=", "run_class"), ("state", "=", "FINISHED")],
                               detail=True, limit=1000, raise_on_missing_output=False)
            if len(plans) >= 3:
                break
            time.sleep(1)
        queried = time.monotonic() - start - seconds
    finally:
        ray.shutdown()
        stop_process_group(head, timeout=15)  # then SIGKILL: a graceful stop of this cluster takes ~35 s here
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert added and added <= gpu_nodes, (added, gpu_nodes)  # only GPU nodes were added, by the autoscaler
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["runtime"]["device"] == "cuda" and run["counts"]["images"] == 6
    for stage in ("encode", "plan", "sample"):  # each worker was given a GPU and says it ran on CPU
        assert run["devices"][stage] and all(r["gpu_ids"] and r["device"] == "cpu" and r["fallback"]
                                             for r in run["devices"][stage]), (stage, run["devices"][stage])
    assert run["nodes_used"] and set(run["nodes_used"]) <= added, (run["nodes_used"], added)  # sampling units
    placed = [a for a in actors if a.node_id]  # an actor still pending when the run ended was never placed
    samplers = [a for a in placed if a.class_name == "ClassSampler"]
    encoders = [a for a in placed if "VAEEncoder" in a.class_name]
    assert samplers and encoders and len(plans) == 3, ([a.class_name for a in actors], len(plans))
    for what, ran in (("sampling actor", samplers), ("VAE actor", encoders), ("plan task", plans)):
        assert {r.node_id for r in ran} <= added, (what, [r.node_id for r in ran], added)
        assert all(r.required_resources.get("GPU", 0) > 0 for r in ran), (what, ran[0].required_resources)
    print(f"head up in {head_up:.0f}s; distill on the autoscaled cluster: {seconds:.0f}s, {len(added)} GPU node(s) "
          f"added; state API {queried:.0f}s, shutdown {time.monotonic() - start - seconds - queried:.0f}s; "
          f"stages (s): {json.dumps({k: round(v, 1) for k, v in run['timings_s'].items()})}")
