"""Prediction over several processes: a share of the cases per process, or one case over every rank.

Case shares: part I of N (``--num-parts N --part-id I``, e.g. a job array)
takes ``cases[I::N]`` of the sorted cases; under torchrun with W ranks, rank
r of that part takes ``cases[I::N][r::W]`` (= ``cases[I + N*r :: N*W]``). Every
case is predicted and written by exactly one process, so the output folder
is the same whatever N and W; each process logs to a file of its own.

``--split-case`` (under torchrun): every rank takes the whole part, and each
case's tiled network passes (VAE encoding, the denoising tiles of every DDIM
step, decoding) are spread over the ranks (``models/distributed.py``); rank
0 decides what happens to each case (predict, skip an existing output, stop
after a full disk), tells the others, and alone writes. The same seed gives
the same voxels as one process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch
import torch.distributed as dist

from wldm_auto.inference.inputs import InputCase, input_files
from wldm_auto.inference.folds import LoadedFold
from wldm_auto.inference.predictor import PredictionOutcome, check_case, synthesize
from wldm_auto.io.images import ImageReadError, read_image
from wldm_auto.models.distributed import (
    ProcessRanks, RankShare, init_process_group, launched_by_torchrun, ranks_from_env, share_tiles,
)
from wldm_auto.preprocessing.case import CaseError

log = logging.getLogger(__name__)

DECISIONS = ("predict", "skip", "stop")


@dataclass(frozen=True)
class PredictionRanks:
    """Which cases this process predicts, and whether it writes them."""

    ranks: ProcessRanks = ProcessRanks()
    split_case: bool = False
    part_id: int = 0
    num_parts: int = 1

    @property
    def splits(self) -> bool:
        """Whether the ranks share each case (``--split-case`` with more than one rank)."""
        return self.split_case and self.ranks.world_size > 1

    @property
    def share(self) -> tuple[int, int]:
        """(part_id, num_parts) of this process's cases for ``prepare_prediction``."""
        if self.split_case or self.ranks.world_size == 1:
            return self.part_id, self.num_parts
        return self.part_id + self.num_parts * self.ranks.rank, self.num_parts * self.ranks.world_size

    @property
    def writes(self) -> bool:
        """False only on the ranks other than 0 of a ``--split-case`` run: they compute, rank 0 writes."""
        return not self.splits or self.ranks.is_main

    def log_prefix(self, prefix: str = "predict") -> str:
        """Log-file prefix naming the part and rank, so processes sharing an output never share a log."""
        if self.num_parts > 1:
            prefix += f"_part{self.part_id}of{self.num_parts}"
        if self.ranks.world_size > 1:
            prefix += f"_rank{self.ranks.rank}"
        return prefix

    def spread(self, folds: list[LoadedFold]) -> None:
        """With ``--split-case``: spread every tiled pass of these folds over the ranks."""
        if self.splits:
            share_tiles([f.synthesizer for f in folds], RankShare(self.ranks.rank, self.ranks.world_size))

    def announce(self, case: InputCase, decision: str) -> None:
        """Rank 0: tell the other ranks of a ``--split-case`` run what to do with ``case``."""
        if self.splits:
            dist.broadcast_object_list([decision], src=0)

    def _hear(self) -> str:
        message: list[str | None] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] not in DECISIONS:
            raise RuntimeError(f"rank 0 sent {message[0]!r}, not one of {DECISIONS}")
        return str(message[0])

    def follow(self, folds: list[LoadedFold], cases: list[InputCase], output: Path, steps: int | None,
               samples: int | None, seed: int, eta: float | None, ending: str | None = None, save_std: bool = False,
               confidence_hu: float | None = None) -> list[PredictionOutcome]:
        """Ranks > 0 of a ``--split-case`` run: compute every case rank 0 predicts, write nothing.

        Every check rank 0 makes before sampling is made here too (same input, same result), so all
        ranks enter the shared passes of a case, or none does. ``save_std`` and ``confidence_hu`` must be
        rank 0's: they decide which passes run (a posterior-mean model samples only for a std map; a
        regression U-Net with an error head runs its two-output pass), and every rank must run the same ones."""
        protected = input_files(cases)
        outcomes = []
        for case in cases:
            decision = self._hear()
            if decision != "predict":
                status = "skipped" if decision == "skip" else "failed"
                outcomes.append(PredictionOutcome(case.name, status, f"rank 0: {decision}"))
                continue
            try:
                present, available = check_case(folds, case, output, ending, protected)
                images = {c: read_image(case.channels[c], sitk.sitkFloat32) for c in present}
                synthesize(folds, images, available, steps, samples, seed, eta, want_std=save_std,
                           names=[str(case.channels[c]) for c in present], progress=False,
                           confidence_hu=confidence_hu)
                outcomes.append(PredictionOutcome(case.name, "done", "computed with rank 0, which writes"))
            except (ImageReadError, CaseError, ValueError, OSError) as exc:
                log.error("%s failed: %s", case.name, exc)
                outcomes.append(PredictionOutcome(case.name, "failed", str(exc)))
        return outcomes

    def finish(self) -> None:
        """Leave the process group (if this run joined one)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def start_ranks(device: torch.device, split_case: bool = False, num_parts: int = 1,
                part_id: int = 0) -> tuple[PredictionRanks, torch.device]:
    """This process's :class:`PredictionRanks` and device (``cuda:LOCAL_RANK`` under torchrun).

    Joins a process group only for ``--split-case`` (case shares need no
    communication). ValueError for a bad part or too few GPUs for ``--split-case``.
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"--num-parts must be a positive integer, got {num_parts!r}")
    if isinstance(part_id, bool) or not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise ValueError(f"--part-id must be an integer from 0 to {num_parts - 1} (--num-parts {num_parts}), "
                         f"got {part_id!r}")
    if split_case and not launched_by_torchrun():
        log.warning("--split-case without torchrun: this one process computes every tile "
                    "(launch with torchrun --nproc_per_node N to spread a case over N processes)")
    ranks = init_process_group(device.type == "cuda") if split_case else ranks_from_env()
    if device.type == "cuda" and launched_by_torchrun():
        count = torch.cuda.device_count()
        device = torch.device("cuda", ranks.local_rank % count)
        if ranks.local_rank >= count:
            log.info("local rank %d shares %s (%d GPU(s) on this node)", ranks.local_rank, device, count)
        torch.cuda.set_device(device)
    setup = PredictionRanks(ranks, split_case, part_id, num_parts)
    if ranks.world_size > 1:
        how = "every case spread over all ranks" if split_case else "a share of the cases each"
        log.info("rank %d of %d (%s) on %s", ranks.rank, ranks.world_size, how, device)
    return setup, device
