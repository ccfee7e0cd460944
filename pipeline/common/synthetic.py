"""Synthetic inputs for tests, benchmarks and rehearsals: a tiny random-init prior in the diffusers layout
and small ImageFolders of coloured noise. Nothing in a distill run uses them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from PIL import Image


def tiny_dit(num_classes: int, *, latent_size: int = 4, learned_variance: bool = True, layers: int = 1,
             seed: int = 0):
    """A random-init DiT transformer (diffusers' DiTTransformer2DModel) with DiT-XL/2's layout, tiny."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=8 if learned_variance else 4, num_layers=layers,
                                 sample_size=latent_size, patch_size=2, num_embeds_ada_norm=num_classes,
                                 norm_num_groups=4)


def tiny_vae(*, latent_size: int = 4, blocks: int = 3, seed: int = 0):
    """A random-init SD-style VAE: ``blocks`` blocks, each after the first halving the resolution."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(8,) * blocks,
                         layers_per_block=1, norm_num_groups=4, sample_size=latent_size * 2 ** (blocks - 1))


def save_tiny_prior(folder: Path, *, num_classes: int = 4, latent_size: int = 4, learned_variance: bool = True,
                    seed: int = 0, vae_blocks: int = 3, dit_layers: int = 1) -> Path:
    """The tiny prior of the tests and benches: a random-init DiT + VAE in the diffusers layout (folder/transformer,
    folder/vae). By default 16 px images and 4 x 4 x 4 latents."""
    vae = tiny_vae(latent_size=latent_size, blocks=vae_blocks, seed=seed)
    dit = tiny_dit(num_classes, latent_size=latent_size, learned_variance=learned_variance, layers=dit_layers,
                   seed=seed)
    vae.save_pretrained(folder / "vae")
    dit.save_pretrained(folder / "transformer")
    return folder


def write_image_folder(root: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """root/train/<class>/img_<i>.png with class-dependent colour blobs, so classes differ."""
    rng = np.random.default_rng(seed)
    for ci, (cls, n) in enumerate(classes.items()):
        d = root / "train" / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.zeros((size, size, 3), np.float32)
            base[..., ci % 3] = 180
            img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"img_{i:03d}.png")
    return root
