"""Forward-process noise schedule (DDPM), independent of any network.

Tables (``betas``, ``alphas_cumprod`` and their square roots) are float64
torch tensors. Per-timestep coefficients are gathered in float64 on the
device of ``t`` and only then cast to the dtype of the data they scale, so
float32/float16 data keep their dtype and float64 data stay exact.

Prediction types (what the network outputs):
- ``"epsilon"``: the noise eps;
- ``"v"``: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022);
- ``"x0"``: the clean sample.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v", "x0")


def _linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas linearly spaced from ``beta_start`` to ``beta_end`` (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def _cosine_betas(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas clipped at ``max_beta``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = torch.cos((steps + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
    betas = 1.0 - abar[1:] / abar[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule:
    """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) for t in [0, timesteps)."""

    def __init__(
        self,
        timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "epsilon",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if timesteps < 1:
            raise ValueError(f"timesteps must be positive, got {timesteps}")
        if schedule == "linear":
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
            betas = _linear_betas(timesteps, beta_start, beta_end)
        else:
            betas = _cosine_betas(timesteps)
        self.timesteps = int(timesteps)
        self.schedule = schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.prediction = prediction
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    def __repr__(self) -> str:
        return (f"NoiseSchedule(timesteps={self.timesteps}, schedule={self.schedule!r}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, prediction={self.prediction!r})")

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the (float64) tables to ``device``; returns self."""
        for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def alpha_bar(self, t: int) -> float:
        """abar_t as a Python float (double); 1.0 for t < 0 (the clean end)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[int(t)])

    def _gather(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` (float64) shaped (B, 1, ..., 1) to broadcast over ``like``, cast to its dtype."""
        t = torch.as_tensor(t, device=like.device).long()
        values = table.to(like.device)[t]
        if values.dim() == 0:
            return values.to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; ``t`` (B,) long or a scalar."""
        a = self._gather(self.sqrt_alphas_cumprod, t, x0)
        b = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + b * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at (x_t, t) for this schedule's prediction type."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "x0":
            return x0
        a = self._gather(self.sqrt_alphas_cumprod, t, x0)
        b = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - b * x0

    def sample_timesteps(self, n: int, device: torch.device | str, power: float = 1.0) -> torch.Tensor:
        """``n`` training timesteps: uniform for ``power`` 1, else ``T - 1 - floor(T * u ** power)`` with ``u``
        uniform in [0, 1) (power > 1 favours high noise)."""
        if power == 1.0:
            return torch.randint(0, self.timesteps, (n,), device=device)
        u = torch.rand(n, device=device)
        return (self.timesteps - 1 - torch.floor(self.timesteps * u ** power)).long().clamp_(0, self.timesteps - 1)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at timesteps ``t`` (float64, on ``t``'s device)."""
        t = torch.as_tensor(t).long()
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1.0 - abar)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-sample loss weight of min-SNR-gamma weighting (Hang et al. 2023), float32.

        Weights the loss of every prediction type as an x0 loss weighted by min(SNR, gamma):
        epsilon min(SNR, gamma) / SNR, x0 min(SNR, gamma), v min(SNR, gamma) / (SNR + 1).
        Low-noise steps (huge SNR), which dominate an unweighted x0 loss and teach little,
        are capped. ``gamma <= 0``: all ones (no weighting).
        """
        t = torch.as_tensor(t).long()
        if gamma <= 0:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.snr(t)
        capped = snr.clamp(max=float(gamma))
        if self.prediction == "epsilon":
            weight = capped / snr
        elif self.prediction == "x0":
            weight = capped
        else:
            weight = capped / (snr + 1.0)
        return weight.float()

    def split(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_pred, eps_pred) implied by ``model_output`` at (x_t, t), for any prediction type."""
        model_output = model_output.to(x_t.dtype)
        a = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        b = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "epsilon":
            eps = model_output
            return (x_t - b * eps) / a, eps
        if self.prediction == "x0":
            x0 = model_output
            return x0, (x_t - a * x0) / b
        v = model_output
        return a * x_t - b * v, b * x_t + a * v
