"""`manifoldgd train-prior`: train a small class-conditional latent diffusion prior with Ray Train.

The prior is built from the same diffusers classes as the real DiT-XL/2 + SD VAE (``AutoencoderKL`` and
``DiTTransformer2DModel``) and saved with ``save_pretrained`` as ``OUT/vae`` and ``OUT/transformer``, so
``load_prior(OUT, None)`` loads it exactly as it loads DiT-XL/2. Two stages run inside one Ray Train
``TorchTrainer`` (data-parallel over ``--workers``, GPUs when the cluster has them):

1. VAE: L1 reconstruction + a small KL term (SD's recipe without LPIPS / GAN). The latent statistics of
   the training set then give the VAE config's ``shift_factor`` (mean) and ``scaling_factor`` (1 / std),
   which play the role of SD's 0.18215: scaled latents have unit variance.
2. DiT: DiT's recipe on the scaled latents (a posterior sample per step): 1,000 linear-beta steps,
   epsilon prediction with learned variance trained by the hybrid loss (MSE + the variational bound with
   a stop-gradient on the mean, as improved DDPM / DiT), 10% label dropout for classifier-free guidance
   (the null class is row ``num_classes`` of the label table), DiT's adaLN-Zero initialisation, and an
   EMA of the weights, which is what is saved.

Images go through the pipeline's own preprocessing (``common.images.crop_images``, RGB): a 28 px digit is
resized to 32 px with BICUBIC, exactly as the encode stage of ``distill`` will see it.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from ops.schedule import linear_betas, schedule_from_betas
from pipeline.common.images import crop_images, to_model_range
from pipeline.common.log import get_logger
from pipeline.common.ray_start import init_ray
from pipeline.inputs import datasets
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import list_imagefolder

log = get_logger("train-prior").info


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


# ------------------------------------------------------------------------------------------- data
def load_training_images(data: str, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(pixels uint8 (N, S, S, 3), labels int64 0..K-1, class names) of a built-in name or an ImageFolder.

    Labels are the classes' sorted order, so they always index the prior's own label table (0..K-1),
    also when the folders are ImageNet wnids.
    """
    if data in datasets.builtin_names():
        images, labels, class_names = datasets.load_builtin(data, split="train")
        pixels = crop_images(images, image_size)
        return pixels, labels.astype(np.int64), list(class_names)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise SystemExit(f"--data {data!r} is neither a built-in dataset ({', '.join(datasets.builtin_names())}) "
                         "nor a folder")

    listing = list_imagefolder(root, "train")
    pixels, labels, bad = [], [], 0
    for y, cls in enumerate(listing.classes):
        for rel, c in listing.files:
            if c != cls:
                continue
            arr, _ = decode_image((Path(listing.root) / rel).read_bytes(), image_size)
            if arr is None:
                bad += 1
                continue
            pixels.append(arr)
            labels.append(y)
    if bad:
        log(f"skipped {bad} files that do not decode")
    if not pixels:
        raise SystemExit(f"no decodable images under {listing.root}")
    return np.stack(pixels), np.asarray(labels, dtype=np.int64), list(listing.classes)


def subset_indices(n: int, subset: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset (not the first rows: built-in splits are sorted by class)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])


# ------------------------------------------------------------------------------------------- models
def build_vae(cfg: PriorTrainConfig):
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=min(32, min(cfg.vae_channels)), sample_size=cfg.image_size,
        # A mid-block attention costs 40% of the step time at 8x8 and is not needed for digits.
        mid_block_add_attention=False,
    )


def build_transformer(cfg: PriorTrainConfig, num_classes: int, latent_size: int):
    if cfg.hidden_size % cfg.num_heads:
        raise SystemExit(f"--hidden-size {cfg.hidden_size} must be a multiple of --num-heads {cfg.num_heads}")
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.latent_channels,
        out_channels=2 * cfg.latent_channels if cfg.learned_variance else cfg.latent_channels,
        num_layers=cfg.depth, sample_size=latent_size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes,  # label table: num_classes + 1 rows, the last is the null class
    )
    dit_init_(model)
    return model


