"""Stage 2's backend is an explicit, validated, recorded choice; on a GPU the CuPy plan matches numpy's."""
from __future__ import annotations

import numpy as np
import pytest

from ops.backend import BackendUnavailableError, cupy_available
from pipeline.common.errors import ConfigError
from pipeline.config import build_config, validate
from pipeline.distill.plan import plan_class


def _blobs(n_per=40, dim=48, k=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (k, dim))
    return np.concatenate([c + rng.normal(0, 1, (n_per, dim)) for c in centres]).astype(np.float32)


def _cfg(**cluster):
    return build_config({"ipc": 4, "cluster": cluster, "tangent": {"dim": 2, "neighbours": 6},
                         "sampler": {"num_steps": 8, "t_stop": 2}})


def test_backend_is_validated_and_recorded_in_the_plan():
    with pytest.raises(ConfigError, match="cluster.backend"):
        validate(build_config({"cluster": {"backend": "gpu"}}), need_paths=False)
    X = _blobs()
    numpy_plan = plan_class(X, _cfg(backend="numpy"))
    assert str(numpy_plan["backend"]) == "numpy"
    auto_plan = plan_class(X, _cfg(backend="auto"))
    expected = "cupy" if cupy_available() else "numpy"
    assert str(auto_plan["backend"]) == expected
    if expected == "numpy":  # the same backend: the same bytes
        for key in ("centroids", "bases", "step_index", "node_ids"):
            np.testing.assert_array_equal(auto_plan[key], numpy_plan[key])


def test_asking_for_cupy_without_a_gpu_fails_clearly():
    if cupy_available():
        pytest.skip("this machine has CuPy with a GPU")
    with pytest.raises(BackendUnavailableError, match="CuPy"):
        plan_class(_blobs(), _cfg(backend="cupy"))


def test_the_tangent_route_is_a_config_choice_with_the_same_subspaces():
    X = _blobs()
    svd = plan_class(X, build_config({"ipc": 3, "tangent": {"dim": 2, "neighbours": 6, "route": "svd"},
                                      "cluster": {"backend": "numpy"}}))
    gram = plan_class(X, build_config({"ipc": 3, "tangent": {"dim": 2, "neighbours": 6, "route": "gram"},
                                       "cluster": {"backend": "numpy"}}))
    np.testing.assert_array_equal(svd["centroids"], gram["centroids"])
    for a, b in zip(svd["bases"], gram["bases"]):  # the same projector U U^T
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-4)


@pytest.mark.gpu
def test_plan_class_on_cupy_matches_numpy():
    if not cupy_available():
        pytest.skip("needs CuPy with a CUDA device")
    X = _blobs()
    host, dev = plan_class(X, _cfg(backend="numpy")), plan_class(X, _cfg(backend="cupy"))
    assert str(dev["backend"]) == "cupy"
    np.testing.assert_array_equal(host["node_ids"], dev["node_ids"])
    np.testing.assert_allclose(host["centroids"], dev["centroids"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(host["step_index"], dev["step_index"])
    for a, b in zip(host["bases"], dev["bases"]):
        np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-3)


def test_plan_tasks_ask_for_a_gpu_share_only_where_stages_use_gpus():
    from pipeline.distill.plan import plan_task_options

    cfg = build_config({})
    assert plan_task_options(cfg, 0) == {"num_cpus": 1, "num_gpus": 0}          # auto, no GPU now
    assert plan_task_options(cfg, 8) == {"num_cpus": 1, "num_gpus": 0.25}       # auto, a GPU cluster
    cfg.runtime.device = "cuda"
    assert plan_task_options(cfg, 0)["num_gpus"] == 0.25  # cuda asks even at 0 GPUs: the autoscaler adds them
    cfg.runtime.device, cfg.runtime.gpus_per_plan_task = "cpu", 0.5
    assert plan_task_options(cfg, 8)["num_gpus"] == 0
    assert build_config({"runtime": {"gpus_per_plan_task": 1.0}}).config_hash() == build_config({}).config_hash()
