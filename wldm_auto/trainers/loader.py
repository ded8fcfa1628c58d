"""Background loading of the step batches, sized to the machine."""
from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader

from wldm_auto.trainers.data import StepBatches

log = logging.getLogger(__name__)

MAX_WORKERS = 8


def default_num_workers() -> int:
    """Cores this process may use, minus one for the main process, clamped to 0..8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cores - 1))


def _worker_init(worker_id: int) -> None:
    """One torch thread per worker: parallelism comes from the workers themselves."""
    torch.set_num_threads(1)


def make_loader(
    step_batches: StepBatches, start_step: int, end_step: int, num_workers: int, pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding the batches of steps ``start_step .. end_step - 1`` in order.

    Each batch depends only on its step (see :class:`StepBatches`), so the result is
    the same for any ``num_workers``; with workers they persist and prefetch.
    """
    if not 0 <= start_step <= end_step:
        raise ValueError(f"need 0 <= start_step <= end_step, got {start_step}, {end_step}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    workers = num_workers > 0
    log.debug("loader: steps %d..%d, %d worker(s)", start_step, end_step - 1, num_workers)
    return DataLoader(
        step_batches, batch_size=None, sampler=range(start_step, end_step), num_workers=num_workers,
        pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers, prefetch_factor=2 if workers else None,
        # a private generator: starting an iterator must not draw from the global torch RNG,
        # or a resumed run (which starts a new iterator mid-training) would drift from a straight one
        generator=torch.Generator().manual_seed(0),
    )