def dit_init_(model) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-Zero, zero output layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    with torch.no_grad():
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            # Each block starts as the identity: its modulation (and so its gates) are zero.
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


def disable_builtin_label_dropout(model) -> None:
    """diffusers drops labels inside every block's own LabelEmbedding, independently per block, in train().

    Classifier-free guidance needs the *whole* network to see the null class at once, so the training
    loop drops labels itself (one draw per sample) and the built-in per-block dropout is switched off.
    The table keeps its extra null row: its size was fixed when the model was built.
    """
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def share_embedders_(model) -> None:
    """Make every block use block 0's timestep + class embedder, as DiT's single ``t_embedder``/``y_embedder``.

    diffusers gives each block its own copy (its DiT-XL/2 conversion duplicates the shared one), which
    for a model trained from scratch means every block learns its own class table from its own gradient
    alone. Sharing them while training and writing copies at save time (:func:`untied_copy`) gives a
    standard diffusers checkpoint whose blocks hold identical embedders, like the converted DiT-XL/2.
    """
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untied_copy(model):
    """A copy whose blocks own separate (identical) embedders, so ``save_pretrained`` sees no shared tensors."""
    out = copy.deepcopy(model)
    for block in out.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(out.transformer_blocks[0].norm1.emb)
    return out


def standardize_latents_(vae, mean, std) -> None:
    """Fold a per-channel affine map into the VAE so that its latent channels have ``mean`` 0 and ``std`` 1.

    The posterior mean and log-variance come out of ``quant_conv`` (1x1) and the decoder starts with
    ``post_quant_conv`` (1x1), so z' = (z - mean) / std is absorbed exactly: the encoder's mean rows are
    rescaled and shifted, the log-variance offset by -2 log std, and the decoder's first conv undoes it.
    The decoded image of every latent is unchanged; the diffusion model sees balanced channels instead
    of one scalar ``scaling_factor`` stretching channels whose spreads differ several-fold.
    """
    c = vae.config.latent_channels
    mean = mean.to(vae.quant_conv.weight.device, torch.float32)
    std = std.to(vae.quant_conv.weight.device, torch.float32)
    with torch.no_grad():
        qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2c, 2c, 1, 1), (2c,)
        qw[:c] /= std.view(c, 1, 1, 1)
        qb[:c] = (qb[:c] - mean) / std
        qb[c:] -= 2 * torch.log(std)
        pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # (c, c, 1, 1), (c,)
        pb += (pw[:, :, 0, 0] @ mean)
        pw *= std.view(1, c, 1, 1)


