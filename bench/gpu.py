"""GPU check of every hot stage, without Ray: VAE encode, guided DiT-XL/2 sampling, divisive clustering,
tangent bases. Random-init models (the weights do not matter for speed), synthetic class latents.

1. VAE encode at 256 px: SD-VAE-shaped AutoencoderKL (128/256/512/512, 2 layers per block, 4 latent
   channels), bf16, through ``pipeline.distill.encode.encode_pixels`` (the production path: uint8 pixels in,
   flattened latents out on the host); batches 32..256; images/s, TFLOP/s against ~0.27 TFLOP per image.
2. DiT-XL/2, 50 DDPM steps with CFG, guidance none / mode / manifold, bf16, batches 8..256:
   ``bench/gpu_sampler.py``'s ``run`` (imported, not copied), which calls ``GuidedSampler.sample``.
3. Divisive clustering of one 1,300 x 4,096 class: ``ops.clustering.divisive_kmeans`` (50 leaves) and
   ``select_ipc_nodes`` (IPC 10 and 50) with X as a CuPy array against the same call on numpy; time and
   the leaf partition's SSE (float64, on the host) for both, which must agree.
4. Tangent bases for the 50 IPC-50 centroids: ``ops.tangent.tangent_basis`` of each centroid's 12 nearest
   class latents (d = 3), and the pipeline's radius-annealed ``annealed_bases`` (24 guided steps), CuPy
   against numpy; time and the largest principal angle between the two backends' subspaces.

Peak GPU memory for each: torch's allocator peak (sections 1-2), CuPy's memory-pool high-water (3-4:
bytes the pool holds after the call, which it keeps until freed: an upper bound on the live peak).

    python bench/gpu.py                 # CUDA + CuPy; about 3-5 minutes on one H200
    python bench/gpu.py --smoke         # tiny sizes on the CPU, numpy on both sides (tests call this)
    python bench/gpu.py --sections cluster,tangent
    python bench/gpu.py --count-flops   # FLOP per image of each model at 256 px (meta tensors, any machine)

The GPU machine has no diffusers, Ray or scikit-learn: carry a pure-Python diffusers and point PYTHONPATH
at it (docs/sampler.md, docs/scale.md).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# bench/ holds ops.py: keep it off the path so `ops` is the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

VAE_ENCODE_TFLOP_PER_IMAGE = 0.273  # SD-VAE encoder at 256 px (torch.utils.flop_counter, 2 per multiply-add)
DIT_XL_FORWARD_FLOP = 237.3e9       # DiT-XL/2 at 256 px, one image, one forward (same counter)
H200_PEAK_TFLOPS = 989.0            # dense bf16
SECTIONS = ("vae", "dit", "cluster", "tangent")


def _load_bench(name: str):
    """Import a sibling bench script as a module (bench/ is not a package and shadows `ops`)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def latent_like_fn():
    """``latent_like`` from bench/ops.py, so both benches cluster the same synthetic class.

    bench/ops.py imports scikit-learn at module level, which the GPU machine lacks; so only that one
    function's source is compiled here (it needs numpy alone).
    """
    source = (HERE.parent / "ops.py").read_text()
    fn = next(node for node in ast.parse(source).body
              if isinstance(node, ast.FunctionDef) and node.name == "latent_like")
    namespace = {"np": np}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(HERE.parent / "ops.py"), "exec"), namespace)
    return namespace["latent_like"]


# ------------------------------------------------------------------------------------- backends
class Backend:
    """The array module under test ("gpu": CuPy; the smoke path: numpy) and how to time and weigh it."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        if gpu:
            import cupy

            self.xp = cupy
            self.pool = cupy.get_default_memory_pool()
        else:
            self.xp, self.pool = np, None

    @property
    def name(self) -> str:
        return "cupy" if self.gpu else "numpy"

    def asarray(self, x):
        return self.xp.asarray(x)

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.Device().synchronize()

    def reset_peak(self) -> None:
        if self.gpu:
            self.sync()
            self.pool.free_all_blocks()

    def peak_gib(self) -> float:
        return self.pool.total_bytes() / 2**30 if self.gpu else float("nan")


def timed(fn, backend: Backend | None = None, repeats: int = 1):
    """(best seconds, last result); synchronises the device around each call."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if backend:
            backend.sync()
        start = time.perf_counter()
        out = fn()
        if backend:
            backend.sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def partition_sse(X: np.ndarray, labels: np.ndarray) -> float:
    """SSE of a partition in float64 on the host (the same yardstick for both backends)."""
    X = X.astype(np.float64)
    total = 0.0
    for k in np.unique(labels):
        rows = X[labels == k]
        total += float(((rows - rows.mean(axis=0)) ** 2).sum())
    return total


