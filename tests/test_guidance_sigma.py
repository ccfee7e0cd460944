"""ops.guidance.guidance_sigma: `elementwise` reproduces the public code's guided update on a hand-made
schedule; `scalar` is the sampler's per-sample geometric mean; where the two differ on DiT's schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ops.guidance import guidance_sigma, guided_mean
from ops.schedule import learned_range_log_variance, learned_std_spread, respaced_schedule, schedule_from_betas

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
    # pipeline/sampler.py computes torch.exp(0.5 * log_var.flatten(1).mean(dim=1)).view(-1, 1, 1, 1).
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
