"""The guidance options beyond the paper (ops/guidance.py, docs/method.md section 4): the public code's
variant, noise-aware projection and within-class repulsion, on tiny arrays and through the sampler."""
import numpy as np
import pytest
import torch
from conftest import as_denoiser, random_bases, random_centroids
from conftest import save_sampler_prior as save_prior

from ops.guidance import guidance_vector, projects_at, repulsion
from ops.schedule import respaced_schedule
from pipeline.config import DistillConfig
from pipeline.models.loading import load_prior
from pipeline.models.sampler import GuidedSampler, SamplerConfig


def _orthonormal(rng, n, dim, d):
    return np.stack([np.linalg.qr(rng.normal(size=(dim, d)))[0] for _ in range(n)])


# ------------------------------------------------------------------------------ the public variant
def test_public_is_the_whole_mode_term_plus_a_unit_pull_toward_the_plane():
    rng = np.random.default_rng(0)
    x0, c = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    u = _orthonormal(rng, 4, 6, 2)
    delta = c - x0
    g = guidance_vector("public", x0, c, u, pull=0.7)
    extra = g - delta
    np.testing.assert_allclose(np.linalg.norm(extra, axis=1), 0.7, rtol=1e-12)  # a fixed length
    normal = delta - np.einsum("ndk,nk->nd", u, np.einsum("ndk,nd->nk", u, delta))
    np.testing.assert_allclose(extra, 0.7 * normal / np.linalg.norm(normal, axis=1, keepdims=True), atol=1e-12)
    assert np.allclose(np.einsum("ndk,nd->nk", u, extra), 0)  # it points across the plane, not along it
    np.testing.assert_array_equal(guidance_vector("public", x0, c, u, pull=0.0), delta)
    # a point already on the plane gets no pull (and no division by zero)
    on_plane = c - np.einsum("ndk,nk->nd", u, rng.normal(size=(4, 2)))
    np.testing.assert_allclose(guidance_vector("public", on_plane, c, u, pull=3.0), c - on_plane, atol=1e-12)
    with pytest.raises(ValueError, match="basis"):
        guidance_vector("public", x0, c, None)
    with pytest.raises(ValueError, match="pull"):
        guidance_vector("public", x0, c, u, pull=-1.0)


# --------------------------------------------------------------------------- noise-aware projection
def test_projection_starts_where_the_signal_reaches_the_threshold():
    sched = respaced_schedule(1000, 50, "dit")
    signal = np.sqrt(sched.alphas_cumprod)
    assert all(projects_at(a, 0.0) for a in sched.alphas_cumprod)  # the default: every step, as the paper
    for s_min in (0.1, 0.3, 0.8):
        projecting = [i for i in range(50) if projects_at(sched.alphas_cumprod[i], s_min)]
        assert projecting == [i for i in range(50) if signal[i] >= s_min]
        assert projecting == list(range(max(projecting) + 1))  # the low-noise end of sampling, contiguous
    # with the default t_stop 25 no guided step has signal 0.3: the option needs a lower t_stop
    assert not any(projects_at(sched.alphas_cumprod[i], 0.3) for i in range(26, 50))


# ------------------------------------------------------------------------------------- repulsion
def _repulsion_by_hand(x, groups):
    out = np.zeros_like(x)
    for r in range(len(x)):
        others = [s for s in range(len(x)) if s != r and groups[s] == groups[r]]
        if not others:
            continue
        d2 = np.array([np.sum((x[r] - x[s]) ** 2) for s in others])
        w = np.exp(-d2 / d2.mean())
        w /= w.sum()
        out[r] = sum(wi * (x[r] - x[s]) for wi, s in zip(w, others))
    return out


def test_repulsion_equals_the_kernel_weighted_push_within_each_class():
    rng = np.random.default_rng(1)
    x, groups = rng.normal(size=(7, 5)), np.array([3, 3, 3, 1, 1, 8, 3])
    r = repulsion(x, groups)
    np.testing.assert_allclose(r, _repulsion_by_hand(x, groups), atol=1e-12)
    np.testing.assert_array_equal(r[5], 0)  # alone in its class
    # the same numbers from torch (float32)
    rt = repulsion(torch.tensor(x, dtype=torch.float32), torch.tensor(groups))
    np.testing.assert_allclose(rt.numpy(), r, atol=1e-5)
    # a pair moves apart: the push on each is along its difference, away from the other
    pair = np.array([[0.0, 0.0], [1.0, 2.0]])
    rp = repulsion(pair, np.array([0, 0]))
    np.testing.assert_allclose(rp, [[-1.0, -2.0], [1.0, 2.0]])
    # identical rows (zero distances) give zero, not NaN
    np.testing.assert_array_equal(repulsion(np.ones((3, 4)), np.zeros(3, int)), np.zeros((3, 4)))