# ------------------------------------------------------------------------------------------- diffusion loss
class DiffusionLoss:
    """DiT's training objective on one uniformly drawn timestep per sample.

    loss = MSE(eps, eps_hat) + L_vb, where L_vb (bits per dimension) is the KL between the true posterior
    q(x_{t-1} | x_t, x_0) and the model's Gaussian whose mean uses the *detached* eps_hat, so the bound
    trains only the variance (the learned-range interpolation between log beta_t and log beta_tilde_t).
    At t = 0 the bound's decoder term is a continuous Gaussian NLL of x_0 (latents are not 8-bit data,
    so DiT's discretised likelihood does not apply).
    """

    def __init__(self, train_steps: int, learned_variance: bool, device, snr_gamma: float = 0.0):
        s = schedule_from_betas(linear_betas(train_steps))

        def t32(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=torch.float32, device=device)

        self.train_steps = train_steps
        self.learned_variance = learned_variance
        self.sqrt_abar = t32(np.sqrt(s.alphas_cumprod))
        self.sqrt_one_minus_abar = t32(np.sqrt(1.0 - s.alphas_cumprod))
        self.coef1 = t32(s.posterior_mean_coef1)
        self.coef2 = t32(s.posterior_mean_coef2)
        self.log_beta = t32(np.log(s.betas))
        self.log_beta_tilde = t32(s.posterior_log_variance_clipped)
        # min-SNR-gamma (Hang et al. 2023) for epsilon prediction: weight min(SNR_t, gamma) / SNR_t,
        # which caps the weight of the nearly clean steps; 1 everywhere when off.
        snr = s.alphas_cumprod / (1.0 - s.alphas_cumprod)
        self.mse_weight = t32(np.minimum(snr, snr_gamma) / snr if snr_gamma > 0 else np.ones_like(snr))

    def __call__(self, model, x0, labels, generator=None):
        """Mean loss over the batch at random timesteps and noise: (loss, mse, vb) as 0-d tensors."""
        t = torch.randint(0, self.train_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        mse, vb = self.terms(model, x0, labels, t, noise)
        loss = (mse + vb).mean()
        return loss, mse.detach().mean(), vb.detach().mean()

    def terms(self, model, x0, labels, t, noise):
        """Per-sample (weighted mse, vb) at the given timesteps and noise; vb is zero for a fixed-variance model."""
        n, channels = x0.shape[0], x0.shape[1]

        def at(a):
            return a[t].view(n, 1, 1, 1)

        x_t = at(self.sqrt_abar) * x0 + at(self.sqrt_one_minus_abar) * noise
        out = model(x_t, timestep=t, class_labels=labels).sample
        eps = out[:, :channels]
        mse = (noise - eps).pow(2).mean(dim=(1, 2, 3)) * self.mse_weight[t]
        if not self.learned_variance:
            return mse, torch.zeros_like(mse)
        frac = (out[:, channels:] + 1) / 2
        model_log_var = frac * at(self.log_beta) + (1 - frac) * at(self.log_beta_tilde)
        # Stop-gradient on the mean: the bound trains the variance channels only (improved DDPM).
        x0_hat = (x_t - at(self.sqrt_one_minus_abar) * eps.detach()) / at(self.sqrt_abar)
        model_mean = at(self.coef1) * x0_hat + at(self.coef2) * x_t
        true_mean = at(self.coef1) * x0 + at(self.coef2) * x_t
        true_log_var = at(self.log_beta_tilde)
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean).pow(2) * torch.exp(-model_log_var))
        nll = 0.5 * (math.log(2 * math.pi) + model_log_var + (x0 - model_mean).pow(2) * torch.exp(-model_log_var))
        vb = torch.where(t.view(n, 1, 1, 1) == 0, nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)
        return mse, vb


# ------------------------------------------------------------------------------------------- training
def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(n: int, batch: int, rank: int, world: int, rng: np.random.Generator):
    """One epoch of index batches for this rank: a shared permutation, dealt round-robin to ranks."""
    order = rng.permutation(n)
    per_step = batch * world
    for start in range(0, n - per_step + 1 if n >= per_step else 1, per_step):
        chunk = order[start:start + per_step]
        yield chunk[rank::world]


class _Meter:
    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def means(self) -> dict:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        log(msg)


class _Run:
    """Per-worker run state: progress reports every epoch and a resumable checkpoint every few epochs.

    All ranks call :meth:`epoch_done` at the same points (Ray Train's ``report`` is collective); only
    rank 0 writes the checkpoint. After a crash (a worker, or the whole Ray instance), running the same
    command again resumes from the last checkpoint: the run name is a hash of the config.
    """
    def __init__(self, rank: int, every: int):
        self.rank, self.every = rank, every
        self.history: list[dict] = []
        self.state: dict = {}  # what the last checkpoint held ({} on a fresh run)
        self.extra: dict = {}  # written into every checkpoint from now on
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                if (Path(d) / "state.pt").is_file():
                    self.state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
                    self.history = self.state.get("history", [])

    def stage_summary(self, stage: str) -> tuple[dict, float]:
        """(the last epoch's row, total seconds) of a stage, over every invocation of a resumed run."""
        rows = [r for r in self.history if r["stage"] == stage]
        return (rows[-1] if rows else {}), sum(r.get("seconds", 0.0) for r in rows)

    def epoch_done(self, row: dict, state_fn=None, force: bool = False) -> None:
        self.history.append(row)
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
        checkpoint = None
        if state_fn is not None and (force or row["epoch"] % self.every == 0) and self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="prior-state-"))
            torch.save({**self.extra, **state_fn(), "history": self.history}, tmp / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics, checkpoint=checkpoint)


