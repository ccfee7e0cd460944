"""Cross-class work units for stage 3: the cut, the compact bases, per-class vs cross-class bytes, and the
stage driver's rerun / resume at unit granularity."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from conftest import D, as_denoiser, output_tree, random_centroids, save_tiny_prior, stage_setup
from conftest import save_sampler_prior as save_prior

from pipeline.distill.plan import expand_bases
from pipeline.distill.sample import make_units, unit_part
from pipeline.distill.schedule import sample_stage
from pipeline.models.loading import load_prior
from pipeline.models.sampler import GuidedSampler, SamplerConfig, step_bases


# ------------------------------------------------------------------------------- the cut
def test_units_are_a_function_of_the_config_only():
    labels = {"c": 2, "a": 0, "b": 1}
    units = make_units(["c", "a", "b"], labels, ipc=3, max_batch=4)
    assert [u.rows for u in units] == [
        (("a", 0, 0), ("a", 0, 1), ("a", 0, 2), ("b", 1, 0)),
        (("b", 1, 1), ("b", 1, 2), ("c", 2, 0), ("c", 2, 1)),
        (("c", 2, 2),)]
    assert units[1].classes == ["b", "c"]
    again = make_units(["b", "a", "c"], labels, ipc=3, max_batch=4)  # listing order does not matter
    assert [u.uid for u in again] == [u.uid for u in units]
    assert units[0].uid.startswith("u000000-") and len({u.uid for u in units}) == 3
    # IPC 1 fills the batch; per_class never mixes classes
    assert [len(u.rows) for u in make_units(list("abcdefghij"), {c: i for i, c in enumerate("abcdefghij")},
                                            ipc=1, max_batch=4)] == [4, 4, 2]
    per = make_units(["c", "a", "b"], labels, ipc=3, max_batch=2, mode="per_class")
    assert [[r[0] for r in u.rows] for u in per] == [["a", "a"], ["a"], ["b", "b"], ["b"], ["c", "c"], ["c"]]
    # another cut, another id: a record of one can never pass for the other
    assert make_units(["a", "b", "c"], labels, ipc=3, max_batch=5)[0].uid != units[0].uid


# ------------------------------------------------------------------------------- the sampler
@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    return as_denoiser(load_prior(str(save_prior(tmp_path_factory.mktemp("uprior"), 10, True)), vae=None))


def _plan(n_ipc, n_steps, d, seed):
    """A plan-shaped dict: per sample 1-3 distinct orthonormal bases and a per-step index into them."""
    g = torch.Generator().manual_seed(seed)
    counts = [1 + (k % 3) for k in range(n_ipc)]
    bases = torch.linalg.qr(torch.randn((sum(counts), D, d), generator=g))[0].numpy()
    step_index = np.stack([np.minimum(np.arange(n_steps) // 2, c - 1) for c in counts])
    return {"bases": bases.astype(np.float32), "offsets": np.concatenate([[0], np.cumsum(counts)]),
            "step_index": step_index.astype(np.int64)}


def _compact(plans_rows):
    """What the sampling actor builds: the bases the rows use, once each, and their (n, S) index."""
    sets, index, off = [], [], 0
    for plan, k in plans_rows:
        lo, hi = int(plan["offsets"][k]), int(plan["offsets"][k + 1])
        sets.append(plan["bases"][lo:hi])
        index.append(off + plan["step_index"][k])
        off += hi - lo
    return np.concatenate(sets), np.stack(index)


def test_compact_basis_indexing_equals_the_expanded_form_exactly(denoiser):
    cfg = SamplerConfig(guidance="manifold", num_steps=6, t_stop=1, max_batch=3, normal_weight=0.1)
    n_steps, ipc = cfg.num_guided_steps, 4
    plan = _plan(ipc, n_steps, 2, seed=3)
    expanded = expand_bases(plan)  # (n, S, D, d)
    basis_set, index = _compact([(plan, k) for k in range(ipc)])
    assert basis_set.shape[0] == plan["bases"].shape[0] < expanded.shape[0] * expanded.shape[1]
    u, idx = torch.as_tensor(basis_set), torch.as_tensor(index)
    for j in range(n_steps):
        assert torch.equal(step_bases(u, idx, j), torch.as_tensor(expanded[:, j]))
    c = random_centroids(ipc)
    sampler = GuidedSampler(denoiser, cfg)
    seen = []
    a = sampler.sample_latents(2, range(ipc), c, expanded)
    b = sampler.sample_rows([2] * ipc, range(ipc), c, basis_set, index,
                            step_callback=lambda s: seen.append(s.class_ids))
    assert torch.equal(a, b)
    assert seen[0] == [2, 2, 2] and seen[-1] == [2]


def test_cross_class_rows_match_per_class_calls_within_one_grey_level(denoiser):
    """Same noise (a pure function of (seed, class, k)); only BLAS's batch-size-dependent rounding may
    move a pixel by one level when a batch mixes classes."""
    cfg = SamplerConfig(guidance="manifold", num_steps=5, t_stop=1, max_batch=4)
    n_steps, ipc, classes = cfg.num_guided_steps, 3, [1, 4, 7]
    plans = {y: _plan(ipc, n_steps, 2, seed=y) for y in classes}
    cents = {y: random_centroids(ipc, seed=10 + y) for y in classes}
    sampler = GuidedSampler(denoiser, cfg)
    per_class = {}
    for y in classes:
        imgs = sampler.sample(y, range(ipc), cents[y], expand_bases(plans[y]))
        per_class.update({(y, k): imgs[k] for k in range(ipc)})
    rows = [(y, k) for y in classes for k in range(ipc)]
    basis_set, index = _compact([(plans[y], k) for y, k in rows])
    x_T = {}

    def keep(s):
        if s.index == cfg.num_steps - 1:
            x_T.update({(y, k): s.x_t[row].clone() for row, (y, k) in enumerate(zip(s.class_ids, s.sample_indices))})

    lat = sampler.sample_rows([y for y, _ in rows], [k for _, k in rows],
                              torch.stack([cents[y][k] for y, k in rows]), basis_set, index, step_callback=keep)
    cross = sampler.decode(lat)
    for (y, k), img in zip(rows, cross):
        assert torch.equal(x_T[(y, k)], sampler.initial_noise(y, [k])[0])  # each row its own stream
        diff = np.abs(img.astype(int) - per_class[(y, k)].astype(int))
        assert diff.max() <= 1 and np.mean(diff > 0) < 0.01
    assert np.mean((cross > 0) & (cross < 255)) > 0.5  # not saturated: equality is a real check


# ------------------------------------------------------------------------------- the stage driver
@pytest.fixture(scope="module")
def prior6(tmp_path_factory):
    return save_tiny_prior(tmp_path_factory.mktemp("prior6"), num_classes=6)


def test_units_reproduce_their_bytes_on_rerun_and_resume(tmp_path, prior6, ray_session):
    classes = list("abcde")
    labels = {c: i for i, c in enumerate(classes)}
    cfg, out = stage_setup(tmp_path / "one", prior6, classes, ipc=3, max_batch=4)
    res = sample_stage(cfg, classes, labels, out)
    units = make_units(classes, labels, 3, 4)
    assert [r["uid"] for r in sorted(res["units"], key=lambda r: r["uid"])] == [u.uid for u in units]
    assert all(out.is_class_done(c) for c in classes)
    first = output_tree(out)
    assert len([p for p in first if p.endswith(".png")]) == 15

    # a second folder, same config: the same bytes
    cfg2, out2 = stage_setup(tmp_path / "two", prior6, classes, ipc=3, max_batch=4)
    sample_stage(cfg2, classes, labels, out2)
    assert output_tree(out2) == first

    # resume after deleting outputs as crashes leave them (a class with _SUCCESS is never redone):
    for c in "bc":  # unit 1 = b1 b2 c0 c1, straddling two classes: killed after one PNG
        (out.train / c / "_SUCCESS").unlink()
    (out.train / "c" / "c_0001.png").unlink()
    unit_part(out, units[1].uid).unlink()
    (out.train / "e" / "_SUCCESS").unlink()  # unit 3 = e0 e1 e2: killed before its record
    unit_part(out, units[3].uid).unlink()
    (out.train / "a" / "_SUCCESS").unlink()  # a crash between a's manifest part and its _SUCCESS
    out.manifest_part("d").unlink()          # ... and before d's manifest part
    res = sample_stage(cfg, classes, labels, out)
    assert sorted(r["uid"] for r in res["units"]) == sorted([units[1].uid, units[3].uid])
    assert output_tree(out) == first
    # and a rerun of a complete folder runs nothing
    assert sample_stage(cfg, classes, labels, out)["units"] == []
    assert output_tree(out) == first


def test_units_start_while_later_plans_are_still_running(tmp_path, prior6, ray_session):
    """Stage 2/3 overlap: a unit runs as soon as its classes' plans exist, not after the last plan."""
    import ray

    classes = list("abc")
    labels = {c: i for i, c in enumerate(classes)}
    cfg, out = stage_setup(tmp_path, prior6, classes, ipc=2, max_batch=2)  # units: a | b | c
    cfg.runtime.sample_actors = 1

    units = make_units(classes, labels, 2, 2)
    first_two = [str(unit_part(out, u.uid)) for u in units[:2]]

    @ray.remote(num_cpus=0)
    def plan_task(c, wait_for):
        """c's plan "finishes" only once the units of a and b are written (at most 300 s): with a barrier
        between the stages they would never start first, and the test fails on the order below."""
        deadline = time.time() + 300
        while wait_for and time.time() < deadline and not all(os.path.exists(p) for p in wait_for):
            time.sleep(0.1)
        return {"class_name": c, "n_images": 8, "skipped": False, "repeated": False, "warnings": [],
                "finished_at": time.time()}

    plans = {plan_task.remote(c, first_two if c == "c" else []): c for c in classes}
    res = sample_stage(cfg, classes, labels, out, plans=plans)
    c_planned = next(p["finished_at"] for p in res["plans"] if p["class_name"] == "c")
    early = [r["ended_at"] for r in res["units"] if r["classes"] != ["c"]]
    assert len(early) == 2 and max(early) < c_planned
    t = res["timings"]
    assert t["plan_sample_overlap"] > 0
    assert t["plan"] + t["sample"] - t["plan_sample_overlap"] <= t["plan_and_sample"] + 1e-6
    assert all(out.is_class_done(c) for c in classes)
