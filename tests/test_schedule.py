"""ops/schedule.py against DiT's definitions and diffusers' independent implementation."""
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ops.schedule import (
    ddim_coefficients,
    fixed_log_variance,
    learned_range_log_variance,
    linear_betas,
    posterior_mean_coefficients,
    respaced_schedule,
    schedule_from_betas,
    space_timesteps,
)


def dit_rule_single_section(num_timesteps, count):
    """DiT's rule for one section, written from its definition: stride (size-1)/(count-1), round per step."""
    stride = (num_timesteps - 1) / (count - 1)
    return [int(round(k * stride)) for k in range(count)]


def test_dit_50_of_1000_matches_its_rule_and_diffusers_linspace():
    kept = space_timesteps(1000, "50")
    assert kept == dit_rule_single_section(1000, 50)
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    # diffusers' "linspace" spacing is the same rule, implemented independently.
    sched = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    sched.set_timesteps(50)
    assert kept == sorted(sched.timesteps.tolist())
    # Spot values where rounding a fractional stride matters (27 * 999/49 = 550.47 -> 550).
    assert kept[27] == 550 and kept[47] == 958 and kept[1] == 20 and kept[2] == 41


@pytest.mark.parametrize("count", [4, 10, 25, 250])
def test_single_section_rule_for_other_counts(count):
    assert space_timesteps(1000, str(count)) == dit_rule_single_section(1000, count)


def test_ddim_spacing_is_the_integer_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim4") == [0, 250, 500, 750]
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")  # no integer stride gives exactly 7 of 10


def test_multiple_sections_cover_each_section_end_to_end():
    # DiT's docstring example: 300 steps, sections of 100 keep 10, 15 and 20 steps.
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    for lo, count in ((0, 10), (100, 15), (200, 20)):
        section = [t for t in kept if lo <= t < lo + 100]
        assert len(section) == count and section[0] == lo and section[-1] == lo + 99


def test_linear_betas_match_diffusers():
    ours = linear_betas(1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # DiT rescales the endpoints for other lengths so the process keeps its overall noise level.
    assert linear_betas(500)[0] == pytest.approx(2e-4) and linear_betas(500)[-1] == pytest.approx(0.04)


def test_respacing_keeps_the_cumulative_alphas_at_kept_steps():
    full_abar = np.cumprod(1 - linear_betas(1000))
    for spacing in ("dit", "uniform"):
        s = respaced_schedule(1000, 50, spacing)
        np.testing.assert_allclose(s.alphas_cumprod, full_abar[s.timesteps], rtol=1e-12)
        assert s.alphas_cumprod_prev[0] == 1.0
        np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
        assert np.all(np.diff(s.timesteps) > 0)
    # Without respacing the betas are the original ones.
    np.testing.assert_allclose(respaced_schedule(1000, 1000).betas, linear_betas(1000), rtol=1e-9)


def test_posterior_coefficients_give_the_gaussian_posterior_mean():
    # q(x_{t-1} | x_t, x0) for x_t = sqrt(a_t/a_{t-1}) x_{t-1} + noise, x_{t-1} ~ N(sqrt(a_{t-1}) x0, 1 - a_{t-1}):
    # conditioning a Gaussian gives the mean below; the coefficients must agree for every index.
    s = respaced_schedule(1000, 50)
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=2)
    for i in range(1, s.num_steps):
        a_t, a_p = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        alpha = a_t / a_p
        prior_mean, prior_var = np.sqrt(a_p) * x0, 1 - a_p
        lik_var = 1 - alpha
        post_var = 1 / (1 / prior_var + alpha / lik_var)
        post_mean = post_var * (prior_mean / prior_var + np.sqrt(alpha) * xt / lik_var)
        c1, c2 = posterior_mean_coefficients(s, i)
        assert c1 * x0 + c2 * xt == pytest.approx(post_mean, rel=1e-9)
        assert s.posterior_variance[i] == pytest.approx(post_var, rel=1e-9)
    c1, c2 = posterior_mean_coefficients(s, 0)
    assert (c1, c2) == (pytest.approx(1.0), pytest.approx(0.0))  # the last step returns x0_hat


def test_learned_range_interpolates_log_variances():
    s = respaced_schedule(1000, 50)
    for i in (1, 10, 49):
        assert learned_range_log_variance(s, i, 1.0) == pytest.approx(np.log(s.betas[i]))
        assert learned_range_log_variance(s, i, -1.0) == pytest.approx(np.log(s.posterior_variance[i]))
        mid = (np.log(s.betas[i]) + np.log(s.posterior_variance[i])) / 2
        assert learned_range_log_variance(s, i, 0.0) == pytest.approx(mid)
    # Index 0 has zero posterior variance: the lower end is clipped to index 1's value (DiT).
    assert learned_range_log_variance(s, 0, -1.0) == pytest.approx(np.log(s.posterior_variance[1]))
    # Works element-wise on tensors.
    v = torch.linspace(-1, 1, 5)
    out = learned_range_log_variance(s, 10, v)
    assert out.shape == v.shape and torch.all(out[1:] >= out[:-1])


def test_learned_range_matches_diffusers_ddpm():
    s = respaced_schedule(1000, 50)
    sched = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace", variance_type="learned_range")
    sched.set_timesteps(50)
    v = torch.tensor([-0.7, 0.0, 0.4, 0.9], dtype=torch.float64)
    for i in (1, 5, 30, 49):
        t = int(s.timesteps[i])
        theirs = sched._get_variance(t, predicted_variance=v).double()
        ours = learned_range_log_variance(s, i, v)
        # diffusers works in float32: 1 - abar cancels a few digits at small t.
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_fixed_variance_is_dits_fixed_large():
    s = respaced_schedule(1000, 50)
    assert fixed_log_variance(s, 7) == pytest.approx(np.log(s.betas[7]))
    assert fixed_log_variance(s, 0) == pytest.approx(np.log(s.posterior_variance[1]))


def test_ddim_coefficients():
    s = respaced_schedule(1000, 50)
    assert ddim_coefficients(s, 0) == (1.0, 0.0)
    a, b = ddim_coefficients(s, 20)
    assert a ** 2 + b ** 2 == pytest.approx(1.0)
    assert a ** 2 == pytest.approx(s.alphas_cumprod[19])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        respaced_schedule(1000, 0)
    with pytest.raises(ValueError):
        respaced_schedule(1000, 50, "leading")
    with pytest.raises(ValueError):
        schedule_from_betas([0.1, 1.5])
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
