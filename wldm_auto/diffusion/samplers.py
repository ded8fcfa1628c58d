"""Reverse-process samplers (DDIM, DDPM) and a generic sampling loop.

Samplers know a :class:`NoiseSchedule` and nothing of networks: ``step``
turns one model output into the next, less noisy sample. Any stochastic
noise is passed in by the caller, so a whole-volume sampler can draw one
noise field for the whole latent (never one per tile) and a seeded
``torch.Generator`` reproduces a run exactly.

Both samplers expose ``timesteps`` (descending ints) and
``step(model_output, t, t_prev, x_t, noise=None)``, where ``t_prev`` is the
next entry of ``timesteps`` or -1 after the last one (abar_{-1} = 1: the
step returns the clean sample).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from wldm_auto.diffusion.schedule import NoiseSchedule

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler:
    """Base of the samplers: schedule, x0 clipping, (t, t_prev) pairs; subclasses define ``step``."""

    timesteps: list[int]

    def __init__(self, schedule: NoiseSchedule, clip_x0: float | None = None) -> None:
        if clip_x0 is not None and clip_x0 <= 0:
            raise ValueError(f"clip_x0 must be positive or None, got {clip_x0}")
        self.schedule = schedule
        self.clip_x0 = clip_x0

    def __len__(self) -> int:
        return len(self.timesteps)

    def pairs(self) -> list[tuple[int, int]]:
        """(t, t_prev) for every step, t_prev = -1 for the last one."""
        return list(zip(self.timesteps, [*self.timesteps[1:], -1]))

    def needs_noise(self, t: int, t_prev: int) -> bool:
        """Whether ``step(.., t, t_prev, ..)`` uses a noise tensor."""
        raise NotImplementedError

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t_prev} from x_t and the model output at t."""
        raise NotImplementedError

    def _predict(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the model output, x0 clipped to [-clip, clip] (eps made consistent)."""
        x0, eps = self.schedule.split(x_t, t, model_output)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            abar = self.schedule.alpha_bar(t)
            eps = (x_t - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        return x0, eps


def _check_pair(t: int, t_prev: int, timesteps: int) -> tuple[int, int]:
    t, t_prev = int(t), int(t_prev)
    if not 0 <= t < timesteps or not -1 <= t_prev < t:
        raise ValueError(f"need 0 <= t < {timesteps} and -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
    return t, t_prev


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) over ``num_steps`` of the schedule's timesteps.

    Spacing: ``round((T - 1) * k / (num_steps - 1))`` for k = num_steps-1 .. 0,
    i.e. evenly spaced from T-1 down to 0, both included (T=1000, 10 steps:
    999, 888, ..., 111, 0); ``num_steps = T`` visits every timestep. ``eta``
    scales the noise: 0 is deterministic, 1 with all T steps is DDPM.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, eta: float = 0.0, clip_x0: float | None = None) -> None:
        super().__init__(schedule, clip_x0)
        total = schedule.timesteps
        if not 1 <= num_steps <= total:
            raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        self.num_steps = int(num_steps)
        self.eta = float(eta)
        if num_steps == 1:
            self.timesteps = [total - 1]
        else:
            self.timesteps = [round((total - 1) * k / (num_steps - 1)) for k in range(num_steps - 1, -1, -1)]

    def _sigma(self, abar_t: float, abar_prev: float) -> float:
        if self.eta == 0.0:
            return 0.0
        return self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))

    def needs_noise(self, t: int, t_prev: int) -> bool:
        return self.eta > 0.0 and t_prev >= 0

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise."""
        t, t_prev = _check_pair(t, t_prev, self.schedule.timesteps)
        x0, eps = self._predict(model_output, t, x_t)
        abar_t, abar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        sigma = self._sigma(abar_t, abar_prev)
        x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0.0:
            if noise is None:
                raise ValueError(f"DDIM with eta={self.eta} needs a noise tensor of shape {tuple(x_t.shape)}")
            x_prev = x_prev + sigma * noise.to(x_t.dtype)
        return x_prev


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020) over all T timesteps, variance beta_tilde.

    ``step`` also accepts a skip (t_prev < t - 1), using the effective
    beta = 1 - abar_t / abar_prev between the two timesteps.
    """

    def __init__(self, schedule: NoiseSchedule, clip_x0: float | None = None) -> None:
        super().__init__(schedule, clip_x0)
        self.num_steps = schedule.timesteps
        self.timesteps = list(range(schedule.timesteps - 1, -1, -1))

    def needs_noise(self, t: int, t_prev: int) -> bool:
        return t_prev >= 0

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample q(x_{t_prev} | x_t, x0_pred): posterior mean plus sqrt(beta_tilde) noise."""
        t, t_prev = _check_pair(t, t_prev, self.schedule.timesteps)
        x0, _ = self._predict(model_output, t, x_t)
        abar_t, abar_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_prev)
        alpha = abar_t / abar_prev
        beta = 1.0 - alpha
        coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
        coef_xt = math.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)
        x_prev = coef_x0 * x0 + coef_xt * x_t
        variance = beta * (1.0 - abar_prev) / (1.0 - abar_t)
        if variance > 0.0:
            if noise is None:
                raise ValueError(f"DDPM step t={t} needs a noise tensor of shape {tuple(x_t.shape)}")
            x_prev = x_prev + math.sqrt(variance) * noise.to(x_t.dtype)
        return x_prev


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise from ``generator`` (drawn on its device, then moved: same seed, same noise)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    sampler: Sampler,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    x_T: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``sampler`` from x_T (drawn from ``generator`` unless given) to x0.

    ``model_fn(x_t, t)`` gets ``t`` as a long tensor (B,) and returns the
    prediction the schedule expects. Every step's noise comes from
    ``generator``, so the same seed gives the same result.
    """
    shape = tuple(int(s) for s in shape)
    if x_T is None:
        x = randn(shape, generator, device, dtype)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=dtype)
    log.debug("sampling %s with %s (%d steps)", shape, type(sampler).__name__, len(sampler.timesteps))
    for t, t_prev in tqdm(sampler.pairs(), desc="sampling", unit="step", disable=not progress):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        output = model_fn(x, t_batch)
        noise = randn(shape, generator, device, dtype) if sampler.needs_noise(t, t_prev) else None
        x = sampler.step(output, t, t_prev, x, noise)
    return x
