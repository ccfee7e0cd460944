"""The one-call GPU check: every GPU figure the project needs, without Ray, scikit-learn or a download.

Sections (each runs in isolation: one that fails prints its traceback and the run goes on):
  stage2   stage 2 of one 1,300 x 4,096 class at IPC 50 through the pipeline's own per-class plan function
           (``pipeline.distill.class_plan.plan_class``, the ImageNet IPC-50 preset's settings, its default
           ``cluster.backend`` auto and ``tangent.route`` gram): seconds, CuPy pool high-water.
  vae      VAE encode at 256 px: SD-VAE-shaped AutoencoderKL (random init, bf16) through
           ``pipeline.distill.vae_encode.encode_pixels`` (uint8 pixels in, host latents out), batches 32..256,
           each shape warmed up first; images/s, TFLOP/s against 0.273 TFLOP per image, torch's peak memory.
  dit      DiT-XL/2-shaped (random init, bf16) 50-step CFG sampling + VAE decode through
           ``GuidedSampler.sample``, guidance none / mode / manifold, batches 8..256, each shape warmed up.
  ratio    guided / unguided time at batch 64: a warm-up per mode at that shape, then the modes interleaved.
  cluster  ``divisive_kmeans`` and ``select_ipc_nodes`` on CuPy against numpy (time, SSE agreement).
  tangent  tangent bases for the IPC-50 centroids, CuPy against numpy (time, largest principal angle).
Then one line per target, ``PASS`` or ``FAIL`` with the figure (``n/a (cpu)`` on the smoke path):
  DiT ManifoldGD at batch 64 and at its best batch >= 26 images/s; mode/none and manifold/none time at
  batch 64 <= 1.05; stage 2 of the class <= 1 s; VAE encode at 256 px >= 1,450 images/s (the capacity
  model's assumption: 40% of 989 TFLOP/s at 0.273 TFLOP per image); each with its peak GPU memory.

    python bench/gpu.py --out DIR       # CUDA + CuPy; a few minutes on one H200; DIR/gpu.json gets every figure
    python bench/gpu.py --smoke         # the same code at tiny sizes on the CPU, numpy on both sides
    python bench/gpu.py --sections stage2,cluster
    python bench/gpu.py --count-flops   # FLOP per image of each model at 256 px (meta tensors, any machine)

Nothing on its path imports Ray or scikit-learn. The GPU machine lacks diffusers (and maybe Pillow and
PyYAML): docs/gpu.md has the wheels to carry and the one command that runs this there.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import platform
import sys
import time
import traceback
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
SECTIONS = ("stage2", "vae", "dit", "ratio", "cluster", "tangent")

# The targets (docs/gpu.md): (key, what, threshold, unit, higher is better)
DIT_IMAGES_PER_S = 26.0
GUIDANCE_RATIO = 1.05
STAGE2_SECONDS = 1.0
VAE_IMAGES_PER_S = 0.40 * H200_PEAK_TFLOPS / VAE_ENCODE_TFLOP_PER_IMAGE  # ~1,450: the capacity model's 40%
PRODUCTION_BATCH = 64  # sampler.max_batch of the ImageNet preset


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

    from pipeline.distill.vae_encode import encode_pixels

    cuda = device == "cuda"
    dtype = next(vae.parameters()).dtype
    rng = np.random.default_rng(0)
    rows = []
    for n in batches:
        pixels = rng.integers(0, 256, (n, image_px, image_px, 3), dtype=np.uint8)
        encode_pixels(vae, pixels, device, dtype)  # warm-up at this shape: kernels, allocator
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
class Sizes:
    """Everything the sections size by: the real run's on a GPU, tiny ones on the CPU (same code)."""

    def __init__(self, smoke: bool, args):
        self.smoke = smoke
        if smoke:
            self.device, self.image_px, self.steps = "cpu", 16, 3
            self.vae_batches, self.dit_batches, self.ratio_batch, self.rounds = [2, 4], [2, 4], 2, 1
            self.n, self.d, self.leaves, self.ipcs, self.modes_n, self.k, self.repeats = 120, 64, 8, [2, 4], 6, 6, 1
        else:
            self.device, self.image_px, self.steps = "cuda", 256, args.steps
            self.vae_batches = [int(b) for b in args.vae_batches.split(",")]
            self.dit_batches = [int(b) for b in args.dit_batches.split(",")]
            self.ratio_batch, self.rounds = PRODUCTION_BATCH, 3
            self.n, self.d, self.leaves, self.ipcs, self.modes_n, self.k, self.repeats = 1300, 4096, 50, [10, 50], 30, 12, 2
        self.modes = args.modes.split(",")


