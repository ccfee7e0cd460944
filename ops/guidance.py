"""The guidance vector and the guided DDPM update (docs/method.md section 4).

Written with arithmetic operators only, so the same functions take numpy, CuPy or torch arrays.
Vectors are flattened latents: shape (B, D).
"""
from __future__ import annotations

import math

from ops.backend import array_module
from ops.tangent import project

GUIDANCE_MODES = ("none", "mode", "manifold", "public")
BASIS_MODES = ("manifold", "public")  # the modes whose g needs a tangent basis
SIGMA_MODES = ("scalar", "elementwise")


def x0_from_eps(x_t, eps, alpha_bar):
    """Predicted clean latent x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = float(alpha_bar)
    if not 0.0 < abar <= 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1], got {alpha_bar}")
    return (x_t - (1.0 - abar) ** 0.5 * eps) / abar ** 0.5


def guidance_vector(mode: str, x0_hat, centroid, basis=None, normal_weight: float = 0.0, pull: float = 0.1):
    """g for one guided step.

    - ``none``: 0 (the DiT baseline).
    - ``mode`` (MGD3): c - x0_hat.
    - ``manifold`` (ManifoldGD, the paper): U U^T (c - x0_hat) + normal_weight (I - U U^T)(c - x0_hat);
      normal_weight 0 is the strict tangent projection, 1 gives ``mode`` back exactly.
    - ``public`` (the public ManifoldGD code's variant): the whole mode term, plus ``pull`` times the unit
      vector from x0_hat toward the plane c + span(U): (c - x0_hat) + pull n / |n|, n = (I - U U^T)(c - x0_hat)
      (0 where n is 0). Nothing is projected away; the pull adds a fixed length ``pull``.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if mode == "none":
        return x0_hat * 0
    delta = centroid - x0_hat
    if mode == "mode":
        return delta
    if basis is None:
        raise ValueError(f"basis is required for {mode} guidance")
    if mode == "public":
        if pull < 0:
            raise ValueError(f"pull must be >= 0, got {pull}")
        normal = delta - project(delta, basis)
        norm = ((normal * normal).sum(-1) ** 0.5)[:, None]
        # max(|n|, 1e-6 |delta|): a normal that is rounding noise (x0_hat on the plane) adds nothing
        floor = 1e-6 * ((delta * delta).sum(-1) ** 0.5)[:, None]
        den = norm + (floor - norm) * (norm < floor)
        return delta + pull * normal / (den + (den == 0))
    if normal_weight < 0:
        raise ValueError(f"normal_weight must be >= 0, got {normal_weight}")
    if normal_weight == 1.0:
        return delta
    tangent = project(delta, basis)
    if normal_weight == 0.0:
        return tangent
    return tangent + normal_weight * (delta - tangent)


def projects_at(alpha_bar: float, min_signal: float) -> bool:
    """Whether a ``manifold`` step at this noise level projects (noise-aware projection): when the signal
    coefficient of x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, sqrt(alpha_bar), is at least ``min_signal``.
    Below it x_t is nearly all noise, the noised cloud around the data is nearly full-dimensional, and a
    tangent space of clean latents is the wrong constraint: the step uses the whole mode term instead.
    ``min_signal`` 0 projects at every step (the paper)."""
    return float(alpha_bar) ** 0.5 >= min_signal


def repulsion(x0_hat, groups):
    """A diversity term among the rows of one batch: row r is pushed away from the other rows of its group
    (its class), r_r = x0_r - sum_s w_rs x0_s, with w_rs = k_rs / sum_s' k_rs' over the group's other rows,
    k_rs = exp(-|x0_r - x0_s|^2 / h_r^2), h_r^2 = the mean of those squared distances: the nearest sample
    weighs most, and r_r has the scale of the distances between samples. A row alone in its group gets 0.

    ``x0_hat``: (B, D) flattened; ``groups``: (B,) integer labels, the same array type. Arithmetic only
    (numpy, CuPy, torch). A sum over the batch: each row's term depends on which rows share its batch.
    """
    diff = x0_hat[:, None, :] - x0_hat[None, :, :]
    d2 = (diff * diff).sum(-1)  # (B, B), exactly 0 on the diagonal, so k_rr = 1 exactly
    same = (groups[:, None] == groups[None, :]) * 1.0
    others = same.sum(-1) - 1.0
    h2 = (d2 * same).sum(-1) / (others + (others == 0))
    k = _exp(-d2 / (h2[:, None] + (h2[:, None] == 0))) * same
    mass = k.sum(-1)[:, None]
    total = mass - 1.0  # the other rows' weight (the row's own k_rr = 1)
    term = (x0_hat * mass - k @ x0_hat) / (total + (total <= 0))
    return term * (others[:, None] > 0)


def trust_region(g, scale: float, max_rms: float):
    """g scaled, row by row, so that the guided displacement lambda sigma g moves x_t by at most ``max_rms``
    noise standard deviations per coordinate (RMS): factor min(1, max_rms sqrt(D) / (lambda |g|)).

    ``g``: (B, D) flattened. ``max_rms`` <= 0 leaves g unchanged. A scalar factor per row, so a manifold g
    stays in span(U). Why (docs/health.md): a displacement larger than the step's own noise pushes x_t off
    the noise shell the denoiser was trained on; the next x0_hat then follows it (tangent directions are
    read as signal) and the guidance overshoots, step after step.
    """
    if max_rms <= 0 or scale <= 0:
        return g
    dim = g.shape[-1]
    norm = ((g * g).sum(-1) ** 0.5)[:, None]
    ratio = (scale * norm) / (max_rms * dim ** 0.5)
    ratio = ratio.clamp(min=1.0) if hasattr(ratio, "clamp") else array_module(ratio).maximum(ratio, 1.0)
    return g / ratio


def _exp(x):
    if hasattr(x, "exp"):  # torch
        return x.exp()
    return array_module(x).exp(x)


def guidance_sigma(log_var, mode: str = "scalar"):
    """sigma_t of the guidance term lambda * sigma_t * g, from the step's log-variance.

    ``log_var``: the per-coordinate log-variance of the DDPM step, (B, ...) as numpy, CuPy or torch
    (learned range, ``ops.schedule.learned_range_log_variance``), or one float (fixed variance, where
    both modes give the same float exp(0.5 log_var)).

    - ``scalar``: one number per sample, exp(0.5 x the mean of its log-variances), shape (B, 1, ..., 1):
      the geometric mean of the per-coordinate std. The guided displacement lambda sigma g is then a
      multiple of g, so a manifold g stays exactly in span(U). This is what the sampler has always used.
    - ``elementwise``: exp(0.5 log_var), one std per coordinate, the same std as the step's noise: the
      public MGD3 / ManifoldGD code's update x_{t-1} = mu + lambda sigma g + sigma z. A manifold g then
      leaves span(U) by the spread of the std across coordinates.

    Where they differ: elementwise / scalar lies in [1/q, q] with q = ``ops.schedule.learned_std_spread``
    (the std ratio between a coordinate at v = +1 and one at v = -1). On DiT's 50-step schedule q is
    1.007 at i = 26 (the last guided step at t_stop 25, the default), 1.074 at i = 11 (t_stop 10), 1.84 at
    i = 2 and 7.9 at i = 1 (both guided at t_stop 0, the public code's default).
    """
    if mode not in SIGMA_MODES:
        raise ValueError(f"sigma mode must be one of {SIGMA_MODES}, got {mode!r}")
    if isinstance(log_var, (int, float)):
        return math.exp(0.5 * float(log_var))
    if mode == "elementwise":
        return _exp(0.5 * log_var)
    batch = log_var.shape[0]
    per_sample = log_var.reshape(batch, -1).mean(1)
    return _exp(0.5 * per_sample).reshape(batch, *([1] * (log_var.ndim - 1)))


def guided_mean(mean, sigma, g, scale: float):
    """Posterior mean shifted by the guidance: mu + lambda * sigma_t * g.

    ``sigma``: a float, one number per sample (B, 1, ..., 1) or one per coordinate (the shape of
    ``mean``), as ``guidance_sigma`` returns; ``g`` has the shape of ``mean``.

    The sampler then adds sigma_t * z as in a plain step. The sign pulls x toward the centroid
    (as the MGD3 code does; its paper writes the opposite sign on epsilon).
    """
    return mean + (scale * sigma) * g
