"""CPU benchmark of the guided sampler: what batching buys, and what guidance costs per step.

1. Per-image time at batch 1 (what the public MGD3 / ManifoldGD code does: one image at a time)
   against batch 10 and 50, on the tiny test-sized DiT (50 steps, decode included) and on a
   random-init DiT-XL/2-shaped model (1 step, CFG on; batch 1 and 4 only: one XL forward of 8
   rows takes most of a minute on 2 cores).
2. Guidance overhead per step at the DiT-XL/2 shape (4 x 32 x 32 latents, d = 3 tangent basis):
   the extra time of a manifold-guided ``denoise_step`` over an unguided one, against one
   unguided step (model forward included) at the same batch. Timing whole XL steps twice and
   dividing would drown a < 3% effect in the noise of a shared 2-core machine.

    .venv/bin/python bench/sampler.py            # about 3-5 minutes on 2 cores
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, which holds an unrelated pipeline.py

import torch  # noqa: E402

from pipeline.sampler import GuidanceState, GuidedSampler, SamplerConfig, denoise_step  # noqa: E402


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_sampler", Path(__file__).with_name("gpu_sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_image_seconds(prior, batch: int, steps: int, repeats: int, decode: bool = True) -> float:
    sampler = GuidedSampler(prior, SamplerConfig(num_steps=steps, max_batch=batch))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        latents = sampler.sample_latents(1, range(batch))
        if decode:
            sampler.decode(latents)
        best = min(best, time.perf_counter() - start)
    return best / batch


def batching_table(name, prior, batches, steps, repeats, decode=True):
    print(f"\n{name}: per-image time, {steps} DDPM step(s) with CFG" + (" + decode" if decode else ""))
    base = None
    for b in batches:
        t = per_image_seconds(prior, b, steps, repeats, decode)
        base = base or t
        print(f"  batch {b:3d}: {t * 1e3:10.2f} ms/image   speed-up vs batch 1: {base / t:5.2f}x", flush=True)


def guidance_overhead(prior, batch: int, repeats: int = 200):
    """Extra seconds of one manifold-guided step over a plain one, and one plain step's full time."""
    gpu = _gpu_bench()
    sampler = GuidedSampler(prior, SamplerConfig(num_steps=50))
    x = sampler.initial_noise(1, range(batch))
    start = time.perf_counter()
    eps, var = sampler.predict(x, 1, int(sampler.schedule.timesteps[40]))  # CFG model call, 2*batch rows
    forward = time.perf_counter() - start
    c, u = gpu.guidance_inputs(batch, prior.latent_dim, 24, 3, "cpu")
    z = torch.randn_like(x)
    modes = {"none": None,
             "mode": GuidanceState("mode", c, None, 0.1),
             "manifold": GuidanceState("manifold", c, u[:, 0], 0.1)}
    cost = {}
    for name, state in modes.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            denoise_step(sampler.schedule, 40, x, eps, var, noise=z, guidance=state)
            best = min(best, time.perf_counter() - t0)
        cost[name] = best
    step = forward + cost["none"]
    print(f"\nguidance overhead per step at the DiT-XL/2 shape, batch {batch} (d = 3):")
    print(f"  model forward (CFG, {2 * batch} rows): {forward:8.3f} s;  update maths: none {cost['none'] * 1e3:.3f} ms, "
          f"mode {cost['mode'] * 1e3:.3f} ms, manifold {cost['manifold'] * 1e3:.3f} ms")
    for name in ("mode", "manifold"):
        print(f"  step time {name}/none: {(step + cost[name] - cost['none']) / step:.5f}  (target <= 1.03)")


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gpu = _gpu_bench()
    tiny = gpu.build_prior(gpu.TINY, gpu.TINY_VAE, "cpu")
    batching_table("tiny DiT (2 layers, hidden 32, 4x8x8 latents)", tiny, [1, 10, 50], steps=50, repeats=3)
    start = time.perf_counter()
    xl = gpu.build_prior(gpu.XL, gpu.TINY_VAE, "cpu")  # decode excluded at XL: the tiny VAE is not SD's
    print(f"\nrandom-init DiT-XL/2 built in {time.perf_counter() - start:.1f} s (fp32, CPU)")
    batching_table("DiT-XL/2 shape (28 layers, hidden 1152, 4x32x32 latents)", xl, [1, 4], steps=1,
                   repeats=1, decode=False)
    guidance_overhead(xl, batch=4)


if __name__ == "__main__":
    main()
