"""The guidance vector and the guided DDPM update (METHOD.md section 4).

Written with arithmetic operators only, so the same functions take numpy, CuPy or torch arrays.
Vectors are flattened latents: shape (B, D).
"""
from __future__ import annotations

from ops.tangent import project

GUIDANCE_MODES = ("none", "mode", "manifold")


def x0_from_eps(x_t, eps, alpha_bar):
    """Predicted clean latent x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = float(alpha_bar)
    if not 0.0 < abar <= 1.0:
        raise ValueError(f"alpha_bar must be in (0, 1], got {alpha_bar}")
    return (x_t - (1.0 - abar) ** 0.5 * eps) / abar ** 0.5


def guidance_vector(mode: str, x0_hat, centroid, basis=None, normal_weight: float = 0.0):
    """g for one guided step.

    - ``none``: 0 (the DiT baseline).
    - ``mode`` (MGD3): c - x0_hat.
    - ``manifold`` (ManifoldGD): U U^T (c - x0_hat) + normal_weight (I - U U^T)(c - x0_hat);
      normal_weight 0 is the strict tangent projection, 1 gives ``mode`` back exactly.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if mode == "none":
        return x0_hat * 0
    delta = centroid - x0_hat
    if mode == "mode":
        return delta
    if basis is None:
        raise ValueError("basis is required for manifold guidance")
    if normal_weight < 0:
        raise ValueError(f"normal_weight must be >= 0, got {normal_weight}")
    if normal_weight == 1.0:
        return delta
    tangent = project(delta, basis)
    if normal_weight == 0.0:
        return tangent
    return tangent + normal_weight * (delta - tangent)


def guided_mean(mean, sigma, g, scale: float):
    """Posterior mean shifted by the guidance: mu + lambda * sigma_t * g.

    The sampler then adds sigma_t * z as in a plain step. The sign pulls x toward the centroid
    (as the MGD3 code does; its paper writes the opposite sign on epsilon).
    """
    return mean + (scale * sigma) * g
