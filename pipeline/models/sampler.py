"""Guided DiT sampling: DiT's DDPM protocol plus mode / manifold guidance (docs/method.md section 4).

Rows, not classes: a call takes any list of (class, k) samples, each row with its own class label,
centroid and tangent-basis index, and sends them through the transformer together, chunked to
``max_batch`` rows (the model sees twice that with classifier-free guidance). ``sample_rows`` is the
cross-class entry point (the distill pipeline's work units); ``sample`` / ``sample_latents`` keep the
one-class form as a thin wrapper.

Bases are passed compact: a (B, D, d) set of distinct bases plus an integer (n, S) index of the basis
row n uses at guided step s; each step gathers its (n, D, d) slice, and the (n, S, D, d) expansion is
never built.

Step indexing follows DiT: the respaced process has ``num_steps`` indices and sampling runs
``i = num_steps - 1`` down to ``0``. A step is *guided* when ``i > t_stop``; with the defaults
(50 steps, t_stop 25) that is i = 49 .. 26, the first 24 steps, as in the MGD3 / ManifoldGD code.

The update, given the CFG-guided epsilon and (learned) variance of the model at x_t:
    x0_hat = (x_t - sqrt(1 - abar_i) eps) / sqrt(abar_i)              (no clipping)
    mu     = c1_i x0_hat + c2_i x_t            (DDPM posterior mean)
           | sqrt(abar_{i-1}) x0_hat + sqrt(1 - abar_{i-1}) eps    (DDIM, eta 0)
    guided: mu <- mu + lambda * sigma_i * g,   g = guidance_vector(mode, x0_hat, c, U, normal_weight)
    x_{i-1} = mu + std_i * z   (DDPM, i > 0; DDIM and the last step add nothing)

sigma_i in the guidance term (``SamplerConfig.sigma``, ``ops.guidance.guidance_sigma``): ``scalar``
(the default) is one number per sample, exp(0.5 * mean log-variance), the geometric mean of the std
the DDPM step would use at i (learned range, or DiT's fixed-large variance for a model without learned
sigma); one number keeps the guided displacement exactly in span(U) for ``manifold``. ``elementwise``
is the step's own per-coordinate std, as the public MGD3 / ManifoldGD code uses. The two differ by at
most a factor ``ops.schedule.learned_std_spread`` (1.007 at the default's last guided step, 7.9 at
i = 1); with fixed variance they are the same number. DDIM uses the same sigma_i, so guidance has the
same strength under both samplers instead of vanishing with DDIM's zero noise.

Noise: pipeline/models/noise.py (a pure function of (seed, class, k)).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ops.guidance import (
    BASIS_MODES,
    guidance_sigma,
    guidance_vector,
    guided_mean,
    projects_at,
    repulsion,
    trust_region,
    x0_from_eps,
)
from ops.schedule import (
    SPACINGS,
    Schedule,
    ddim_coefficients,
    fixed_log_variance,
    learned_range_log_variance,
    posterior_mean_coefficients,
    respaced_schedule,
)
from pipeline.config import DistillConfig, SamplerSection, check_choices
from pipeline.models.loading import Prior
from pipeline.models.noise import NoiseStreams

DIT_CFG_CHANNELS = 3  # DiT's forward_with_cfg guides the first 3 of 4 latent channels


@dataclass
class SamplerConfig(SamplerSection):
    """The sampler's settings: the distill config's ``sampler`` section (every knob, its default and its
    allowed values defined there, in pipeline/config.py) plus what a run takes from elsewhere (``seed``)
    and two settings only the sampler has. ``from_config`` builds it from a distill config."""

    guidance: str = "none"  # on its own the sampler is plain DiT; a distill config's default is manifold
    spacing: str = "dit"  # dit: space_timesteps(T, "num_steps"); uniform: DiT's "ddimN" stride
    seed: int = 0
    autocast: bool = True  # bf16 (fp16 without bf16 support) autocast on CUDA; CPU always runs fp32

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> SamplerConfig:
        return cls(**dataclasses.asdict(cfg.sampler), seed=cfg.seed)

    def __post_init__(self):
        check_choices(self, "sampler")  # a ConfigError, which is a ValueError
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if not 1 <= self.num_steps <= self.train_steps:
            raise ValueError(f"num_steps must be in [1, train_steps={self.train_steps}], got {self.num_steps}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.normal_weight < 0:
            raise ValueError(f"normal_weight must be >= 0, got {self.normal_weight}")
        if self.trust_region < 0:
            raise ValueError(f"trust_region must be >= 0, got {self.trust_region}")

    def guided_indices(self) -> list[int]:
        """Respaced indices whose step is guided, in sampling order (empty for guidance none)."""
        if self.guidance == "none":
            return []
        return [i for i in range(self.num_steps - 1, -1, -1) if i > self.t_stop]

    @property
    def num_guided_steps(self) -> int:
        return len(self.guided_indices())


@dataclass
class StepInfo:
    """What one denoising step saw and did, for one chunk of samples (handed to ``step_callback``)."""

    index: int  # respaced index i (num_steps - 1 .. 0)
    timestep: int  # original training timestep fed to the transformer
    sample_indices: list[int]  # k of each row in this chunk
    x_t: torch.Tensor
    eps: torch.Tensor  # CFG-combined epsilon
    x0_hat: torch.Tensor
    mean: torch.Tensor  # the unguided step's mean
    guided_mean: torch.Tensor  # mean + lambda * sigma * g (is ``mean`` on unguided steps)
    sigma: torch.Tensor  # sigma_i of the guidance term: (n, 1, 1, 1) per sample, or x_t's shape (elementwise)
    noise_std: torch.Tensor | float  # std of the added noise (element-wise when learned)
    noise: torch.Tensor | None  # z, when the step adds noise
    x_prev: torch.Tensor
    guided_step: int | None = None  # 0 for the first guided step; None when unguided
    class_ids: list[int] | None = None  # class of each row in this chunk


@dataclass
class GuidanceState:
    """Per-sample guidance inputs for one step (flattened latents, on the sampler's device)."""

    mode: str
    centroids: torch.Tensor  # (n, D)
    basis: torch.Tensor | None  # (n, D, d) or None
    scale: float
    normal_weight: float = 0.0
    trust_region: float = 0.0  # > 0: ops.guidance.trust_region on g
    pull: float = 0.1  # public: the length of its pull toward the tangent plane
    project_min_signal: float = 0.0  # manifold: project only where the signal sqrt(abar) >= this
    repulsion: float = 0.0  # > 0: + repulsion x ops.guidance.repulsion among the rows of one class
    groups: torch.Tensor | None = None  # (n,) class of each row, for the repulsion


def denoise_step(
    schedule: Schedule,
    i: int,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    var_values: torch.Tensor | None,
    *,
    sampler: str = "ddpm",
    noise: torch.Tensor | None = None,
    guidance: GuidanceState | None = None,
    sigma_mode: str = "scalar",
) -> dict:
    """One reverse step x_i -> x_{i-1}; a pure function of its arguments (see the module docstring).

    ``var_values``: the model's variance channels in [-1, 1] (learned range), or None for DiT's
    fixed-large variance. ``noise`` is z (required for DDPM steps with i > 0). ``sigma_mode``: the
    guidance term's sigma_i, ``scalar`` or ``elementwise`` (``ops.guidance.guidance_sigma``).
    """
    abar = float(schedule.alphas_cumprod[i])
    x0_hat = x0_from_eps(x_t, eps, abar)
    if var_values is not None:
        log_var = learned_range_log_variance(schedule, i, var_values)
        sigma = guidance_sigma(log_var, sigma_mode)
        noise_std = torch.exp(0.5 * log_var)
    else:
        std = float(np.exp(0.5 * fixed_log_variance(schedule, i)))
        sigma = torch.full((x_t.shape[0], 1, 1, 1), std, dtype=x_t.dtype, device=x_t.device)
        noise_std = std
    if sampler == "ddpm":
        c1, c2 = posterior_mean_coefficients(schedule, i)
        mean = c1 * x0_hat + c2 * x_t
    else:
        a, b = ddim_coefficients(schedule, i)
        mean = a * x0_hat + b * eps
    new_mean = mean
    if guidance is not None:
        x0_flat = x0_hat.flatten(1)
        mode = guidance.mode
        if mode == "manifold" and not projects_at(abar, guidance.project_min_signal):
            mode = "mode"  # noise-aware projection: the whole mode term while x_t is nearly all noise
        g = guidance_vector(mode, x0_flat, guidance.centroids, guidance.basis, guidance.normal_weight,
                            guidance.pull)
        if guidance.repulsion > 0:
            g = g + guidance.repulsion * repulsion(x0_flat, guidance.groups)
        g = trust_region(g, guidance.scale, guidance.trust_region)
        new_mean = guided_mean(mean, sigma, g.view_as(x_t), guidance.scale)
    adds_noise = sampler == "ddpm" and i > 0
    if adds_noise:
        if noise is None:
            raise ValueError(f"a DDPM step at index {i} needs noise")
        x_prev = new_mean + noise_std * noise
    else:
        x_prev = new_mean
    return {"x0_hat": x0_hat, "mean": mean, "guided_mean": new_mean, "sigma": sigma,
            "noise_std": noise_std, "noise": noise if adds_noise else None, "x_prev": x_prev}


def _as_tensor(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


class GuidedSampler:
    def __init__(self, prior: Prior, config: SamplerConfig):
        self.prior = prior
        self.config = config
        self.schedule = respaced_schedule(config.train_steps, config.num_steps, config.spacing)
        self.device = prior.device
        self.model_dtype = next(prior.transformer.parameters()).dtype

    # ------------------------------------------------------------------ noise
    def initial_noise(self, class_id: int, indices: Sequence[int]) -> torch.Tensor:
        """x_T for the given samples (CPU, float32): a pure function of (seed, class_id, k)."""
        indices = list(indices)
        return NoiseStreams(self.config.seed, [class_id] * len(indices), indices, self.prior.latent_shape).draw()

    # ------------------------------------------------------------------ model
    def _autocast(self):
        if self.device.type == "cuda" and self.config.autocast:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def predict(self, x_t: torch.Tensor, class_ids, timestep: int):
        """CFG-combined epsilon (n, C, H, W) and the conditional variance channels (or None).

        ``class_ids``: one class for every row (an int) or one per row (a sequence or tensor of n)."""
        cfg = self.config
        n, channels = x_t.shape[0], self.prior.latent_shape[0]
        use_cfg = cfg.cfg_scale != 1.0
        model_in = torch.cat([x_t, x_t]) if use_cfg else x_t
        cond = torch.as_tensor(class_ids, dtype=torch.long, device=self.device).reshape(-1).expand(n)
        labels = torch.cat([cond, torch.full_like(cond, self.prior.null_class_id)]) if use_cfg else cond
        steps = torch.full((model_in.shape[0],), int(timestep), dtype=torch.long, device=self.device)
        with self._autocast():
            out = self.prior.transformer(model_in.to(self.model_dtype), timestep=steps, class_labels=labels).sample
        out = out.float()
        if use_cfg:
            cond, uncond = out[:n], out[n:]
            k = min(DIT_CFG_CHANNELS, channels) if cfg.cfg_channels == "dit" else channels
            mixed = uncond[:, :k] + cfg.cfg_scale * (cond[:, :k] - uncond[:, :k])
            # DiT keeps the conditional prediction for the unguided channels and for the variance.
            eps = torch.cat([mixed, cond[:, k:channels]], dim=1)
            out = cond
        else:
            eps = out[:, :channels]
        var_values = out[:, channels:] if self.prior.learned_variance else None
        return eps, var_values

    # ------------------------------------------------------------------ sampling
    def _guidance_inputs(self, centroids, bases, basis_index, n: int):
        """(centroids (n, D), basis set (B, D, d), basis index (n, S)) on the device, checked."""
        cfg = self.config
        if cfg.guidance == "none":
            return None, None, None
        if centroids is None:
            raise ValueError(f"guidance {cfg.guidance!r} needs centroids (n, {self.prior.latent_dim})")
        c = _as_tensor(centroids, self.device)
        if c.shape != (n, self.prior.latent_dim):
            raise ValueError(f"centroids must have shape ({n}, {self.prior.latent_dim}), got {tuple(c.shape)}")
        if cfg.guidance == "mode":
            return c, None, None
        if bases is None or basis_index is None:
            raise ValueError(f"{cfg.guidance} guidance needs tangent bases (B, D, d) and a basis index (n, S)")
        u = _as_tensor(bases, self.device)
        d_lat, n_guided = self.prior.latent_dim, cfg.num_guided_steps
        if u.ndim != 3 or u.shape[1] != d_lat:
            raise ValueError(f"bases must be (B, {d_lat}, d), got {tuple(u.shape)}")
        index = torch.as_tensor(np.asarray(basis_index), dtype=torch.long)
        if index.ndim == 1:
            index = index[:, None].expand(n, n_guided)
        if tuple(index.shape) != (n, n_guided):
            raise ValueError(f"basis index must be ({n}, {n_guided}) (S = number of guided steps), "
                             f"got {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= u.shape[0]):
            raise ValueError(f"basis index out of range [0, {u.shape[0]})")
        return c, u, index.to(self.device)

    @staticmethod
    def compact_bases(bases, n: int, n_guided: int):
        """(basis set, index) for per-sample bases (n, D, d) or per-step bases (n, S, D, d).

        A view, not a copy: row r at guided step j uses ``set[index[r, j]]`` == ``bases[r, j]``."""
        if bases is None:
            return None, None
        shape = tuple(bases.shape)
        if len(shape) == 3 and shape[0] == n:
            return bases, np.repeat(np.arange(n)[:, None], n_guided, axis=1)
        if len(shape) == 4 and shape[0] == n and shape[1] == n_guided:
            return bases.reshape(n * n_guided, *shape[2:]), np.arange(n * n_guided).reshape(n, n_guided)
        raise ValueError(f"bases must be ({n}, D, d) or ({n}, {n_guided}, D, d) "
                         f"(S = number of guided steps), got {shape}")

    @torch.inference_mode()
    def sample_latents(
        self,
        class_id: int,
        indices: Sequence[int],
        centroids=None,
        bases=None,
        *,
        noise: torch.Tensor | None = None,
        step_callback: Callable[[StepInfo], None] | None = None,
    ) -> torch.Tensor:
        """Final scaled latents (n, C, H, W) on CPU for samples ``indices`` of ``class_id``.

        ``centroids``: (n, D) in the scaled latent space (where x_t lives); ``bases``: (n, D, d), or
        (n, S, D, d) with one basis per guided step. ``noise`` replaces x_T (the step noise still
        comes from the per-sample streams, so passing ``initial_noise(...)`` changes nothing).
        The one-class form of ``sample_rows``.
        """
        indices = [int(k) for k in indices]
        n = len(indices)
        basis_set, basis_index = (None, None)
        if self.config.guidance in BASIS_MODES:
            if bases is None:
                raise ValueError(f"{self.config.guidance} guidance needs tangent bases (n, D, d) or (n, S, D, d)")
            basis_set, basis_index = self.compact_bases(bases, n, self.config.num_guided_steps)
        return self.sample_rows([class_id] * n, indices, centroids, basis_set, basis_index,
                                noise=noise, step_callback=step_callback)

    @torch.inference_mode()
    def sample_rows(
        self,
        class_ids: Sequence[int],
        indices: Sequence[int],
        centroids=None,
        bases=None,
        basis_index=None,
        *,
        noise: torch.Tensor | None = None,
        step_callback: Callable[[StepInfo], None] | None = None,
        attempts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Final scaled latents (n, C, H, W) on CPU for rows (class_ids[r], indices[r]).

        ``centroids``: (n, D); ``bases``: a compact (B, D, d) set of distinct bases; ``basis_index``:
        (n, S) integers, the basis row r uses at guided step s (or (n,): the same at every step).
        Rows go through the model in order, ``max_batch`` at a time. ``attempts``: each row's noise
        attempt (default 0; ``sample_seed``).
        """
        cfg = self.config
        class_ids = [int(y) for y in class_ids]
        indices = [int(k) for k in indices]
        n = len(indices)
        if len(class_ids) != n:
            raise ValueError(f"class_ids and indices must have the same length, got {len(class_ids)} and {n}")
        bad = [y for y in class_ids if not 0 <= y < self.prior.num_classes]
        if bad:
            raise ValueError(f"class_id must be in [0, {self.prior.num_classes}), got {bad[0]}")
        c_all, u_set, u_index = self._guidance_inputs(centroids, bases, basis_index, n)
        attempts = None if attempts is None else [int(a) for a in attempts]
        if attempts is not None and len(attempts) != n:
            raise ValueError(f"attempts must have one entry per row ({n}), got {len(attempts)}")
        if noise is not None and tuple(noise.shape) != (n, *self.prior.latent_shape):
            raise ValueError(f"noise must have shape {(n, *self.prior.latent_shape)}, got {tuple(noise.shape)}")
        out = []
        for start in range(0, n, cfg.max_batch):
            rows = slice(start, min(start + cfg.max_batch, n))
            out.append(self._sample_chunk(
                class_ids[rows], indices[rows],
                None if c_all is None else c_all[rows],
                u_set,
                None if u_index is None else u_index[rows],
                None if noise is None else noise[rows],
                step_callback,
                None if attempts is None else attempts[rows],
            ))
        return torch.cat(out) if out else torch.empty((0, *self.prior.latent_shape))

    def _sample_chunk(self, class_ids, chunk, centroids, basis_set, basis_index, noise, step_callback,
                      attempts=None):
        cfg, sched = self.config, self.schedule
        streams = NoiseStreams(cfg.seed, class_ids, chunk, self.prior.latent_shape, attempts)
        x_T = streams.draw()  # always drawn, so the step noise stream is the same with or without `noise`
        x = (x_T if noise is None else noise.detach().cpu().float()).to(self.device)
        labels = torch.as_tensor(class_ids, dtype=torch.long, device=self.device)
        guided = set(cfg.guided_indices())
        j = 0
        for i in range(sched.num_steps - 1, -1, -1):
            t = int(sched.timesteps[i])
            eps, var_values = self.predict(x, labels, t)
            # Draw on the CPU while the device runs the model (launches above are asynchronous).
            z = streams.draw().to(self.device, non_blocking=True) if cfg.sampler == "ddpm" and i > 0 else None
            state = None
            if i in guided:
                basis = None if basis_set is None else step_bases(basis_set, basis_index, j)
                state = GuidanceState(cfg.guidance, centroids, basis, cfg.guidance_scale, cfg.normal_weight,
                                      cfg.trust_region, cfg.pull, cfg.project_min_signal, cfg.repulsion, labels)
            step = denoise_step(sched, i, x, eps, var_values, sampler=cfg.sampler, noise=z, guidance=state,
                                sigma_mode=cfg.sigma)
            if step_callback is not None:
                step_callback(StepInfo(index=i, timestep=t, sample_indices=list(chunk), x_t=x, eps=eps,
                                       guided_step=j if state is not None else None,
                                       class_ids=list(class_ids), **step))
            x = step["x_prev"]
            j += state is not None
        return x.cpu()

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def decode(self, latents) -> np.ndarray:
        """Scaled latents -> uint8 images (n, H, W, 3), decoded in chunks of ``max_batch``."""
        vae = self.prior.vae
        vae_dtype = next(vae.parameters()).dtype
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = _as_tensor(latents, "cpu")
        images = []
        for start in range(0, latents.shape[0], self.config.max_batch):
            z = latents[start:start + self.config.max_batch].to(self.device)
            with self._autocast():
                x = vae.decode((z / self.prior.scaling_factor + shift).to(vae_dtype)).sample
            images.append(to_uint8(x.float()).permute(0, 2, 3, 1).cpu().numpy())
        if not images:
            size = self.prior.image_size
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        return np.concatenate(images)

    def sample(self, class_id: int, indices: Sequence[int], centroids=None, bases=None) -> np.ndarray:
        """uint8 images (n, H, W, 3) for samples ``indices`` of ``class_id``."""
        return self.decode(self.sample_latents(class_id, indices, centroids, bases))

    def sample_images(self, class_ids, indices, centroids=None, bases=None, basis_index=None) -> np.ndarray:
        """uint8 images (n, H, W, 3) for rows (class_ids[r], indices[r]); see ``sample_rows``."""
        return self.decode(self.sample_rows(class_ids, indices, centroids, bases, basis_index))


def step_bases(basis_set: torch.Tensor, basis_index: torch.Tensor, step: int) -> torch.Tensor:
    """(n, D, d) bases of guided step ``step``: row r gets ``basis_set[basis_index[r, step]]``."""
    return basis_set[basis_index[:, step]]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 the way DiT's save_image does: clamp, scale to [0, 255], round half up."""
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