def _train_vae(cfg, pixels, device, rank, world, run: _Run):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # Training calls encode/decode, not forward, so DDP's wrapper would not sync anything: the
    # gradients are averaged by hand instead (same effect, one all-reduce per parameter).
    vae = build_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if run.state.get("stage") == "vae":
        vae.load_state_dict(run.state["vae"])
        opt.load_state_dict(run.state["vae_opt"])
        torch.set_rng_state(run.state["torch_rng"])
        start = run.state["epoch"]
        _say(rank, f"resuming the VAE after epoch {start}")
    steps_per_epoch = max(1, len(pixels) // (cfg.vae_batch_size * world))
    total = cfg.vae_epochs * steps_per_epoch
    pixels_per_image = 3 * cfg.image_size ** 2
    step, t0 = start * steps_per_epoch, time.perf_counter()
    for epoch in range(start, cfg.vae_epochs):
        meter, t_epoch = _Meter(), time.perf_counter()
        # The batch order of an epoch depends on (seed, stage, epoch) only, so a resumed run sees the same.
        for idx in _batches(len(pixels), cfg.vae_batch_size, rank, world, np.random.default_rng([cfg.seed, 0, epoch])):
            x = to_model_range(pixels[idx], device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            l1 = (recon - x).abs().mean()
            kl = posterior.kl().mean()  # summed over latent elements, averaged over images
            # SD's weighting: sum-over-pixels L1 + w * KL per image, here divided through by the pixel count.
            loss = l1 + cfg.vae_kl_weight * kl / pixels_per_image
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.vae_lr, cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _allreduce_grads(vae)
            opt.step()
            meter.add(l1=l1.item(), kl=kl.item())
            step += 1
            if step % cfg.log_every == 0 or step == total:
                m = meter.means()
                _say(rank, f"vae step {step}/{total} epoch {epoch + 1} l1 {m['l1']:.4f} kl {m['kl']:.1f} "
                           f"({(step - start * steps_per_epoch) / (time.perf_counter() - t0):.2f} it/s)")
        run.epoch_done(
            {"stage": "vae", "epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t_epoch,
             **meter.means()},
            lambda: {"stage": "vae", "epoch": epoch + 1, "vae": vae.state_dict(), "vae_opt": opt.state_dict(),
                     "torch_rng": torch.get_rng_state()},
            force=epoch + 1 == cfg.vae_epochs)
    last, seconds = run.stage_summary("vae")
    return vae, {"vae_final_epoch_l1": last.get("l1"), "vae_final_epoch_kl": last.get("kl"),
                 "vae_steps": step, "vae_seconds": seconds}


def _allreduce_grads(model) -> None:
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _encode_all(vae, pixels, device, batch: int = 256):
    """Posterior mean and std of every training image (unscaled latent space)."""
    means, stds = [], []
    vae.eval()
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            post = vae.encode(to_model_range(pixels[start:start + batch], device)).latent_dist
            means.append(post.mean.float())
            stds.append(post.std.float())
    return torch.cat(means), torch.cat(stds)


def _train_dit(cfg, latents, labels, num_classes, device, rank, world, run: _Run):
    mean, std, shift, scale = latents
    torch.manual_seed(cfg.seed + 1)
    dit = build_transformer(cfg, num_classes, mean.shape[-1]).to(device)
    disable_builtin_label_dropout(dit)
    if cfg.shared_embedder:
        share_embedders_(dit)
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    start = 0
    if run.state.get("stage") == "dit":
        dit.load_state_dict(run.state["dit"])
        ema.load_state_dict(run.state["ema"])
        opt.load_state_dict(run.state["dit_opt"])
        gen.set_state(run.state["generators"][rank])
        start = run.state["epoch"]
        _say(rank, f"resuming the DiT after epoch {start}")
    model = ray.train.torch.prepare_model(dit)
    loss_fn = DiffusionLoss(cfg.train_steps, cfg.learned_variance, device, cfg.snr_gamma)
    labels_t = torch.as_tensor(labels, device=device)
    steps_per_epoch = max(1, len(labels) // (cfg.batch_size * world))
    total = cfg.epochs * steps_per_epoch
    step, t0 = start * steps_per_epoch, time.perf_counter()
    for epoch in range(start, cfg.epochs):
        meter, t_epoch = _Meter(), time.perf_counter()
        for idx in _batches(len(labels), cfg.batch_size, rank, world, np.random.default_rng([cfg.seed, 1, epoch])):
            idx_t = torch.as_tensor(idx, device=device)
            # A fresh posterior sample each time (DiT samples the SD posterior), then shift and scale.
            z = mean[idx_t] + std[idx_t] * torch.randn(mean[idx_t].shape, device=device, generator=gen)
            x0 = (z - shift) * scale
            y = labels_t[idx_t]
            drop = torch.rand(y.shape, device=device, generator=gen) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, num_classes), y)
            loss, mse, vb = loss_fn(model, x0, y, generator=gen)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.lr, cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            # EMA with a warm-up, so a short run is not dominated by the random initial weights.
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), dit.parameters()):
                    pe.lerp_(p, 1 - decay)
            meter.add(loss=loss.item(), mse=mse.item(), vb=vb.item())
            if step % cfg.log_every == 0 or step == total:
                m = meter.means()
                _say(rank, f"dit step {step}/{total} epoch {epoch + 1} loss {m['loss']:.4f} mse {m['mse']:.4f} "
                           f"vb {m['vb']:.4f} ({(step - start * steps_per_epoch) / (time.perf_counter() - t0):.2f} it/s)")
        gens = _gather_generator_states(gen, world)
        run.epoch_done(
            {"stage": "dit", "epoch": epoch + 1, "step": step, "seconds": time.perf_counter() - t_epoch,
             **meter.means()},
            lambda: {"stage": "dit", "epoch": epoch + 1, "dit": dit.state_dict(), "ema": ema.state_dict(),
                     "dit_opt": opt.state_dict(), "generators": gens},
            force=epoch + 1 == cfg.epochs)
    last, seconds = run.stage_summary("dit")
    return ema, {"dit_final_epoch_loss": last.get("loss"), "dit_final_epoch_mse": last.get("mse"),
                 "dit_final_epoch_vb": last.get("vb"), "dit_steps": step, "dit_seconds": seconds}


