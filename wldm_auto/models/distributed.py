"""Several processes (torchrun), shared by training and prediction: the process group from the environment,
and one case's tiled network passes spread over its ranks (``diffusion/ranks.py``).

torchrun (``python -m torch.distributed.run``) sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT and TORCHELASTIC_RUN_ID; a process started by it joins the
default process group (NCCL on CUDA, Gloo on CPU) even when it is the only
one, so ``torchrun --nproc_per_node 1`` runs the same code as a larger launch.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wldm_auto.diffusion.ranks import RankShare

log = logging.getLogger(__name__)

__all__ = ["ProcessRanks", "RankShare", "launched_by_torchrun", "ranks_from_env", "init_process_group",
           "share_tiles"]


@dataclass(frozen=True)
class ProcessRanks:
    """This process's place among those of one launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE > 1)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def ranks_from_env() -> ProcessRanks:
    """Rank, world size and local rank that torchrun set (rank 0 of 1 without it); joins no group."""
    if not launched_by_torchrun():
        return ProcessRanks()
    return ProcessRanks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                        int(os.environ.get("LOCAL_RANK", "0")))


PROCESS_GROUP_TIMEOUT = timedelta(hours=2)  # how long a rank waits in a collective before the run fails


def init_process_group(use_cuda: bool) -> ProcessRanks:
    """Join the default process group when launched by torchrun (NCCL with ``use_cuda``, else Gloo; the
    CUDA device is set to LOCAL_RANK first); rank 0 of 1 otherwise. Idempotent."""
    if not launched_by_torchrun():
        return ProcessRanks()
    local_rank = ranks_from_env().local_rank
    if not dist.is_initialized():
        if use_cuda:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} CUDA "
                                 "device(s); start at most that many processes per node (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
        # rank 0 validates whole volumes alone while the others wait in a collective: NCCL's default 10 minutes
        # would end a long validation as a "collective timeout"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        log.info("process group: backend %s, rank %d of %d (local rank %d)", dist.get_backend(),
                 dist.get_rank(), dist.get_world_size(), local_rank)
    return ProcessRanks(dist.get_rank(), dist.get_world_size(), local_rank)


def share_tiles(synthesizers: Iterable[object], share: RankShare | None) -> None:
    """Spread every tiled pass of these synthesizers (encode, sampling steps, decode, regression window)
    over the ranks of ``share`` (None: back to one process). Each rank must then predict the same cases
    with the same settings and seed, in the same order."""
    for synthesizer in synthesizers:
        if not hasattr(synthesizer, "share"):
            raise TypeError(f"{type(synthesizer).__name__} cannot spread its work over ranks")
        synthesizer.share = share
