"""Stage 3's Ray-native fault tolerance: any unit error retried up to runtime.max_unit_attempts, dead actors
restarted or replaced, a node that joins mid-run used; the bytes always those of a clean run."""
from __future__ import annotations

import threading
import time

import pytest
from conftest import faulty_sampler, output_tree, save_tiny_prior, stage_setup

from pipeline.common.outputs import OutputDir
from pipeline.config import build_config
from pipeline.distill.sample import ClassSampler, finalize_class, make_units, unit_part
from pipeline.distill.schedule import UnitFailedError, sample_stage

CLASSES = list("abc")
LABELS = {c: i for i, c in enumerate(CLASSES)}
IPC, MAX_BATCH = 2, 3  # units: a0 a1 b0 | b1 c0 c1


def referenceoutput_tree(cfg, classes, labels) -> dict:
    """The same units run in this process, without Ray: what every run must reproduce byte for byte."""
    sampler = ClassSampler(cfg.to_dict())
    units = make_units(classes, labels, cfg.ipc, cfg.sampler.max_batch, cfg.sampler.units)
    for u in units:
        sampler.run_unit(u.to_dict())
    out = OutputDir(cfg.out)
    for c in classes:
        finalize_class(out, c, [u.uid for u in units if c in u.classes], cfg.ipc)
    return output_tree(out)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("fprior"), num_classes=6)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, prior):
    cfg, _ = stage_setup(tmp_path_factory.mktemp("ref"), prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    return referenceoutput_tree(cfg, CLASSES, LABELS)


def _faults(tmp_path, **spec) -> type:
    (tmp_path / "markers").mkdir()
    return faulty_sampler(tmp_path / "markers", **spec)


def test_an_error_once_per_class_is_retried_and_changes_no_byte(tmp_path, prior, clean, ray_session):
    faulty = _faults(tmp_path, raise_once_per_class=True)
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    res = sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    assert sorted((tmp_path / "markers").iterdir()) == [tmp_path / "markers" / f"raise-{c}" for c in CLASSES]
    assert len(res["units"]) == 2
    assert output_tree(out) == clean


def test_an_actor_killed_twice_mid_run_changes_no_byte(tmp_path, prior, clean, ray_session):
    faulty = _faults(tmp_path, exit_units=[0, 1])  # os._exit in the actor, on each unit's first try
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    res = sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    assert len(list((tmp_path / "markers").glob("exit-*"))) == 2
    assert len(res["units"]) == 2
    assert output_tree(out) == clean


def test_a_unit_that_keeps_failing_ends_the_run_with_one_clear_error(tmp_path, prior, ray_session):
    faulty = _faults(tmp_path, raise_always=True)
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    cfg.runtime.max_unit_attempts = 2
    cfg.runtime.sample_actors = 1
    with pytest.raises(UnitFailedError) as err:
        sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    msg = str(err.value)
    first = make_units(CLASSES, LABELS, IPC, MAX_BATCH)[0]
    assert f"unit {first.uid}" in msg and "classes a, b" in msg and "failed 2 time(s)" in msg
    assert "ValueError: injected fault (test), every time" in msg
    assert not unit_part(out, first.uid).exists() and not any(out.train.glob("*/_SUCCESS"))


def test_an_actor_killed_for_good_is_replaced_and_changes_no_byte(tmp_path, prior, clean, ray_session):
    faulty = _faults(tmp_path, kill_units=[1])  # ray.kill(no_restart=True) of the actor running unit 1
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    cfg.runtime.sample_actors = 1  # no other actor to fall back on: the run ends only if one replaces it
    res = sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    assert len(list((tmp_path / "markers").glob("kill-*"))) == 1
    by_unit = {r["uid"][:7]: r["actor_id"] for r in res["units"]}
    assert len(by_unit) == 2 and by_unit["u000000"] != by_unit["u000001"]  # a new actor, not a restart
    assert output_tree(out) == clean


def test_a_unit_over_the_timeout_is_retried_on_its_restarted_actor(tmp_path, prior, clean, ray_session,
                                                                    capsys):
    faulty = _faults(tmp_path, hang_units=[1], hang_s=600)  # unit 1's first try never ends by itself
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    cfg.runtime.sample_actors, cfg.runtime.unit_timeout_s = 1, 5.0
    start = time.monotonic()
    res = sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    assert time.monotonic() - start < 120
    assert len(list((tmp_path / "markers").glob("hang-*"))) == 1
    by_unit = {r["uid"][:7]: r["actor_id"] for r in res["units"]}
    assert len(by_unit) == 2 and by_unit["u000000"] == by_unit["u000001"]  # Ray restarted it: same actor
    second = make_units(CLASSES, LABELS, IPC, MAX_BATCH)[1]
    log = capsys.readouterr().out
    assert f"unit {second.uid} (3 samples; classes b, c) ran over runtime.unit_timeout_s=5s" in log
    assert f"unit {second.uid} (3 samples; classes b, c) failed (attempt 1/3): ran over runtime.unit_timeout_s=5s" in log
    assert output_tree(out) == clean


def test_a_unit_that_always_times_out_ends_the_run_with_one_clear_error(tmp_path, prior, ray_session):
    faulty = _faults(tmp_path, delay_s=600)  # every unit, every try
    cfg, out = stage_setup(tmp_path / "out", prior, CLASSES, ipc=IPC, max_batch=MAX_BATCH)
    cfg.runtime.sample_actors, cfg.runtime.unit_timeout_s, cfg.runtime.max_unit_attempts = 1, 2.0, 2
    start = time.monotonic()
    with pytest.raises(UnitFailedError) as err:
        sample_stage(cfg, CLASSES, LABELS, out, actor_cls=faulty)
    assert time.monotonic() - start < 120
    msg = str(err.value)
    first = make_units(CLASSES, LABELS, IPC, MAX_BATCH)[0]
    assert msg == (f"sampling unit {first.uid} (3 samples; classes a, b) failed 2 time(s); "
                   "last error: ran over runtime.unit_timeout_s=2s"), msg
    assert not any(out.train.glob("*/_SUCCESS"))


def test_runtime_fields_are_not_hashed_and_are_checked():
    from pipeline.config import ConfigError, validate

    base = {"data": {"path": "x"}, "out": "/o"}
    digest = build_config(base).config_hash()
    for rt in ({"device": "cuda"}, {"gpus_per_sample_actor": 0.25}, {"max_unit_attempts": 7},
               {"unit_timeout_s": 60}):
        assert build_config(base, {"runtime": rt}).config_hash() == digest
    assert build_config(base, {"sampler": {"units": "per_class"}}).config_hash() != digest
    for rt, field in (({"device": "tpu"}, "runtime.device"), ({"gpus_per_sample_actor": 0}, "runtime.gpus"),
                      ({"gpus_per_sample_actor": 1.5}, "runtime.gpus"), ({"max_unit_attempts": 0}, "runtime.max")):
        with pytest.raises(ConfigError, match=field):
            validate(build_config(base, {"runtime": rt}))


# ------------------------------------------------------------------------------------ a real cluster
@pytest.mark.cluster
@pytest.mark.slow
def test_a_node_lost_and_a_node_added_mid_run_is_used(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    prior = save_tiny_prior(tmp_path / "prior", num_classes=6)
    classes = list("abcdef")
    labels = {c: i for i, c in enumerate(classes)}
    cfg, out = stage_setup(tmp_path / "out", prior, classes, ipc=2, max_batch=1)  # 12 units
    expected = referenceoutput_tree(*stage_setup(tmp_path / "ref", prior, classes, ipc=2, max_batch=1)[:1],
                              classes, labels)
    faulty = _faults(tmp_path, delay_s=2.0)  # slow units, so the new node joins while work is left
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    lost = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    result: dict = {}

    def drive():  # the run in a thread: cluster_utils adds nodes from the main thread only
        try:
            result["res"] = sample_stage(cfg, classes, labels, out, actor_cls=faulty)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 300
        while thread.is_alive() and time.time() < deadline and not list((out.work / "units").glob("*.parquet")):
            time.sleep(0.05)
        cluster.remove_node(lost)
        added = cluster.add_node(num_cpus=1)
        thread.join(timeout=600)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert "error" not in result, result.get("error")
    res = result["res"]
    used = {r["node_id"] for r in res["units"]}
    assert added.node_id in used, (used, added.node_id)
    assert output_tree(out) == expected
