"""Images/s of 50-step guided DiT-XL/2 sampling + VAE decode on one GPU, without Ray or downloads.

Random-init DiT-XL/2 (28 layers, hidden 1152 = 16 x 72, patch 2, 4 x 32 x 32 latents, learned sigma)
and an SD-VAE-shaped AutoencoderKL (block_out_channels 128/256/512/512, 2 layers per block): the
weights do not matter for speed. Runs ``GuidedSampler.sample`` (the production path) for each
guidance mode and batch size and prints images/s, achieved TFLOP/s against the ~23.7 TFLOP per image (11.9 T multiply-adds)
of 50 CFG steps at 256 px, and peak GPU memory.

    python bench/gpu_sampler.py                    # CUDA, bf16 autocast, batches 8..256
    python bench/gpu_sampler.py --smoke            # tiny sizes on CPU (tests call this)

The GPU machine has no diffusers: carry a pure-Python copy and point PYTHONPATH at it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, which holds an unrelated pipeline.py

import torch  # noqa: E402

# The DiT paper's 118.6 "GFLOPs" per forward counts multiply-adds; GPU peaks count FLOPs (2 per MAC).
# torch's FLOP counter gives 237.3e9 (bench/gpu.py --count-flops, tests/test_bench_gpu.py).
DIT_XL_FLOPS_PER_FORWARD = 2 * 118.6e9  # per image per forward, 256 px
H200_BF16_DENSE_TFLOPS = 989.0

XL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, patch_size=2,
          in_channels=4, out_channels=8, num_embeds_ada_norm=1000)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              sample_size=256)
TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, patch_size=2,
            in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_num_groups=4)
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                sample_size=16)


def build_prior(dit_kwargs: dict, vae_kwargs: dict | None, device: str, dtype=torch.float32, seed: int = 0):
    """Random-init transformer (+ VAE) wrapped as a Prior, built directly on ``device``."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    from pipeline.models.loading import describe_prior

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (no fp32 copy, no cast)
    try:
        with torch.device(device):
            dit = DiTTransformer2DModel(**dit_kwargs).eval().requires_grad_(False)
            vae = AutoencoderKL(**(vae_kwargs or TINY_VAE)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    return describe_prior(dit, vae, model_id="random-init", vae_id="random-init")


def guidance_inputs(n: int, latent_dim: int, n_guided: int, dim: int, device, seed: int = 0):
    """Random centroids (n, D) and per-step orthonormal bases (n, S, D, d), as the pipeline passes them.

    S = n_guided may be 0 (a run too short to reach a guided step, e.g. a 2-step warm-up): the bases are
    then (n, 0, D, d), which the sampler accepts."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = torch.randn((n, latent_dim), generator=g)
    if n_guided == 0:
        return centroids.to(device), torch.zeros((n, 0, latent_dim, dim), device=device)
    bases, _ = torch.linalg.qr(torch.randn((n, n_guided, latent_dim, dim), generator=g))  # CPU: batched
    return centroids.to(device), bases.to(device)


WARM_STEPS = 2  # a warm-up per batch shape: kernels and allocator blocks, no guided step (t_stop = 1)


def sample_once(prior, mode: str, n: int, steps: int, device: str, tangent_dim: int = 3) -> float:
    """Seconds of one ``GuidedSampler.sample`` call of ``n`` images (the device synchronised around it)."""
    from pipeline.models.sampler import GuidedSampler, SamplerConfig

    cfg = SamplerConfig(num_steps=steps, guidance=mode, t_stop=max(steps // 2, 0), max_batch=n)
    sampler = GuidedSampler(prior, cfg)
    c, u = guidance_inputs(n, prior.latent_dim, cfg.num_guided_steps, tangent_dim, device)
    _sync(device)
    start = time.perf_counter()
    images = sampler.sample(1, range(n), c if mode != "none" else None, u if mode == "manifold" else None)
    _sync(device)
    assert images.shape[0] == n
    return time.perf_counter() - start


def guidance_ratio(prior, batch: int, modes, *, steps: int, device: str, rounds: int = 3,
                   warm_steps: int = WARM_STEPS) -> dict:
    """Time of each guided mode over unguided ("none") at one batch size.

    Every mode first gets a warm-up at this shape, then the modes run interleaved (none, mode, manifold,
    none, ...) for ``rounds`` rounds, so drift and one-time costs fall on all of them alike; the ratio is
    of the medians. Returns {"batch", "seconds": {mode: [...]}, "ratio": {mode: median / median(none)},
    "peak_gib"}."""
    import statistics

    modes = ["none"] + [m for m in modes if m != "none"]
    cuda = torch.device(device).type == "cuda"
    for mode in modes:
        sample_once(prior, mode, batch, warm_steps, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            seconds[mode].append(sample_once(prior, mode, batch, steps, device))
    median = {m: statistics.median(v) for m, v in seconds.items()}
    ratio = {m: median[m] / median["none"] for m in modes if m != "none"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    for mode, r in ratio.items():
        print(f"time {mode}/none at batch {batch}: {r:.3f} (medians {median[mode]:.3f} s / {median['none']:.3f} s "
              f"of {rounds} interleaved rounds)", flush=True)
    return {"batch": batch, "seconds": seconds, "ratio": ratio, "peak_gib": peak}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(batches, modes, *, steps: int, device: str, prior, tangent_dim: int = 3, repeats: int = 1,
        warm_steps: int = WARM_STEPS):
    """images/s of each (mode, batch), each shape warmed up first (``warm_steps`` steps; 0: no warm-up)."""
    cuda = torch.device(device).type == "cuda"
    results = []
    for mode in modes:
        for n in batches:
            if warm_steps:
                sample_once(prior, mode, n, warm_steps, device, tangent_dim)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            best = min(sample_once(prior, mode, n, steps, device, tangent_dim) for _ in range(repeats))
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            ips = n / best
            is_xl = prior.transformer.config.num_layers == XL["num_layers"] and prior.latent_shape[1] == 32
            flops = 2 * steps * DIT_XL_FLOPS_PER_FORWARD if is_xl else float("nan")  # CFG: 2 forwards per step
            row = {"guidance": mode, "batch": n, "seconds": best, "images_per_s": ips,
                   "tflops": ips * flops / 1e12, "peak_gib": peak}
            results.append(row)
            print(f"{mode:9s} batch {n:4d}: {best:8.2f} s  {ips:8.2f} images/s  "
                  f"{row['tflops']:7.1f} TFLOP/s (DiT only)  peak {peak:6.1f} GiB", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps (for tests)")
    ap.add_argument("--batches", default="8,16,32,64,128,256")
    ap.add_argument("--modes", default="none,mode,manifold")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if args.smoke:
        prior = build_prior(TINY, TINY_VAE, "cpu")
        results = run([2, 4], modes, steps=3, device="cpu", prior=prior)
        if "none" in modes and len(modes) > 1:
            guidance_ratio(prior, 2, modes, steps=3, device="cpu", rounds=1)
        return results
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --smoke for the CPU path")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}")
    start = time.perf_counter()
    prior = build_prior(XL, SD_VAE, args.device, dtype=torch.bfloat16)
    print(f"random-init DiT-XL/2 + SD-VAE in bf16 built in {time.perf_counter() - start:.1f} s; "
          f"image {prior.image_size} px, latents {prior.latent_shape}")
    print("--- measured (each shape warmed up first) ---")
    results = run([int(b) for b in args.batches.split(",")], modes, steps=args.steps, device=args.device,
                  prior=prior)
    best = max(r["tflops"] for r in results)
    print(f"best: {best:.0f} TFLOP/s of DiT work = {100 * best / H200_BF16_DENSE_TFLOPS:.0f}% of the "
          f"H200's {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s dense bf16 (decode and guidance are extra work)")
    if "none" in modes and len(modes) > 1:
        guidance_ratio(prior, 64, modes, steps=args.steps, device=args.device)
    return results


if __name__ == "__main__":
    main()
