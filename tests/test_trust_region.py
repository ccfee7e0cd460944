"""ops/guidance.py:trust_region and its use in the sampler's guided step."""
import numpy as np
import torch

from ops.guidance import guidance_vector, trust_region
from ops.schedule import respaced_schedule
from pipeline.models.sampler import GuidanceState, denoise_step


def test_caps_the_rms_of_lambda_g_and_leaves_small_steps_alone():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 64))
    g[0] *= 0.01   # lambda g RMS ~ 0.003: untouched
    g[1] *= 100.0  # far over: capped to exactly max_rms
    lam, rho = 0.3, 1.0
    out = trust_region(g, lam, rho)
    rms = np.sqrt(((lam * out) ** 2).mean(1))
    np.testing.assert_array_equal(out[0], g[0])
    assert rms[1] == np.float64(rms[1]) and abs(rms[1] - rho) < 1e-12
    assert np.all(rms <= rho + 1e-12)
    # Only scaled, never turned: same direction as g.
    cos = (out * g).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-12)
    # Off: 0 or no guidance.
    assert trust_region(g, lam, 0.0) is g and trust_region(g, 0.0, 1.0) is g


def test_numpy_and_torch_agree_and_a_tangent_g_stays_in_span():
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.normal(size=(32, 4)))[0]
    x0 = 50 * rng.normal(size=(5, 32))
    c = rng.normal(size=(5, 32))
    g = guidance_vector("manifold", x0, c, u, 0.0)
    out = trust_region(g, 0.5, 0.7)
    np.testing.assert_allclose(out - (out @ u) @ u.T, 0.0, atol=1e-9)
    t = trust_region(torch.as_tensor(g), 0.5, 0.7).numpy()
    np.testing.assert_allclose(t, out, rtol=1e-12)


def test_the_guided_step_moves_x_at_most_rho_noise_stds():
    sched = respaced_schedule(1000, 50)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 4) * 30  # far off the noise shell: x0_hat and g are huge
    eps = torch.zeros_like(x)
    c = torch.zeros(2, 64)
    for rho in (0.0, 1.0):
        state = GuidanceState("mode", c, None, 0.3, 0.0, rho)
        step = denoise_step(sched, 49, x, eps, None, guidance=state, noise=torch.zeros_like(x))
        move = (step["guided_mean"] - step["mean"]).flatten(1)
        rms = (move.pow(2).mean(1).sqrt() / step["sigma"].flatten()).numpy()
        if rho:
            np.testing.assert_allclose(rms, rho, rtol=1e-5)
        else:
            assert np.all(rms > 10)


def test_the_shipped_prior_caps_manifold_guidance_at_every_tuned_ipc():
    """Every projected method of the ladder carries the trust region (it keeps large lambdas from diverging),
    so the manifold guidance the demo runs is capped at each IPC the prior was tuned at."""
    from pipeline.distill.run import prior_defaults

    for ipc in (1, 10):
        assert prior_defaults("mnist10k", "manifold", ipc)["sampler"]["trust_region"] > 0
