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

Where the parts live: ``config.py`` (the settings and the run name), ``nets.py`` (the two networks and
DiT's set-up of them), ``loss.py`` (the diffusion objective), ``loop.py`` (the one training loop both
stages share: schedule, batches, resume, checkpoints), ``stages.py`` (what each stage's step computes);
this file loads the data, runs both stages on each Ray Train worker, and is the driver and the CLI.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from diffusers import AutoencoderKL
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.common.images import crop_images
from pipeline.common.log import get_logger
from pipeline.common.ray_start import init_ray
from pipeline.inputs import datasets
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import list_imagefolder
from pipeline.prior.config import PriorTrainConfig, run_name
from pipeline.prior.loop import Run
from pipeline.prior.nets import build_vae, standardize_latents_, untied_copy
from pipeline.prior.stages import encode_all, train_dit, train_vae

log = get_logger("train-prior").info


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
    # the original folder names (not the listing's encoded ones): class_map.txt is matched against them
    return np.stack(pixels), np.asarray(labels, dtype=np.int64), [listing.source_label(c) for c in listing.classes]


def subset_indices(n: int, subset: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset (not the first rows: built-in splits are sorted by class)."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:subset])


# ------------------------------------------------------------------------------------------- Ray Train worker
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
    run = Run(rank, cfg.checkpoint_every)
    run.say(f"{len(pixels)} images, {num_classes} classes, {world} worker(s) on {device}, "
            f"{torch.get_num_threads()} threads each")
    summary: dict = dict(run.state.get("summary", {}))
    if cfg.vae:
        vae = AutoencoderKL.from_pretrained(cfg.vae).to(device)
        run.say(f"reusing the VAE in {cfg.vae}")
    elif run.state.get("stage") == "dit":
        vae = build_vae(cfg).to(device)
        vae.load_state_dict(run.state["vae"])
    else:
        vae, vae_summary = train_vae(cfg, pixels, device, world, run)
        summary.update(vae_summary)
    vae.eval().requires_grad_(False)

    mean, std = encode_all(vae, pixels, device)
    if cfg.standardize_latents and run.state.get("stage") != "dit":  # (a resumed run has it folded in)
        standardize_latents_(vae, mean.mean(dim=(0, 2, 3)), mean.std(dim=(0, 2, 3)))
        mean, std = encode_all(vae, pixels, device)
    shift = float(mean.mean())
    scale = float(1.0 / (mean - shift).std())  # posterior noise is tiny; the means carry the spread
    run.say(f"latents {tuple(mean.shape[1:])}: shift_factor {shift:.4f}, scaling_factor {scale:.4f}, "
            f"posterior std {float(std.mean()):.4f} (unscaled)")
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    # Every DiT checkpoint also carries the VAE and the summary so far: a resumed run needs nothing else.
    run.extra = {"vae": vae.state_dict(), "summary": dict(summary)}
    ema, dit_summary = train_dit(cfg, (mean, std, shift, scale), labels, num_classes, device, rank, world, run)
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
def cpus_per_worker(workers: int) -> int:
    """CPUs per Ray Train worker: an even share of the cluster's CPUs, but never more than the largest
    node has (a worker runs on one node: asking two 8-CPU nodes for one 16-CPU worker never schedules)."""
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    largest = int(max(nodes, default=1))
    return max(1, min(largest, int(ray.cluster_resources().get("CPU", 1)) // workers))


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
    cpus = cfg.cpus_per_worker or cpus_per_worker(cfg.workers)
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
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker,
                   help="0: cluster CPUs / workers, at most the largest node's")
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