class Context:
    """Lazily built things shared by sections (the random-init prior, the class of latents), so a section
    that fails to build one does not stop the others."""

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self._prior = self._X = self._sampler_bench = None

    @property
    def sampler_bench(self):
        if self._sampler_bench is None:
            self._sampler_bench = _load_bench("gpu_sampler")
        return self._sampler_bench

    def prior(self):
        if self._prior is None:
            import torch

            sb, s = self.sampler_bench, self.sizes
            if not s.smoke:
                if not torch.cuda.is_available():
                    raise RuntimeError("torch sees no CUDA device (use --smoke for the CPU path)")
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            t = time.perf_counter()
            if s.smoke:
                self._prior = sb.build_prior(sb.TINY, sb.TINY_VAE, s.device)
            else:
                self._prior = sb.build_prior(sb.XL, sb.SD_VAE, s.device, dtype=torch.bfloat16)
            print(f"random-init prior built in {time.perf_counter() - t:.1f} s: image {self._prior.image_size} px, "
                  f"latents {self._prior.latent_shape}", flush=True)
        return self._prior

    def latents(self) -> np.ndarray:
        if self._X is None:
            s = self.sizes
            self._X = latent_like_fn()(s.n, s.d, modes=s.modes_n, seed=s.n)
        return self._X

    def backends(self):
        gpu, host = Backend(gpu=not self.sizes.smoke), Backend(gpu=False)
        if gpu.gpu and not gpu.xp.cuda.is_available():
            raise RuntimeError("CuPy sees no CUDA device (use --smoke for the CPU path)")
        return gpu, host


def section_stage2(ctx: Context) -> dict:
    """Stage 2 of one class through the pipeline's own per-class plan function, the ImageNet IPC-50 preset."""
    from ops.backend import resolve_backend
    from pipeline.config import build_config, load_yaml
    from pipeline.distill.class_plan import plan_class

    s = ctx.sizes
    ipc = s.ipcs[-1]
    cfg = build_config(load_yaml("imagenet1k_ipc50"), {"ipc": ipc})
    X = ctx.latents()
    backend = resolve_backend(cfg.cluster.backend)
    print(f"--- stage 2: one class of {s.n} x {s.d} at IPC {ipc}, plan_class (cluster.backend "
          f"{cfg.cluster.backend} -> {backend.name}, tangent.route {cfg.tangent.route}, "
          f"{cfg.sampler.num_steps} steps, t_stop {cfg.sampler.t_stop})", flush=True)
    pool = backend.xp.get_default_memory_pool() if backend.on_gpu else None
    plan_class(X, cfg)  # warm-up: CuPy kernel compilation, the memory pool
    if pool is not None:
        backend.xp.cuda.Device().synchronize()
        pool.free_all_blocks()
    best = float("inf")
    for _ in range(s.repeats):
        start = time.perf_counter()
        plan = plan_class(X, cfg)  # ends with the plan on the host: the wall clock is the whole class
        best = min(best, time.perf_counter() - start)
    peak = pool.total_bytes() / 2**30 if pool is not None else float("nan")
    row = {"seconds": best, "backend": str(plan["backend"]), "route": cfg.tangent.route, "ipc": ipc,
           "n": s.n, "d": s.d, "bases": int(plan["bases"].shape[0]), "peak_gib": peak}
    print(f"plan_class {s.n} x {s.d} IPC {ipc} on {row['backend']}: {best:.3f} s, {row['bases']} bases, "
          f"pool peak {peak:.2f} GiB", flush=True)
    return row


def section_vae(ctx: Context):
    print("--- VAE encode", flush=True)
    s = ctx.sizes
    return bench_vae(ctx.prior().vae, s.vae_batches, s.image_px, s.device, repeats=1 if s.smoke else 3)


