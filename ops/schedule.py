"""Diffusion schedule maths for DiT's sampler: linear betas, respacing, posterior coefficients.

Pure numpy in float64, as DiT's ``gaussian_diffusion`` does, so the respaced coefficients match
DiT's to rounding. The sampler reads per-step scalars from a :class:`Schedule` and does the
tensor arithmetic itself; nothing here touches torch or a device.

Indexing convention (DiT's): the respaced process has ``S`` steps with index ``i = 0 .. S-1``;
sampling runs ``i = S-1`` down to ``0``. ``Schedule.timesteps[i]`` is the original training
timestep kept for index ``i`` (what the network is conditioned on).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACINGS = ("dit", "uniform")


def linear_betas(train_steps: int) -> np.ndarray:
    """DiT's "linear" schedule: Ho et al.'s 1e-4 .. 0.02, rescaled so any ``train_steps`` behaves alike."""
    if train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    scale = 1000.0 / train_steps
    return np.linspace(scale * 0.0001, scale * 0.02, train_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Which of ``num_timesteps`` original steps to keep, by DiT's ``space_timesteps`` rule.

    ``section_counts``: a comma-separated string ("50", "10,15,20") or a list of ints: the range is
    cut into equal sections and each section keeps that many evenly strided steps, the stride
    ``(size - 1) / (count - 1)`` being rounded per step (so the first and last step of a section
    are kept). "ddimN" instead keeps ``range(0, num_timesteps, stride)`` for the integer stride that
    yields exactly N steps (DDIM's uniform spacing). Returns the kept steps in ascending order.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    n_sections = len(section_counts)
    size_per = num_timesteps // n_sections
    extra = num_timesteps % n_sections
    start = 0
    kept: list[int] = []
    for section, count in enumerate(section_counts):
        size = size_per + (1 if section < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class Schedule:
    """Per-index coefficients of a (possibly respaced) diffusion process; all arrays have length S."""

    timesteps: np.ndarray  # original training timestep of each index (int64, ascending)
    betas: np.ndarray  # respaced betas: 1 - abar_i / abar_{i-1}
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray  # abar_{i-1}, with abar_{-1} = 1
    posterior_variance: np.ndarray  # beta_tilde_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
    posterior_log_variance_clipped: np.ndarray  # log beta_tilde, index 0 borrowing index 1 (it is 0 there)
    posterior_mean_coef1: np.ndarray  # multiplies x0_hat
    posterior_mean_coef2: np.ndarray  # multiplies x_t

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def schedule_from_betas(betas, timesteps=None) -> Schedule:
    """All posterior coefficients of the process with these betas (float64)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or len(betas) < 1:
        raise ValueError("betas must be a non-empty 1-D array")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is exactly 0 at index 0, so its log is clipped to index 1's value (DiT).
    clipped = post_var if len(post_var) == 1 else np.append(post_var[1], post_var[1:])
    with np.errstate(divide="ignore"):
        log_clipped = np.log(clipped)
    if timesteps is None:
        timesteps = np.arange(len(betas))
    return Schedule(
        timesteps=np.asarray(timesteps, dtype=np.int64),
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        posterior_variance=post_var,
        posterior_log_variance_clipped=log_clipped,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def respaced_schedule(train_steps: int = 1000, num_steps: int = 50, spacing: str = "dit") -> Schedule:
    """The linear-beta process of ``train_steps`` steps, respaced to ``num_steps`` as DiT does.

    ``spacing``: "dit" keeps ``space_timesteps(train_steps, str(num_steps))`` (DiT's sample.py
    default); "uniform" keeps DiT's "ddimN" set, ``range(0, train_steps, stride)`` (the same as
    diffusers' "leading" spacing). The respaced betas come from the kept cumulative alphas,
    beta_i = 1 - abar[t_i] / abar[t_{i-1}], so abar of the respaced process equals the original
    abar at the kept steps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in [1, {train_steps}], got {num_steps}")
    rule = str(num_steps) if spacing == "dit" else f"ddim{num_steps}"
    kept = space_timesteps(train_steps, rule)
    abar = np.cumprod(1.0 - linear_betas(train_steps))
    last = 1.0
    betas = []
    for t in kept:
        betas.append(1.0 - abar[t] / last)
        last = abar[t]
    return schedule_from_betas(betas, timesteps=kept)


def fixed_log_variance(schedule: Schedule, i: int) -> float:
    """DiT's variance for a model without learned sigma (FIXED_LARGE): log beta_i, index 0 using beta_tilde_1."""
    if i == 0 and schedule.num_steps > 1:
        return float(np.log(schedule.posterior_variance[1]))
    return float(np.log(schedule.betas[i]))


def learned_range_log_variance(schedule: Schedule, i: int, v):
    """DiT's learned-range variance: interpolate log beta_tilde_i and log beta_i in log space.

    ``v`` is the model's variance output in [-1, 1] (any array type); frac = (v + 1) / 2,
    log var = frac * log beta_i + (1 - frac) * log beta_tilde_i (clipped at index 0).
    """
    max_log = float(np.log(schedule.betas[i]))
    min_log = float(schedule.posterior_log_variance_clipped[i])
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def learned_std_spread(schedule: Schedule, i: int) -> float:
    """sqrt(beta_i / beta_tilde_i): the largest ratio between two coordinates' learned-range std at index i.

    The learned log-variance of a coordinate lies between log beta_tilde_i (v = -1) and log beta_i (v = +1),
    so one number per sample (their geometric mean) is off from any coordinate's std by at most this
    factor either way. Close to 1 early in sampling (1.007 at i = 26 of DiT's 50 steps), 7.9 at i = 1.
    """
    return float(np.exp(0.5 * (np.log(schedule.betas[i]) - schedule.posterior_log_variance_clipped[i])))


def posterior_mean_coefficients(schedule: Schedule, i: int) -> tuple[float, float]:
    """(c1, c2) with mu = c1 * x0_hat + c2 * x_t: the mean of q(x_{i-1} | x_i, x0_hat)."""
    return float(schedule.posterior_mean_coef1[i]), float(schedule.posterior_mean_coef2[i])


def ddim_coefficients(schedule: Schedule, i: int) -> tuple[float, float]:
    """(a, b) with the eta = 0 DDIM update x_{i-1} = a * x0_hat + b * eps."""
    abar_prev = float(schedule.alphas_cumprod_prev[i])
    return abar_prev ** 0.5, (1.0 - abar_prev) ** 0.5