def _gather_generator_states(gen, world: int) -> list:
    """Every rank's noise-generator state (rank 0 writes them all into the checkpoint)."""
    if world == 1:
        return [gen.get_state()]

    states = [None] * world
    dist.all_gather_object(states, gen.get_state())
    return states


def train_loop_per_worker(config: dict) -> None:
    """Both stages on one Ray Train worker; rank 0 saves the folder as the run's final checkpoint."""
    cfg = PriorTrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    pixels = ray.get(config["pixels"])
    labels = ray.get(config["labels"])
    num_classes = len(config["class_names"])
    run = _Run(rank, cfg.checkpoint_every)
    _say(rank, f"{len(pixels)} images, {num_classes} classes, {world} worker(s) on {device}, "
               f"{torch.get_num_threads()} threads each")
    summary: dict = dict(run.state.get("summary", {}))
    if cfg.vae:
        vae = AutoencoderKL.from_pretrained(cfg.vae).to(device)
        _say(rank, f"reusing the VAE in {cfg.vae}")
    elif run.state.get("stage") == "dit":
        vae = build_vae(cfg).to(device)
        vae.load_state_dict(run.state["vae"])
    else:
        vae, vae_summary = _train_vae(cfg, pixels, device, rank, world, run)
        summary.update(vae_summary)
    vae.eval().requires_grad_(False)

    mean, std = _encode_all(vae, pixels, device)
    if cfg.standardize_latents and run.state.get("stage") != "dit":  # (a resumed run has it folded in)
        standardize_latents_(vae, mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3)))
        mean, std = _encode_all(vae, pixels, device)
    shift = float(mean.mean())
    scale = float(1.0 / (mean - shift).std())  # posterior noise is tiny; the means carry the spread
    _say(rank, f"latents {tuple(mean.shape[1:])}: shift_factor {shift:.4f}, scaling_factor {scale:.4f}, "
               f"posterior std {float(std.mean()):.4f} (unscaled)")
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    # Every DiT checkpoint also carries the VAE and the summary so far: a resumed run needs nothing else.
    run.extra = {"vae": vae.state_dict(), "summary": dict(summary)}
    ema, dit_summary = _train_dit(cfg, (mean, std, shift, scale), labels, num_classes, device, rank, world, run)
    summary.update(dit_summary, scaling_factor=scale, shift_factor=shift)

    checkpoint = None
    if rank == 0:
        tmp = Path(tempfile.mkdtemp(prefix="prior-"))
        dtype = getattr(torch, cfg.save_dtype)
        vae.to("cpu", dtype).save_pretrained(tmp / "vae")
        untied_copy(ema).to("cpu", dtype).save_pretrained(tmp / "transformer")
        (tmp / "training.json").write_text(json.dumps(
            {"config": asdict(cfg), "class_names": config["class_names"], "num_images": len(pixels),
             "workers": world, "device": str(device), "summary": summary, "history": run.history}, indent=1))
        checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
    ray.train.report({"done": 1, **{k: v for k, v in summary.items() if v is not None}}, checkpoint=checkpoint)