def test_repulsion_weighs_the_nearest_sample_most():
    x = np.array([[0.0, 0.0], [0.5, 0.0], [4.0, 0.0]])
    r = repulsion(x, np.zeros(3, int))
    assert r[0, 0] < 0 and abs(r[0, 0]) < 1.0  # pushed away from its near neighbour, mostly


# ---------------------------------------------------------------------------------- the sampler
@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    return as_denoiser(load_prior(str(save_prior(tmp_path_factory.mktemp("prior"), 10, True)), vae=None))


BASE = dict(num_steps=10, t_stop=2, guidance_scale=0.3)


def _run(denoiser, class_ids, ks, c, u=None, **cfg):
    sampler = GuidedSampler(denoiser, SamplerConfig(**{**BASE, **cfg}))
    basis_set, index = (None, None) if u is None else (u, np.repeat(np.arange(len(ks))[:, None],
                                                                    sampler.config.num_guided_steps, 1))
    return sampler.sample_rows(class_ids, ks, c, basis_set, index)


def test_defaults_of_the_new_knobs_change_no_byte(denoiser):
    n = 3
    c, u = random_centroids(n), random_bases(n, 2)
    for mode, basis in (("mode", None), ("manifold", u)):
        plain = _run(denoiser, [1] * n, range(n), c, basis, guidance=mode)
        again = _run(denoiser, [1] * n, range(n), c, basis, guidance=mode, repulsion=0.0, project_min_signal=0.0)
        assert torch.equal(plain, again)
    # public with no pull is mode guidance, bit for bit
    assert torch.equal(_run(denoiser, [1] * n, range(n), c, u, guidance="public", pull=0.0),
                       _run(denoiser, [1] * n, range(n), c, guidance="mode"))
    # the config hash of a run that sets none of them is what it was before they existed
    cfg = DistillConfig()
    assert "pull" not in cfg.hashed_dict()["sampler"] and "repulsion" not in cfg.hashed_dict()["sampler"]


def test_noise_aware_projection_is_mode_above_and_manifold_below_the_threshold(denoiser):
    n = 2
    c, u = random_centroids(n), random_bases(n, 2)
    mode = _run(denoiser, [4] * n, range(n), c, guidance="mode")
    manifold = _run(denoiser, [4] * n, range(n), c, u, guidance="manifold")
    assert torch.equal(_run(denoiser, [4] * n, range(n), c, u, guidance="manifold", project_min_signal=1.01), mode)
    assert torch.equal(_run(denoiser, [4] * n, range(n), c, u, guidance="manifold", project_min_signal=0.0), manifold)
    between = _run(denoiser, [4] * n, range(n), c, u, guidance="manifold", project_min_signal=0.5)
    assert not torch.equal(between, mode) and not torch.equal(between, manifold)


def test_repulsion_spreads_a_class_and_couples_only_its_own_rows(denoiser):
    n = 4
    c = random_centroids(1).repeat(n, 1)  # every sample guided to the same centroid
    plain = _run(denoiser, [2] * n, range(n), c, guidance="mode")
    spread = _run(denoiser, [2] * n, range(n), c, guidance="mode", repulsion=1.0)

    def mean_pairwise(x):
        f = x.flatten(1)
        return torch.cdist(f, f).sum() / (n * (n - 1))

    assert mean_pairwise(spread) > mean_pairwise(plain)
    # a sample alone in its class is untouched by the others: rows of class 2 and one row of class 7
    mixed = _run(denoiser, [2, 2, 7], [0, 1, 0], c[:3], guidance="mode", repulsion=1.0)
    alone = _run(denoiser, [7], [0], c[:1], guidance="mode", repulsion=1.0)
    assert torch.equal(mixed[2:], alone) or torch.allclose(mixed[2:], alone, atol=1e-5)
    # and a sample's result depends on which rows of its class share the call (the coupling is real)
    pair = _run(denoiser, [2, 2], [0, 1], c[:2], guidance="mode", repulsion=1.0)
    assert not torch.allclose(pair[0], spread[0])
    # reruns give the same bytes
    assert torch.equal(spread, _run(denoiser, [2] * n, range(n), c, guidance="mode", repulsion=1.0))


def test_new_knobs_are_checked():
    from pipeline.config import ConfigError, validate

    for key in ("pull", "project_min_signal", "repulsion"):
        cfg = DistillConfig()
        setattr(cfg.sampler, key, -0.5)
        with pytest.raises(ConfigError, match=f"sampler.{key}"):
            validate(cfg, need_paths=False)
