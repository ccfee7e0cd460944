"""The two stages of `train-prior` as :class:`~pipeline.prior.loop.Stage` s: what one step of each computes,
what it checkpoints, and how it resumes. The loop itself is in ``loop.py``."""
from __future__ import annotations

import copy

import numpy as np
import ray.train.torch
import torch

from pipeline.common.images import to_model_range
from pipeline.prior.config import PriorTrainConfig
from pipeline.prior.loop import Run, Stage, allreduce_grads, gather_generator_states, run_stage
from pipeline.prior.loss import DiffusionLoss
from pipeline.prior.nets import build_transformer, build_vae, disable_builtin_label_dropout, share_embedders_


def train_vae(cfg: PriorTrainConfig, pixels, device, world: int, run: Run):
    """Stage 1: (the trained VAE, its summary)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # Training calls encode/decode, not forward, so DDP's wrapper would not sync anything: the
    # gradients are averaged by hand instead (same effect, one all-reduce per parameter).
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def load(state: dict) -> None:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        torch.set_rng_state(state["torch_rng"])  # the posterior samples continue where they stopped

    start = run.resume("vae", "VAE", load)
    pixels_per_image = 3 * cfg.image_size ** 2

    def loss(idx):
        x = to_model_range(pixels[idx], device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean()  # summed over latent elements, averaged over images
        # SD's weighting: sum-over-pixels L1 + w * KL per image, here divided through by the pixel count.
        return l1 + cfg.vae_kl_weight * kl / pixels_per_image, {"l1": l1, "kl": kl}

    stage = Stage(
        "vae", cfg.vae_epochs, cfg.vae_batch_size, cfg.vae_lr, 0, opt, loss, {"l1": ".4f", "kl": ".1f"},
        state=lambda: {"vae": vae.state_dict(), "vae_opt": opt.state_dict(), "torch_rng": torch.get_rng_state()},
        before_step=(lambda: allreduce_grads(vae)) if world > 1 else (lambda: None))
    summary = run_stage(stage, run, n=len(pixels), start=start, seed=cfg.seed, warmup=cfg.warmup_steps,
                        log_every=cfg.log_every, world=world)
    return vae, summary


def encode_all(vae, pixels, device, batch: int = 256):
    """Posterior mean and std of every training image (unscaled latent space)."""
    means, stds = [], []
    vae.eval()
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            post = vae.encode(to_model_range(pixels[start:start + batch], device)).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def train_dit(cfg: PriorTrainConfig, latents, labels: np.ndarray, num_classes: int, device, rank: int, world: int,
              run: Run):
    """Stage 2 on ``latents`` = (posterior means, stds, shift, scale): (the EMA transformer, its summary)."""
    mean, std, shift, scale = latents
    torch.manual_seed(cfg.seed + 1)
    dit = build_transformer(cfg, num_classes, mean.shape[-1]).to(device)
    disable_builtin_label_dropout(dit)
    if cfg.shared_embedder:
        share_embedders_(dit)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    def load(state: dict) -> None:
        dit.load_state_dict(state["dit"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["dit_opt"])
        gen.set_state(state["generators"][rank])

    start = run.resume("dit", "DiT", load)  # before DDP's wrapper copies rank 0's weights to the others
    model = ray.train.torch.prepare_model(dit)
    loss_fn = DiffusionLoss(cfg.train_steps, cfg.learned_variance, device, cfg.snr_gamma)
    labels_t = torch.as_tensor(labels, device=device)

    def loss(idx):
        idx_t = torch.as_tensor(idx, device=device)
        # A fresh posterior sample each time (DiT samples the SD posterior), then shift and scale.
        z = mean[idx_t] + std[idx_t] * torch.randn(mean[idx_t].shape, device=device, generator=gen)
        x0 = (z - shift) * scale
        y = labels_t[idx_t]
        drop = torch.rand(y.shape, device=device, generator=gen) < cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        total, mse, vb = loss_fn(model, x0, y, generator=gen)
        return total, {"loss": total, "mse": mse, "vb": vb}

    def update_ema(step: int) -> None:
        # EMA with a warm-up, so a short run is not dominated by the random initial weights.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - decay)

    stage = Stage(
        "dit", cfg.epochs, cfg.batch_size, cfg.lr, 1, opt, loss, {"loss": ".4f", "mse": ".4f", "vb": ".4f"},
        state=lambda: {"dit": dit.state_dict(), "ema": ema.state_dict(), "dit_opt": opt.state_dict()},
        before_step=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
        after_step=update_ema,
        collect=lambda: {"generators": gather_generator_states(gen, world)})
    summary = run_stage(stage, run, n=len(labels), start=start, seed=cfg.seed, warmup=cfg.warmup_steps,
                        log_every=cfg.log_every, world=world)
    return ema, summary