# ------------------------------------------------------------------------------------------- driver
def run_name(cfg: PriorTrainConfig) -> str:
    """The same training settings give the same name, which is what lets a rerun resume."""
    ignored = ("out", "storage_path", "address", "log_every", "torch_threads")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    return "train-prior-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def train_prior(cfg: PriorTrainConfig) -> dict:
    """Run both stages through Ray Train and write ``cfg.out``/{vae, transformer, training.json, class_map.txt}."""
    if not cfg.out:
        raise SystemExit("--out is required")
    t0 = time.perf_counter()
    pixels, labels, class_names = load_training_images(cfg.data, cfg.image_size)
    if cfg.subset:
        keep = subset_indices(len(pixels), cfg.subset, cfg.seed)
        pixels, labels = pixels[keep], labels[keep]
    log(f"{cfg.data}: {len(pixels)} images at {cfg.image_size} px, {len(class_names)} classes "
          f"({time.perf_counter() - t0:.1f} s)")

    init_ray(cfg.address)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = {"yes": True, "no": False}.get(cfg.use_gpu, gpus >= cfg.workers)
    cpus = cfg.cpus_per_worker or max(1, int(resources.get("CPU", 1)) // cfg.workers)
    scaling = ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                            resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})})
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(cfg.storage_path).expanduser().resolve() if cfg.storage_path else out / ".ray_train"
    name = run_name(cfg)
    if (storage / name).is_dir():
        log(f"resuming from the checkpoints in {storage / name}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": asdict(cfg), "pixels": ray.put(pixels), "labels": ray.put(labels),
                           "class_names": class_names, "threads": 0 if use_gpu else (cfg.torch_threads or cpus)},
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    log(f"Ray Train: {cfg.workers} worker(s) x {cpus} CPU{', 1 GPU' if use_gpu else ''}")
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as ckpt:
        for part in ("vae", "transformer"):
            if (out / part).exists():
                shutil.rmtree(out / part)
            shutil.copytree(Path(ckpt) / part, out / part)
        record = json.loads((Path(ckpt) / "training.json").read_text())
    record["seconds_total"] = time.perf_counter() - t0
    (out / "training.json").write_text(json.dumps(record, indent=1))
    # `distill --set data.class_map=OUT/class_map.txt` feeds these ids to the prior for any folder names.
    (out / "class_map.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(class_names)))
    if not cfg.storage_path:
        shutil.rmtree(storage, ignore_errors=True)
    summary = record["summary"]
    log(f"wrote {out} in {record['seconds_total'] / 60:.1f} min: "
          + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    return record


def _command(args) -> int:
    fields = {f for f in PriorTrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "vae_channels" in values:
        values["vae_channels"] = tuple(values["vae_channels"])
    train_prior(PriorTrainConfig(**values))
    return 0


def register(subparsers) -> None:
    d = PriorTrainConfig()
    p = subparsers.add_parser(
        "train-prior",
        help="train a small class-conditional latent diffusion prior (AutoencoderKL + DiT) with Ray Train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=d.data, help="built-in dataset name or ImageFolder (root or root/train)")
    p.add_argument("--out", required=True, help="output folder (diffusers layout: transformer/, vae/)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("VAE")
    g.add_argument("--vae", default="", help="reuse this trained VAE folder instead of training one")
    g.add_argument("--vae-channels", type=int, nargs="+", default=list(d.vae_channels),
                   help="block_out_channels; n blocks downsample 2^(n-1)x")
    g.add_argument("--latent-channels", type=int, default=d.latent_channels)
    g.add_argument("--vae-epochs", type=int, default=d.vae_epochs)
    g.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size)
    g.add_argument("--vae-lr", type=float, default=d.vae_lr)
    g.add_argument("--vae-kl-weight", type=float, default=d.vae_kl_weight)
    g.add_argument("--no-standardize-latents", dest="standardize_latents", action="store_false",
                   help="keep the VAE's raw latent channels (only the scalar scaling/shift factors)")
    g = p.add_argument_group("DiT")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size)
    g.add_argument("--num-heads", type=int, default=d.num_heads)
    g.add_argument("--depth", type=int, default=d.depth)
    g.add_argument("--patch-size", type=int, default=d.patch_size)
    g.add_argument("--fixed-variance", dest="learned_variance", action="store_false",
                   help="predict epsilon only (out_channels = in_channels) instead of DiT's learned variance")
    g.add_argument("--no-shared-embedder", dest="shared_embedder", action="store_false",
                   help="train each block's own timestep/class embedder (diffusers' layout) instead of one")
    g.add_argument("--snr-gamma", type=float, default=d.snr_gamma, help="min-SNR-gamma loss weight; 0 = off")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split over workers)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--label-dropout", type=float, default=d.label_dropout)
    g = p.add_argument_group("Ray Train")
    g.add_argument("--workers", type=int, default=d.workers)
    g.add_argument("--address", default="", help="Ray cluster address (default: $RAY_ADDRESS, else a new local one)")
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker, help="0: cluster CPUs / workers")
    g.add_argument("--torch-threads", type=int, default=d.torch_threads,
                   help="torch threads per CPU worker (0: its CPUs; 1 is faster on a machine busy with other work)")
    g.add_argument("--use-gpu", choices=("auto", "yes", "no"), default=d.use_gpu)
    g.add_argument("--storage-path", default="", help="Ray Train storage (default OUT/.ray_train, removed after)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="epochs between checkpoints; rerunning the same command resumes from the last one")
    g.add_argument("--max-failures", type=int, default=d.max_failures)
    g.add_argument("--save-dtype", choices=("float32", "float16"), default=d.save_dtype)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--subset", type=int, default=0, help="train on N random images only (quick checks)")
    p.set_defaults(func=_command)
