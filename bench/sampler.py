"""CPU benchmark of the guided sampler: what batching buys, and what guidance costs per step.

1. Per-image time at batch 1 (what the public MGD3 / ManifoldGD code does: one image at a time)
   against batch 10 and 50, on the tiny test-sized DiT (50 steps, decode included) and on a
   random-init DiT-XL/2-shaped model (1 step, CFG on; batch 1 and 4 only: one XL forward of 8
   rows takes 10-30 s on 2 shared cores). Best of several rounds, batch sizes interleaved.
2. Guidance overhead per step at the DiT-XL/2 shape (4 x 32 x 32 latents, d = 3 tangent basis):
   the extra time of a manifold-guided ``denoise_step`` over an unguided one, against one
   unguided step (model forward included) at the same batch. Timing whole XL steps twice and
   dividing would drown a < 3% effect in the noise of a shared 2-core machine.

    .venv/bin/python bench/sampler.py            # 1-3 minutes on 2 cores, longer when shared
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, which holds an unrelated pipeline.py

import torch  # noqa: E402

from pipeline.models.sampler import GuidanceState, GuidedSampler, SamplerConfig, denoise_step  # noqa: E402


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_sampler", Path(__file__).with_name("gpu_sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batching_table(name, prior, batches, steps, repeats, decode=True):
    """Per-image seconds by batch size: the best of ``repeats`` rounds, batch sizes taken in turn so
    that a busy neighbour on a shared machine slows them alike (the first round also warms up)."""
    print(f"\n{name}: per-image time, {steps} DDPM step(s) with CFG" + (" + decode" if decode else ""))
    best = dict.fromkeys(batches, float("inf"))
    for _ in range(repeats):
        for b in batches:
            sampler = GuidedSampler(prior, SamplerConfig(num_steps=steps, max_batch=b))
            start = time.perf_counter()
            latents = sampler.sample_latents(1, range(b))
            if decode:
                sampler.decode(latents)
            best[b] = min(best[b], (time.perf_counter() - start) / b)
    for b in batches:
        print(f"  batch {b:3d}: {best[b] * 1e3:10.2f} ms/image   speed-up vs batch 1: {best[batches[0]] / best[b]:5.2f}x")


def guidance_overhead(prior, batch: int, repeats: int = 500):
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
    cost = dict.fromkeys(modes, float("inf"))
    for _ in range(repeats):  # round-robin, so a busy neighbour slows every mode alike
        for name, state in modes.items():
            t0 = time.perf_counter()
            denoise_step(sampler.schedule, 40, x, eps, var, noise=z, guidance=state)
            cost[name] = min(cost[name], time.perf_counter() - t0)
    step = forward + cost["none"]
    print(f"\nguidance overhead per step at the DiT-XL/2 shape, batch {batch} (d = 3):")
    print(f"  model forward (CFG, {2 * batch} rows): {forward:8.3f} s;  update maths: none {cost['none'] * 1e3:.3f} ms, "
          f"mode {cost['mode'] * 1e3:.3f} ms, manifold {cost['manifold'] * 1e3:.3f} ms")
    for name in ("mode", "manifold"):
        extra = cost[name] - cost["none"]
        print(f"  step time {name}/none: {(step + extra) / step:.6f}  (+{extra * 1e3:.3f} ms; target <= 1.03)")
    # On a GPU the forward is ~1e4 times faster; the guidance maths is a few elementwise kernels plus
    # two (n, D) x (n, D, d) batched products, so the ratio stays small there too (bench/gpu_sampler.py).


def noise_draw_cost(latent_shape, batches=(8, 64, 256), repeats=5):
    """CPU time to draw one step's noise from the per-sample generators (the price of batch-free noise).

    On a GPU this overlaps the model forward, whose kernels are already queued when it runs.
    """
    from pipeline.models.noise import NoiseStreams

    print(f"\nper-step noise draw from per-sample CPU generators, latents {latent_shape}:")
    for b in batches:
        streams = NoiseStreams(0, 1, range(b), latent_shape)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            streams.draw()
            best = min(best, time.perf_counter() - t0)
        print(f"  batch {b:3d}: {best * 1e3:7.2f} ms per step ({best / b * 1e6:5.1f} us per sample)")


def main():
    torch.manual_seed(0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load} on {os.cpu_count()} cores")
    gpu = _gpu_bench()
    tiny = gpu.build_prior(gpu.TINY, gpu.TINY_VAE, "cpu")
    batching_table("tiny DiT (2 layers, hidden 32, 4x8x8 latents)", tiny, [1, 10, 50], steps=50, repeats=5)
    start = time.perf_counter()
    xl = gpu.build_prior(gpu.XL, gpu.TINY_VAE, "cpu")  # decode excluded at XL: the tiny VAE is not SD's
    print(f"\nrandom-init DiT-XL/2 built in {time.perf_counter() - start:.1f} s (fp32, CPU)")
    batching_table("DiT-XL/2 shape (28 layers, hidden 1152, 4x32x32 latents)", xl, [1, 4], steps=1,
                   repeats=2, decode=False)
    guidance_overhead(xl, batch=4)
    noise_draw_cost(xl.latent_shape)


if __name__ == "__main__":
    main()
