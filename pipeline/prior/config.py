"""`train-prior`'s settings: one typed config (every knob with its default), and the run name hashed from it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass
class PriorTrainConfig:
    data: str = "mnist10k"
    out: str = ""
    image_size: int = 32
    seed: int = 0
    # VAE: block_out_channels (16, 32, 64) = two 2x downsamples -> 8x8x4 latents at 32 px; 16 channels
    # at full resolution keep the 32x32 convolutions (most of the cost) cheap on a CPU
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    vae_epochs: int = 12
    vae_batch_size: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # SD's weight on the per-image KL against the per-image summed L1
    vae: str = ""  # reuse a trained VAE folder instead of stage 1
    standardize_latents: bool = True  # fold per-channel latent mean/std into the VAE's 1x1 convs
    # DiT: patch 2 on 8x8 latents -> 16 tokens
    hidden_size: int = 192
    num_heads: int = 3
    depth: int = 6
    patch_size: int = 2
    learned_variance: bool = True
    shared_embedder: bool = True  # one timestep/class embedder for all blocks while training, as DiT
    snr_gamma: float = 0.0  # > 0: min-SNR-gamma weighting of the epsilon MSE (0 = DiT's plain MSE)
    epochs: int = 60
    # Small batches: on a CPU the per-sample cost hardly changes with the batch size, and for a short
    # run four times as many optimiser steps matter more than less noisy ones.
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    train_steps: int = 1000  # diffusion steps (linear betas, as DiT)
    # Ray Train
    workers: int = 1
    address: str = ""  # Ray cluster to join; "" = $RAY_ADDRESS, else a private local instance
    cpus_per_worker: int = 0  # 0: the cluster's CPUs / workers
    torch_threads: int = 0  # 0: cpus_per_worker. On a busy machine 1 avoids OpenMP threads waiting on each other
    use_gpu: str = "auto"  # auto | yes | no
    storage_path: str = ""  # Ray Train checkpoint storage (shared storage on a multi-node cluster)
    save_dtype: str = "float32"  # float32 | float16 (halves the folder; loads back as float32)
    log_every: int = 50
    checkpoint_every: int = 5  # epochs between resumable checkpoints (a rerun resumes from the last)
    max_failures: int = 2  # worker failures Ray Train recovers from (from the last checkpoint)
    subset: int = 0  # train on N random images only (tests, quick checks)


def run_name(cfg: PriorTrainConfig) -> str:
    """The same training settings give the same name, which is what lets a rerun resume."""
    ignored = ("out", "storage_path", "address", "log_every", "torch_threads")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    return "train-prior-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
