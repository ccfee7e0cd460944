"""The sampler's noise.

Noise: sample k of class y draws its initial latent and then one step noise per DDPM step, in
order, from its own CPU ``torch.Generator`` seeded by a hash of (seed, y, k). So the noise never
depends on batching, chunking, other classes or rows in the batch, the worker, nor the device. A sample the
health check flags may be drawn again from noise attempt a = 1, 2, ... (a hash of (seed, y, k, a)); attempt 0
is the sample's first noise.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def sample_seed(seed: int, class_id: int, k: int, attempt: int = 0) -> int:
    """A 63-bit generator seed that depends on (seed, class, sample index, attempt) only. Attempt 0 is the
    sample's first noise (the same seed as before attempts existed); a health regeneration uses 1, 2, ..."""
    key = f"manifoldgd/noise/{seed}/{class_id}/{k}" + (f"/attempt{attempt}" if attempt else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class NoiseStreams:
    """One CPU generator per row (class, k); each ``draw`` returns the next (n, C, H, W) block."""

    def __init__(self, seed: int, class_ids: Sequence[int], indices: Sequence[int], shape,
                 attempts: Sequence[int] | None = None):
        self.shape = tuple(shape)
        attempts = [0] * len(indices) if attempts is None else attempts
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, int(y), int(k), int(a)))
                           for y, k, a in zip(class_ids, indices, attempts, strict=True)]

    def draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators])
