"""runtime.device: with `cuda` the sampling actors ask Ray for GPUs, with `cpu` they never do, and `auto`
follows what the cluster has. The GPU here is logical: under `auto` the work runs on CPU, says so, and
records it (under `cuda` it fails: tests/test_device.py)."""
from __future__ import annotations

import time

import pytest
from conftest import output_tree, save_tiny_prior, stage_setup

from pipeline.distill.schedule import actor_plan, sample_stage

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_sampling_actors_request_and_get_the_gpu_resource(tmp_path):
    import ray

    ray.shutdown()  # the session's instance has no GPU; cluster tests run last
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, logging_level="ERROR", log_to_driver=False)
    try:
        prior = save_tiny_prior(tmp_path / "prior", num_classes=4)
        classes, labels = list("ab"), {"a": 0, "b": 1}
        trees = {}
        for device, share in (("auto", 0.5), ("cpu", 1.0)):
            cfg, out = stage_setup(tmp_path / device, prior, classes, ipc=2, max_batch=1)
            cfg.runtime.device, cfg.runtime.gpus_per_sample_actor = device, share
            options, _, dev, n = actor_plan(cfg)
            if device == "auto":  # the cluster has a GPU now
                assert options == {"num_gpus": 0.5, "num_cpus": 1} and dev == "cuda" and n == 2
            else:
                assert "num_gpus" not in options and dev == "cpu"
            res = sample_stage(cfg, classes, labels, out)
            gpu_ids = {g for r in res["units"] for g in r["gpu_ids"]}
            assert gpu_ids == ({"0"} if device == "auto" else set()), res["units"]
            assert {r["device"] for r in res["units"]} == {"cpu"}  # no CUDA here: the work falls back
            workers = [r["worker"] for r in res["units"]]
            assert all(w["device"] == "cpu" and bool(w["fallback"]) == (device == "auto") for w in workers), workers
            trees[device] = output_tree(out)
        assert trees["auto"] == trees["cpu"]  # where it ran changes no byte
        cfg.runtime.device = "cuda"
        assert actor_plan(cfg)[2] == "cuda"
    finally:
        ray.shutdown()


def test_sampling_actors_leave_a_gpu_share_to_the_plan_tasks():
    from pipeline.distill.schedule import actor_limit

    cpu, gpu = {"num_cpus": 1}, {"num_gpus": 1.0, "num_cpus": 1}
    assert actor_limit(4, cpu, True, cpus=2, gpus=0, plan_gpus=0) == 1      # a CPU left to the plans
    assert actor_limit(4, cpu, False, cpus=2, gpus=0, plan_gpus=0) == 4     # no plans left: every actor
    assert actor_limit(8, gpu, True, cpus=64, gpus=8, plan_gpus=0.25) == 7  # one GPU left to plan tasks
    assert actor_limit(1, gpu, True, cpus=8, gpus=1, plan_gpus=0.25) == 0   # one GPU: plans first
    assert actor_limit(2, {"num_gpus": 0.5, "num_cpus": 1}, True, cpus=8, gpus=1, plan_gpus=0.25) == 1
    assert actor_limit(8, gpu, True, cpus=64, gpus=8, plan_gpus=0) == 8     # plans on CPUs: all GPUs sample
    assert actor_limit(8, gpu, False, cpus=64, gpus=8, plan_gpus=0.25) == 8


def test_overlapped_stages_finish_when_plan_tasks_and_actors_share_one_gpu(tmp_path):
    """Plan tasks ask for a share of the (logical) GPU and sampling actors for all of it. A plan task that
    became ready after the first plans were done (its input came late) found the GPU held by a sampling
    actor that waited for its plan: a deadlock (seen in bench/scale.py with a logical GPU). The run must
    finish, and give the CPU run's bytes."""
    import threading

    import ray

    from pipeline.distill.plan import submit_plans

    ray.shutdown()  # the session's instance has no GPU; cluster tests run last
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=200 * 1024 * 1024, logging_level="ERROR", log_to_driver=False)
    try:
        prior = save_tiny_prior(tmp_path / "prior", num_classes=4)
        classes, labels = list("abc"), {"a": 0, "b": 1, "c": 2}
        cfg, out = stage_setup(tmp_path / "gpu", prior, classes, ipc=2, max_batch=2)  # units: a | b | c
        cfg.runtime.device = "auto"
        plans = submit_plans(cfg, ["a", "b"], out)  # 0.25 GPU each (the cluster has a GPU)

        @ray.remote(num_cpus=0)
        def late(seconds):
            """c's input comes once a sampling actor holds the whole GPU (what led to the deadlock), or after
            ``seconds`` (no actor may take the GPU while a plan task is left)."""
            deadline = time.time() + seconds
            while time.time() < deadline and ray.available_resources().get("GPU", 0) >= 0.25:
                time.sleep(0.2)
            return "c"

        @ray.remote(num_cpus=1, num_gpus=0.25)
        def plan_c(name):
            return {"class_name": name, "n_images": 8, "skipped": False, "repeated": False, "warnings": []}

        plans[plan_c.remote(late.remote(20))] = "c"
        box = {}
        worker = threading.Thread(target=lambda: box.update(res=sample_stage(cfg, classes, labels, out, plans=plans)),
                                  daemon=True)
        worker.start()
        worker.join(timeout=240)
        assert not worker.is_alive(), "stage 3 is stuck: sampling actors hold the GPU the last plan task needs"
        assert {r["class_name"] for r in box["res"]["plans"]} == set(classes)
        assert all(out.is_class_done(c) for c in classes)
        cfg_cpu, out_cpu = stage_setup(tmp_path / "cpu", prior, classes, ipc=2, max_batch=2)
        cfg_cpu.runtime.device = "cpu"
        sample_stage(cfg_cpu, classes, labels, out_cpu)
        assert output_tree(out) == output_tree(out_cpu)
    finally:
        ray.shutdown()
