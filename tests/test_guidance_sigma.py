"""ops.guidance.guidance_sigma: `elementwise` reproduces the public code's guided update on a hand-made
schedule; `scalar` is the sampler's per-sample geometric mean; where the two differ on DiT's schedule.
Then `sampler.sigma` end to end: the sampler's default keeps its old bytes, elementwise moves them, and
the config field is validated, hashed and passed to the sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ops.guidance import guidance_sigma, guided_mean
from ops.schedule import learned_range_log_variance, learned_std_spread, respaced_schedule, schedule_from_betas
from pipeline.common.errors import ConfigError

HAND_BETAS = [0.05, 0.2, 0.4]  # a 3-step process, small enough to write out by hand


def public_update(i, mu, v, g, z, lam):
    """The public MGD3 / ManifoldGD DDPM step, coordinate by coordinate, from the betas alone:
    log var = frac log beta_i + (1 - frac) log beta_tilde_i (index 0 borrows beta_tilde_1), frac = (v + 1) / 2,
    sigma = exp(log var / 2), x_{i-1} = mu + lam sigma g + sigma z."""
    abar, prod = [], 1.0
    for beta in HAND_BETAS:
        prod *= 1.0 - beta
        abar.append(prod)
    def beta_tilde(j):
        prev = 1.0 if j == 0 else abar[j - 1]
        return HAND_BETAS[j] * (1.0 - prev) / (1.0 - abar[j])
    log_tilde = math.log(beta_tilde(1) if i == 0 else beta_tilde(i))
    out = []
    for m, vv, gg, zz in zip(mu, v, g, z):
        frac = (vv + 1.0) / 2.0
        sigma = math.exp(0.5 * (frac * math.log(HAND_BETAS[i]) + (1.0 - frac) * log_tilde))
        out.append(m + lam * sigma * gg + sigma * zz)
    return np.array(out)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_elementwise_matches_the_public_update(i):
    rng = np.random.default_rng(i)
    sched = schedule_from_betas(HAND_BETAS)
    mu, g, z = rng.standard_normal((3, 2, 6))
    v = rng.uniform(-1, 1, (2, 6))
    lam = 0.1
    log_var = learned_range_log_variance(sched, i, v)
    sigma = guidance_sigma(log_var, "elementwise")
    ours = guided_mean(mu, sigma, g, lam) + np.exp(0.5 * log_var) * z
    for b in range(2):
        np.testing.assert_allclose(ours[b], public_update(i, mu[b], v[b], g[b], z[b], lam), rtol=1e-13, atol=1e-13)


def test_scalar_is_the_geometric_mean_of_the_elementwise_std_per_sample():
    rng = np.random.default_rng(1)
    sched = schedule_from_betas(HAND_BETAS)
    log_var = learned_range_log_variance(sched, 1, rng.uniform(-1, 1, (3, 2, 2, 2)))
    scalar = guidance_sigma(log_var, "scalar")
    element = guidance_sigma(log_var, "elementwise")
    assert scalar.shape == (3, 1, 1, 1) and element.shape == (3, 2, 2, 2)
    geo = np.exp(np.log(element).reshape(3, -1).mean(axis=1))
    np.testing.assert_allclose(scalar[:, 0, 0, 0], geo, rtol=1e-13)
    assert not np.allclose(element, scalar)  # the hand schedule's std does vary across coordinates


def test_scalar_equals_the_samplers_formula_bit_for_bit():
    # the sampler computed torch.exp(0.5 * log_var.flatten(1).mean(dim=1)).view(-1, 1, 1, 1) before sampler.sigma.
    sched = respaced_schedule()
    v = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    log_var = learned_range_log_variance(sched, 30, v)
    expected = torch.exp(0.5 * log_var.flatten(1).mean(dim=1)).view(-1, 1, 1, 1)
    assert torch.equal(guidance_sigma(log_var, "scalar"), expected)
    assert torch.equal(guidance_sigma(log_var, "elementwise"), torch.exp(0.5 * log_var))


def test_fixed_variance_gives_one_number_in_both_modes():
    assert guidance_sigma(math.log(0.04), "scalar") == pytest.approx(0.2)
    assert guidance_sigma(math.log(0.04), "elementwise") == pytest.approx(0.2)


def spread_of_ratio(sched, i):
    """max / min over coordinates of elementwise / scalar sigma, half the coordinates at v = +1, half at -1."""
    v = np.where(np.arange(64) % 2 == 0, 1.0, -1.0)[None, :]
    log_var = learned_range_log_variance(sched, i, v)
    ratio = guidance_sigma(log_var, "elementwise") / guidance_sigma(log_var, "scalar")
    return float(ratio.max() / ratio.min())


def test_where_scalar_and_elementwise_differ_on_dits_schedule():
    sched = respaced_schedule(1000, 50)
    for i in (49, 26, 11, 2, 1):
        assert spread_of_ratio(sched, i) == pytest.approx(learned_std_spread(sched, i), rel=1e-9)
    # Guided steps at the default t_stop 25 (i >= 26): under 0.8% apart at every one of them.
    assert max(learned_std_spread(sched, i) for i in range(26, 50)) < 1.008
    # Late steps, guided only with a small t_stop (the public code's default is 0): far apart.
    assert learned_std_spread(sched, 11) > 1.07
    assert learned_std_spread(sched, 1) > 7.5


def test_numpy_and_torch_agree():
    v = np.random.default_rng(2).uniform(-1, 1, (2, 3, 4))
    log_var = learned_range_log_variance(respaced_schedule(), 5, v)
    for mode in ("scalar", "elementwise"):
        np.testing.assert_allclose(guidance_sigma(torch.from_numpy(log_var), mode).numpy(),
                                   guidance_sigma(log_var, mode), rtol=1e-15)


def test_bad_sigma_mode():
    with pytest.raises(ValueError, match="sigma mode"):
        guidance_sigma(np.zeros((1, 2)), "per_channel")


# ---------------------------------------------------------------- the sampler and the config field
@pytest.fixture(scope="module")
def tiny(tiny_prior):
    from pipeline.models.loading import load_prior

    return load_prior(str(tiny_prior), vae=None)


def guided_run(prior, steps, **cfg):
    """Final latents of 3 manifold-guided samples of class 2, and every step's StepInfo."""
    from pipeline.models.sampler import GuidedSampler, SamplerConfig

    n, dim = 3, prior.latent_dim
    g = torch.Generator().manual_seed(7)
    centroids = torch.randn(n, dim, generator=g)
    bases, _ = torch.linalg.qr(torch.randn(n, dim, 2, generator=g))
    seen = []
    sampler = GuidedSampler(prior, SamplerConfig(guidance="manifold", num_steps=steps, guidance_scale=0.5, **cfg))
    latents = sampler.sample_latents(2, range(n), centroids, bases, step_callback=seen.append)
    return sampler, latents, seen, centroids, bases