def section_dit(ctx: Context):
    s = ctx.sizes
    print(f"--- DiT sampling, {s.steps} steps with CFG (bench/gpu_sampler.py; each shape warmed up)", flush=True)
    rows = ctx.sampler_bench.run(s.dit_batches, s.modes, steps=s.steps, device=s.device, prior=ctx.prior())
    if not s.smoke:
        best = max(rows, key=lambda r: r["images_per_s"])
        flops = best["images_per_s"] * 2 * s.steps * DIT_XL_FORWARD_FLOP / 1e12
        print(f"fastest {best['guidance']} batch {best['batch']}: {best['images_per_s']:.2f} images/s = "
              f"{flops:.0f} TFLOP/s at 2 FLOP per multiply-add = {100 * flops / H200_PEAK_TFLOPS:.0f}% "
              f"of {H200_PEAK_TFLOPS:.0f} (DiT forwards only)", flush=True)
    return rows


def section_ratio(ctx: Context):
    s = ctx.sizes
    print(f"--- guidance overhead at batch {s.ratio_batch}: {s.rounds} interleaved rounds, a warm-up per mode",
          flush=True)
    return ctx.sampler_bench.guidance_ratio(ctx.prior(), s.ratio_batch, s.modes, steps=s.steps, device=s.device,
                                            rounds=s.rounds)


def section_cluster(ctx: Context):
    s = ctx.sizes
    gpu, host = ctx.backends()
    print(f"--- divisive clustering, one class of {s.n} x {s.d} float32 (bench/ops.py:latent_like)", flush=True)
    return bench_cluster(ctx.latents(), gpu, host, s.leaves, s.ipcs, s.repeats)