def max_principal_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle between the column spaces of two orthonormal (D, d) bases, in degrees.

    From the sine (the part of b outside span(a)), not arccos of the cosines, which cannot resolve
    angles below ~0.03 degrees when the bases are float32."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sines = np.linalg.svd(b - a @ (a.T @ b), compute_uv=False)
    return float(np.degrees(np.arcsin(min(float(sines.max()), 1.0))))


# ---------------------------------------------------------------------------------- 1 VAE encode
def bench_vae(vae, batches, image_px: int, device: str, repeats: int) -> list[dict]:
    import torch

    from pipeline.distill.encode import encode_pixels

    cuda = device == "cuda"
    dtype = next(vae.parameters()).dtype
    rng = np.random.default_rng(0)
    rows = []
    encode_pixels(vae, rng.integers(0, 256, (2, image_px, image_px, 3), dtype=np.uint8), device, dtype)  # warm-up
    for n in batches:
        pixels = rng.integers(0, 256, (n, image_px, image_px, 3), dtype=np.uint8)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # encode_pixels ends with .cpu(): the host copy synchronises, so the wall clock is the whole call
        seconds, latents = timed(lambda: encode_pixels(vae, pixels, device, dtype), repeats=repeats)
        ips = n / seconds
        row = {"batch": n, "seconds": seconds, "images_per_s": ips,
               "tflops": ips * VAE_ENCODE_TFLOP_PER_IMAGE if image_px == 256 else float("nan"),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
               "latent_dim": int(latents.shape[1]), "finite": bool(np.isfinite(latents).all())}
        rows.append(row)
        print(f"vae encode {image_px}px batch {n:4d}: {seconds:7.3f} s  {ips:8.1f} images/s  "
              f"{row['tflops']:6.1f} TFLOP/s  peak {row['peak_gib']:6.1f} GiB", flush=True)
    return rows


# -------------------------------------------------------------------------------- 3 clustering
def bench_cluster(X: np.ndarray, gpu: Backend, host: Backend, leaves: int, ipcs, repeats: int) -> list[dict]:
    import warnings

    from ops.clustering import divisive_kmeans
    from ops.selection import select_ipc_nodes

    Xd = gpu.asarray(X)
    rows = []
    jobs = [(f"divisive_kmeans {leaves} leaves", lambda A: divisive_kmeans(A, leaves, seed=0)[0])]
    jobs += [(f"select_ipc_nodes ipc {ipc} ({2 * ipc} leaves)",
              lambda A, ipc=ipc: select_ipc_nodes(A, ipc, seed=0).tree.leaf_labels()) for ipc in ipcs]
    for label, job in jobs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny smoke classes may warn about too few points
            t_host, lab_host = timed(lambda: job(X), host, repeats)
            job(Xd)  # warm-up: kernel compilation and the memory pool
            gpu.reset_peak()
            t_dev, lab_dev = timed(lambda: job(Xd), gpu, repeats)
        sse_host, sse_dev = partition_sse(X, np.asarray(lab_host)), partition_sse(X, np.asarray(lab_dev))
        row = {"job": label, "numpy_s": t_host, f"{gpu.name}_s": t_dev, "device_s": t_dev,
               "speedup": t_host / t_dev, "sse_numpy": sse_host, "sse_device": sse_dev,
               "sse_ratio": sse_dev / sse_host, "leaves": int(len(np.unique(lab_dev))),
               "peak_gib": gpu.peak_gib()}
        rows.append(row)
        print(f"{label:34s} {X.shape[0]} x {X.shape[1]}: numpy {t_host:7.3f} s  {gpu.name} {t_dev:7.3f} s  "
              f"speedup {row['speedup']:5.2f}x  SSE {gpu.name}/numpy {row['sse_ratio']:.5f}  "
              f"pool peak {row['peak_gib']:.2f} GiB", flush=True)
    return rows


# ------------------------------------------------------------------------------ 4 tangent bases
def _stacked(bases) -> np.ndarray:
    """One centroid's bases as a host (M, D, d) array: a single (D, d) basis becomes M = 1."""
    bases = np.asarray(bases.get() if hasattr(bases, "get") else bases)
    return bases[None] if bases.ndim == 2 else bases


