"""The one way every command starts or joins Ray.

Rule: join the cluster named by ``address`` or, when that is empty, by ``$RAY_ADDRESS`` (``ray job
submit`` and KubeRay set it for the job's driver; set it yourself, e.g. ``RAY_ADDRESS=auto``, to use a
``ray start`` cluster on this machine); otherwise start a private local instance that ends with the
process. Never a bare ``ray.init()``: that silently joins any cluster already running on the machine
(another user's ``ray start``, a test cluster), where the job would queue behind, or starve, their work.
"""
from __future__ import annotations

import logging
import os

import ray

from pipeline.common.log import quiet_ray_data

# Ray Train re-routes print() in its workers to a logger *and* to Ray's wrapped stdout: every line
# would reach the console twice.
_PRIVATE_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray(address: str = "") -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS", "") or "local"
    if address == "local":
        # A private instance runs without the dashboard, so Ray Train's placement-group cleaner cannot
        # reach the state API and warns once a second. It has nothing to clean: the instance ends with
        # this process. (On a real cluster the dashboard is up and the cleaner works.)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": _PRIVATE_ENV, "worker_process_setup_hook": quiet_worker})
    else:  # a cluster's jobs carry their own runtime_env (ray job submit, KubeRay); leave it alone
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    quiet_ray_data()


def quiet_worker() -> None:
    """Worker setup hook of a private instance (see init_ray)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