def section_tangent(ctx: Context):
    from ops.selection import select_ipc_nodes

    s = ctx.sizes
    gpu, host = ctx.backends()
    X = ctx.latents()
    centroids = np.asarray(select_ipc_nodes(X, s.ipcs[-1], seed=0).centroids)
    print(f"--- tangent bases for {len(centroids)} centroids (IPC {s.ipcs[-1]})", flush=True)
    return bench_tangent(X, centroids, gpu, host, k=s.k, dim=3, guided_steps=max(s.steps // 2 - 1, 1),
                         warm_steps=min(10, max(s.steps // 2 - 1, 1)), repeats=s.repeats)


SECTION_FUNCS = {"stage2": section_stage2, "vae": section_vae, "dit": section_dit, "ratio": section_ratio,
                 "cluster": section_cluster, "tangent": section_tangent}


# ------------------------------------------------------------------------------------------ targets
def _verdict(value: float, threshold: float, higher: bool, smoke: bool) -> str:
    if smoke:
        return "n/a (cpu)"
    if not np.isfinite(value):
        return "FAIL (no figure)"
    return "PASS" if (value >= threshold if higher else value <= threshold) else "FAIL"


def target_lines(results: dict, smoke: bool) -> list[str]:
    """One line per target: ``TARGET <name>: <figure> (target <op> <threshold>) peak <GiB> -> PASS|FAIL``.

    A target whose section failed or did not run says so (FAIL when it failed, SKIPPED when not asked)."""
    errors, lines = results.get("errors", {}), []

    def line(name, section, figure, threshold, unit, higher, peak, note=""):
        op = ">=" if higher else "<="
        if section in errors:
            verdict, text = "FAIL (section failed)", "no figure"
        elif figure is None:
            verdict, text = "SKIPPED (section not run)", "no figure"
        else:
            verdict, text = _verdict(figure, threshold, higher, smoke), f"{figure:.3f} {unit}"
        peak_text = f"peak GPU {peak:.1f} GiB" if peak is not None and np.isfinite(peak) else "peak GPU n/a"
        lines.append(f"TARGET {name}: {text} (target {op} {threshold:g} {unit}{note}); {peak_text} -> {verdict}")

    dit = results.get("dit")
    manifold = [r for r in dit or [] if r["guidance"] == "manifold"]
    at64 = next((r for r in manifold if r["batch"] == (PRODUCTION_BATCH if not smoke else manifold[-1]["batch"])),
                None) if manifold else None
    best = max(manifold, key=lambda r: r["images_per_s"]) if manifold else None
    line(f"dit manifold batch {at64['batch'] if at64 else PRODUCTION_BATCH}", "dit",
         at64["images_per_s"] if at64 else None, DIT_IMAGES_PER_S, "images/s", True, at64 and at64["peak_gib"])
    line(f"dit manifold best batch ({best['batch'] if best else '-'})", "dit",
         best["images_per_s"] if best else None, DIT_IMAGES_PER_S, "images/s", True, best and best["peak_gib"])
    ratio = results.get("ratio")
    for mode in ("mode", "manifold"):
        value = ratio["ratio"].get(mode) if ratio else None
        line(f"time {mode}/none at batch {ratio['batch'] if ratio else PRODUCTION_BATCH}", "ratio", value,
             GUIDANCE_RATIO, "x", False, ratio and ratio["peak_gib"])
    st = results.get("stage2")
    line(f"stage 2 of a {st['n'] if st else 1300} x {st['d'] if st else 4096} class at IPC {st['ipc'] if st else 50} "
         f"({st['backend'] + ', ' + st['route'] if st else 'plan_class'})", "stage2", st and st["seconds"],
         STAGE2_SECONDS, "s", False, st and st["peak_gib"])
    if st and not smoke and st["backend"] == "numpy" and "FAIL" not in lines[-1]:
        lines[-1] = lines[-1].rsplit("->", 1)[0] + "-> FAIL (ran on numpy, not the GPU)"
    vae = results.get("vae")
    vbest = max(vae, key=lambda r: r["images_per_s"]) if vae else None
    line(f"vae encode {256 if not smoke else 16} px best batch ({vbest['batch'] if vbest else '-'})", "vae",
         vbest and vbest["images_per_s"], VAE_IMAGES_PER_S, "images/s", True, vbest and vbest["peak_gib"],
         note=", the capacity model's 40% of peak")
    return lines


def environment() -> dict:
    """What ran: package versions (from their metadata: nothing is imported for this) and the device."""
    from importlib import metadata

    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": platform.python_version(),
           "numpy": np.__version__, "machine": platform.machine()}
    for key, dists in (("torch", ["torch"]), ("cupy", ["cupy-cuda13x", "cupy-cuda12x", "cupy"]),
                       ("diffusers", ["diffusers"]), ("huggingface_hub", ["huggingface_hub"]),
                       ("Pillow", ["Pillow", "pillow"]), ("PyYAML", ["PyYAML"]), ("pyarrow", ["pyarrow"]),
                       ("ray", ["ray"]), ("scikit-learn", ["scikit-learn"]), ("cuml", ["cuml-cu13", "cuml-cu12"])):
        env[key] = "absent"
        for dist in dists:
            try:
                env[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    try:
        import torch

        env["cuda"] = torch.version.cuda or "none"
        env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception as err:  # recorded, never fatal
        env["device"] = f"unknown ({type(err).__name__}: {err})"
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, numpy on both sides")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--vae-batches", default="32,64,128,256")
    ap.add_argument("--dit-batches", default="8,16,32,64,128,256")
    ap.add_argument("--modes", default="none,mode,manifold")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="", help="folder for gpu.json (every figure, the environment, the targets)")
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
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results: dict = {"smoke": args.smoke, "environment": env, "errors": {}}
    ctx = Context(Sizes(args.smoke, args))
    for name in SECTIONS:
        if name not in sections:
            continue
        t = time.perf_counter()
        try:
            results[name] = SECTION_FUNCS[name](ctx)
        except BaseException as err:  # one section's failure (even a SystemExit) must not cost the others
            if isinstance(err, KeyboardInterrupt):
                raise
            traceback.print_exc()
            sys.stderr.flush()
            results["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"SECTION {name} FAILED after {time.perf_counter() - t:.1f} s: {results['errors'][name]}", flush=True)
        else:
            print(f"section {name}: {time.perf_counter() - t:.1f} s", flush=True)
        _free_device_memory()
    results["targets"] = target_lines(results, args.smoke)
    print("--- targets", flush=True)
    for line in results["targets"]:
        print(line, flush=True)
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s; sections failed: {', '.join(results['errors']) or 'none'}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return results


def _free_device_memory() -> None:
    """Return cached blocks between sections, so one section's allocator state does not weigh on the next."""
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "cupy" in sys.modules:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:  # best effort
            pass


if __name__ == "__main__":
    main()
