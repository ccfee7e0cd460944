"""DiT's diffusion training objective: epsilon MSE plus the variational bound on the learned variance."""
from __future__ import annotations

import math

import numpy as np
import torch

from ops.schedule import linear_betas, schedule_from_betas


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