def test_scalar_default_is_the_samplers_formula_from_before_the_field(tiny):
    """The default writes the bytes of the code before `sigma` existed: the guided mean is the old
    torch.exp(0.5 * log_var.flatten(1).mean(dim=1)) formula, bit for bit, and "scalar" is the default."""
    from ops.guidance import guidance_vector

    sampler, latents, seen, c, u = guided_run(tiny, 6, t_stop=0)
    checked = 0
    for s in seen:
        if s.guided_step is None:
            continue
        _, var_values = sampler.predict(s.x_t, 2, s.timestep)
        log_var = learned_range_log_variance(sampler.schedule, s.index, var_values)
        old_sigma = torch.exp(0.5 * log_var.flatten(1).mean(dim=1)).view(-1, 1, 1, 1)
        g = guidance_vector("manifold", s.x0_hat.flatten(1), c, u).view_as(s.x_t)
        assert torch.equal(s.guided_mean, s.mean + (0.5 * old_sigma) * g), s.index
        checked += 1
    assert checked == 5
    assert torch.equal(latents, guided_run(tiny, 6, t_stop=0, sigma="scalar")[1])


def test_elementwise_uses_the_steps_own_std_and_moves_the_latents(tiny):
    """elementwise: mu + lambda std_i * g with std_i the step's per-coordinate noise std (the public
    code's update); with t_stop 0 (steps down to i = 1, where the spread is largest) the final latents
    differ from the scalar run's, while the noise and the unguided steps are the same."""
    from ops.guidance import guidance_vector

    _, scalar, _, _, _ = guided_run(tiny, 6, t_stop=0)
    _, element, seen, c, u = guided_run(tiny, 6, t_stop=0, sigma="elementwise")
    for s in seen:
        if s.guided_step is None:
            continue
        assert s.sigma.shape == s.x_t.shape and torch.equal(s.sigma, s.noise_std)
        g = guidance_vector("manifold", s.x0_hat.flatten(1), c, u).view_as(s.x_t)
        torch.testing.assert_close(s.guided_mean, s.mean + 0.5 * s.noise_std * g, rtol=0, atol=1e-6)
    assert (element - scalar).abs().max() > 1e-3 * scalar.abs().max()
    # No guided step: the field changes nothing.
    assert torch.equal(guided_run(tiny, 6, t_stop=5)[1], guided_run(tiny, 6, t_stop=5, sigma="elementwise")[1])


def test_config_field_is_validated_hashed_and_reaches_the_sampler():
    from pipeline.config import DistillConfig, build_config, validate
    from pipeline.models.sampler import SamplerConfig

    with pytest.raises(ConfigError, match="sampler.sigma"):
        validate(build_config({"sampler": {"sigma": "per_channel"}}), need_paths=False)
    with pytest.raises(ValueError, match="sigma"):
        SamplerConfig(sigma="per_channel")
    element = validate(build_config({"sampler": {"sigma": "elementwise"}}), need_paths=False)
    assert element.hashed_dict()["sampler"]["sigma"] == "elementwise"
    assert element.config_hash() != DistillConfig().config_hash()
    assert SamplerConfig.from_config(element).sigma == "elementwise"
    assert SamplerConfig.from_config(DistillConfig()).sigma == "scalar"
    # The default reproduces the bytes made before the field existed, so it keeps their hash: it is left
    # out of the hashed dict, and an explicit "scalar" is the same config.
    assert "sigma" not in DistillConfig().hashed_dict()["sampler"]
    assert build_config({"sampler": {"sigma": "scalar"}}).config_hash() == DistillConfig().config_hash()
    assert DistillConfig().to_dict()["sampler"]["sigma"] == "scalar"  # run.json still records it
