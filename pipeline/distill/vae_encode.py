"""The VAE encode of one batch of pixels: torch only, no Ray (``pipeline.distill.encode``'s actors call it,
and so does ``bench/gpu.py`` on a machine without Ray)."""
from __future__ import annotations

import numpy as np
import torch


def encode_pixels(vae, pixels: np.ndarray, device, dtype):
    """uint8 (B, H, W, 3) -> flattened latents (B, C*h*w) float32: (posterior mean - shift) x scale.

    The inverse of the sampler's decode, so centroids live in the space x_t lives in.
    """
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).to(torch.float32)
    x = (x / 127.5 - 1.0).to(dtype)
    with torch.inference_mode():
        mean = vae.encode(x).latent_dist.mean
    return ((mean.float() - shift) * scale).reshape(len(pixels), -1).cpu().numpy()
