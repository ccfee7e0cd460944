"""runtime.device: with `cuda` the sampling actors ask Ray for GPUs (a logical GPU here: the work itself
falls back to CPU), with `cpu` they never do, and `auto` follows what the cluster has."""
from __future__ import annotations

import pytest
from conftest import save_tiny_prior
from test_units import _stage_setup, _tree

from pipeline.distill.sample import actor_plan, sample_stage

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
        for device, share in (("cuda", 0.5), ("cpu", 1.0)):
            cfg, out = _stage_setup(tmp_path / device, prior, classes, ipc=2, max_batch=1)
            cfg.runtime.device, cfg.runtime.gpus_per_sample_actor = device, share
            options, _, dev, n = actor_plan(cfg)
            if device == "cuda":
                assert options == {"num_gpus": 0.5, "num_cpus": 1} and dev == "cuda" and n == 2
            else:
                assert "num_gpus" not in options and dev == "cpu"
            res = sample_stage(cfg, classes, labels, out)
            gpu_ids = {g for r in res["units"] for g in r["gpu_ids"]}
            assert gpu_ids == ({"0"} if device == "cuda" else set()), res["units"]
            assert {r["device"] for r in res["units"]} == {"cpu"}  # no CUDA here: the work falls back
            trees[device] = _tree(out)
        assert trees["cuda"] == trees["cpu"]  # where it ran changes no byte
        cfg.runtime.device = "auto"
        assert actor_plan(cfg)[2] == "cuda"  # the cluster has a GPU now
    finally:
        ray.shutdown()