def bench_tangent(X: np.ndarray, centroids: np.ndarray, gpu: Backend, host: Backend, *, k: int, dim: int,
                  guided_steps: int, warm_steps: int, repeats: int) -> list[dict]:
    from ops.tangent import annealed_bases, default_radius, neighbourhood, tangent_basis

    def knn_bases(A, C):
        return [tangent_basis(A[neighbourhood(A, c, 0.0, min_count=k)], dim) for c in C]

    def annealed(A, C):
        # as pipeline/distill/plan.py does: the radius is the distance to the K-th nearest latent
        return [annealed_bases(A, c, dim=dim, radius=default_radius(A, c, k), n_steps=guided_steps,
                               warm_steps=warm_steps, max_neighbours=256)[0] for c in C]

    Xd, Cd = gpu.asarray(X), gpu.asarray(centroids)
    rows = []
    for label, job in ((f"tangent_basis knn {k}, d {dim}", knn_bases),
                       (f"annealed_bases {guided_steps} steps", annealed)):
        job(X, centroids[:1])  # warm-up: first-call imports and allocations, on both sides
        job(Xd, Cd[:1])
        t_host, b_host = timed(lambda: job(X, centroids), host, repeats)
        gpu.reset_peak()
        t_dev, b_dev = timed(lambda: job(Xd, Cd), gpu, repeats)
        flat = [(h, d) for hs, ds in zip(b_host, b_dev) for h, d in zip(_stacked(hs), _stacked(ds))]
        angle = max(max_principal_angle_deg(h, d) for h, d in flat)
        ortho = max(float(np.abs(d.T.astype(np.float64) @ d - np.eye(d.shape[1])).max()) for _, d in flat)
        row = {"job": label, "centroids": len(centroids), "bases": len(flat), "numpy_s": t_host,
               "device_s": t_dev, "speedup": t_host / t_dev, "max_angle_deg": angle,
               "orthonormality_error": ortho, "peak_gib": gpu.peak_gib()}
        rows.append(row)
        print(f"{label:34s} {len(centroids)} centroids, {len(flat)} bases: numpy {t_host:7.3f} s  "
              f"{gpu.name} {t_dev:7.3f} s  speedup {row['speedup']:5.2f}x  max angle {angle:.2e} deg  "
              f"pool peak {row['peak_gib']:.3f} GiB", flush=True)
    return rows


