"""Stage 1: images -> VAE latents, streamed through Ray Data and written to parquet by class.

read (binary files / parquet rows) -> decode + DiT preprocessing (CPU tasks; a bad file becomes a row
with a reason) -> VAE encode in an actor pool (GPU when present; the model loads once per actor) ->
parquet partitioned by class. Latent = posterior mean x scaling factor, flattened.
"""
from __future__ import annotations

import hashlib

import numpy as np
import ray
import torch

from pipeline.config import ModelConfig
from pipeline.inputs.preprocess import decode_image
from pipeline.models.refs import load_vae

LATENT_COLUMNS = ("id", "class_name", "label", "latent", "error")


def flip_for(row_id: str, seed: int) -> bool:
    """Deterministic stand-in for the public code's random horizontal flip."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[0] & 1 == 1


def decode_batch(batch: dict, *, image_size: int, hflip: bool, seed: int) -> dict:
    """Raw bytes -> (size, size, 3) uint8 pixels; a row that fails keeps zeros and its reason."""
    n = len(batch["id"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for i in range(n):
        flip = hflip and flip_for(str(batch["id"][i]), seed)
        arr, reason = decode_image(batch["bytes"][i], image_size, flip)
        if arr is not None:
            pixels[i] = arr
        errors.append(reason)
    return {"id": batch["id"], "class_name": batch["class_name"], "label": batch["label"],
            "pixels": pixels, "error": np.asarray(errors, dtype=object)}


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


class VAEEncoder:
    """Ray Data actor: loads the VAE once, encodes the rows that decoded."""

    def __init__(self, model: dict, threads: int = 0, micro_batch: int = 64):
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vae, self.dtype = load_vae(ModelConfig(**model), self.device)
        self.micro_batch = micro_batch

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        n = len(ok)
        latents = None
        if ok.any():
            enc = self._encode_padded(batch["pixels"][ok])
            latents = np.zeros((n, enc.shape[1]), dtype=np.float32)
            latents[ok] = enc
        else:  # every row failed: keep the width so the parquet schema stays one tensor shape
            latents = np.zeros((n, 1), dtype=np.float32)
        return {"id": batch["id"], "class_name": batch["class_name"], "label": batch["label"],
                "latent": list(latents), "error": batch["error"]}

    def _encode_padded(self, pixels: np.ndarray) -> np.ndarray:
        """Encode in model calls of exactly ``micro_batch`` rows, zero-padding the last one.

        Kernels are chosen by tensor shape, so a fixed shape makes each image's latent independent of
        which other images Ray Data happened to batch it with: two runs give the same bytes.
        """
        out = []
        for i in range(0, len(pixels), self.micro_batch):
            chunk = pixels[i:i + self.micro_batch]
            enc = encode_pixels(self.vae, _pad_rows(chunk, self.micro_batch), self.device, self.dtype)
            out.append(enc[: len(chunk)])
        return np.concatenate(out)


def _pad_rows(pixels: np.ndarray, rows: int) -> np.ndarray:
    pad = np.zeros((rows - len(pixels), *pixels.shape[1:]), dtype=pixels.dtype)
    return np.concatenate([pixels, pad])


def pool_size(requested: int, use_gpu: bool) -> tuple[int, int]:
    """(min, max) encode actors. On CPU leave a core to the read and decode tasks (2-core deadlock)."""
    free = ray.available_resources()
    if use_gpu:
        n = int(free.get("GPU", 0)) or 1
    else:
        n = max(1, int(free.get("CPU", 1)) - 1)
    if requested:
        n = requested
    return 1, max(1, n)