# ------------------------------------------------------------------------------------ FLOP count
def count_flops(dit_kwargs: dict, vae_kwargs: dict, image_px: int) -> dict:
    """FLOP per image (2 per multiply-add, as GPU peaks are quoted) of a VAE encode, a VAE decode and
    one DiT forward, counted by torch.utils.flop_counter on meta tensors: no memory, no compute, no GPU."""
    import torch
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_kwargs).eval()
        dit = DiTTransformer2DModel(**dit_kwargs).eval()
        image = torch.empty(1, 3, image_px, image_px)
        counts = {}
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                latent = vae.encode(image).latent_dist.mean
            counts["vae_encode"] = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                vae.decode(latent)
            counts["vae_decode"] = counter.get_total_flops()
            zeros = torch.zeros(1, dtype=torch.long)
            with FlopCounterMode(display=False) as counter:
                dit(torch.empty(1, dit_kwargs["in_channels"], dit_kwargs["sample_size"], dit_kwargs["sample_size"]),
                    timestep=zeros, class_labels=zeros)
            counts["dit_forward"] = counter.get_total_flops()
    return counts


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, numpy on both sides")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--vae-batches", default="32,64,128,256")
    ap.add_argument("--dit-batches", default="8,16,32,64,128,256")
    ap.add_argument("--modes", default="none,mode,manifold")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--count-flops", action="store_true",
                    help="print FLOP per image of VAE encode/decode and a DiT-XL/2 forward at 256 px, then exit")
    args = ap.parse_args(argv)
    if args.count_flops:
        sampler_bench = _load_bench("gpu_sampler")
        big = not args.smoke
        counts = count_flops(sampler_bench.XL if big else sampler_bench.TINY,
                             sampler_bench.SD_VAE if big else sampler_bench.TINY_VAE, 256 if big else 16)
        per_image = 2 * args.steps * counts["dit_forward"] + counts["vae_decode"]
        print(f"FLOP per image (2 per multiply-add): VAE encode {counts['vae_encode'] / 1e12:.3f} T, "
              f"VAE decode {counts['vae_decode'] / 1e12:.3f} T, DiT forward {counts['dit_forward'] / 1e9:.1f} G; "
              f"{args.steps} CFG steps + decode = {per_image / 1e12:.2f} T per generated image")
        return {"flops": counts}
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    start = time.perf_counter()
    results: dict = {"smoke": args.smoke}

    if args.smoke:
        device, image_px, vae_batches, dit_batches, steps = "cpu", 16, [2, 4], [2], 3
        n, d, leaves, ipcs, modes_n, k = 120, 64, 8, [2, 4], 6, 6
    else:
        device, image_px, steps = "cuda", 256, args.steps
        vae_batches = [int(b) for b in args.vae_batches.split(",")]
        dit_batches = [int(b) for b in args.dit_batches.split(",")]
        n, d, leaves, ipcs, modes_n, k = 1300, 4096, 50, [10, 50], 30, 12

    if "vae" in sections or "dit" in sections:
        import torch

        sampler_bench = _load_bench("gpu_sampler")
        if not args.smoke:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device; use --smoke for the CPU path")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
        t = time.perf_counter()
        if args.smoke:
            prior = sampler_bench.build_prior(sampler_bench.TINY, sampler_bench.TINY_VAE, device)
        else:
            prior = sampler_bench.build_prior(sampler_bench.XL, sampler_bench.SD_VAE, device, dtype=torch.bfloat16)
        print(f"random-init prior built in {time.perf_counter() - t:.1f} s: image {prior.image_size} px, "
              f"latents {prior.latent_shape}", flush=True)
        if "vae" in sections:
            print("--- 1. VAE encode", flush=True)
            results["vae"] = bench_vae(prior.vae, vae_batches, image_px, device, repeats=1 if args.smoke else 3)
        if "dit" in sections:
            print(f"--- 2. DiT sampling, {steps} steps with CFG (bench/gpu_sampler.py)", flush=True)
            if not args.smoke:
                sampler_bench.run([2], ["manifold"], steps=2, device=device, prior=prior)  # warm-up
            results["dit"] = sampler_bench.run(dit_batches, args.modes.split(","), steps=steps, device=device,
                                               prior=prior)
            if not args.smoke:
                # gpu_sampler's TFLOP/s column counts DiT's 118.6 "Gflops" per forward, which are
                # multiply-adds; GPU peaks count 2 FLOP per multiply-add (torch's flop counter: 237.3 G)
                best = max(results["dit"], key=lambda r: r["images_per_s"])
                flops = best["images_per_s"] * 2 * steps * DIT_XL_FORWARD_FLOP / 1e12
                print(f"best {best['guidance']} batch {best['batch']}: {best['images_per_s']:.2f} images/s = "
                      f"{flops:.0f} TFLOP/s at 2 FLOP per multiply-add = {100 * flops / H200_PEAK_TFLOPS:.0f}% "
                      f"of {H200_PEAK_TFLOPS:.0f} (DiT forwards only)", flush=True)
        del prior
        if device == "cuda":
            torch.cuda.empty_cache()

    if "cluster" in sections or "tangent" in sections:
        gpu, host = Backend(gpu=not args.smoke), Backend(gpu=False)
        if gpu.gpu and not gpu.xp.cuda.is_available():
            raise SystemExit("CuPy sees no CUDA device; use --smoke for the CPU path")
        X = latent_like_fn()(n, d, modes=modes_n, seed=n)
        repeats = 1 if args.smoke else 2
        if "cluster" in sections:
            print(f"--- 3. divisive clustering, one class of {n} x {d} float32 (bench/ops.py:latent_like)", flush=True)
            results["cluster"] = bench_cluster(X, gpu, host, leaves, ipcs, repeats)
        if "tangent" in sections:
            from ops.selection import select_ipc_nodes

            centroids = np.asarray(select_ipc_nodes(X, ipcs[-1], seed=0).centroids)
            print(f"--- 4. tangent bases for {len(centroids)} centroids (IPC {ipcs[-1]})", flush=True)
            results["tangent"] = bench_tangent(X, centroids, gpu, host, k=k, dim=3,
                                               guided_steps=max(steps // 2 - 1, 1),
                                               warm_steps=min(10, max(steps // 2 - 1, 1)), repeats=repeats)
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
