"""Spreading the tile batches of one tiled network pass over the ranks of a torch.distributed group.

Every rank holds the same inputs (same volume, same seed, hence the same
noise) and walks the same list of batches. Batch ``b`` is computed by rank
``b % world_size``; after every round of ``world_size`` batches the outputs
are all-gathered, so each rank sees every batch's output and blends them
itself, in batch order. The tile outputs are gathered rather than the
partial blended sums all-reduced: an all-reduce adds per-rank partial sums
in an order that depends on the number of ranks (and the backend), so the
blend would change in its last bits with the rank count; summing the
gathered outputs in batch order gives exactly the bits of one process, for
any number of ranks. Each batch holds the same tiles as in one process, so
its network output is the same too. The traffic is about that of an
all-reduce of the blended volume (the tiles cover it ~1.5-2 times).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankShare:
    """This process's place in a torch.distributed group whose ranks share every tiled pass.

    ``group``: the process group (None: the default one, which must be initialised).
    """

    rank: int
    world_size: int
    group: Any = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size} process(es)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every rank, in rank order (Gloo: through the CPU)."""
        device = tensor.device
        if dist.get_backend(self.group) == "gloo" and device.type != "cpu":
            tensor = tensor.cpu()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return [p.to(device) for p in parts]

    def _like(self, output: torch.Tensor | None) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
        """(shape, dtype, device) of a batch output, from rank 0 (it always has a batch in the first round)."""
        meta = [None if output is None else (tuple(output.shape[1:]), output.dtype, str(output.device))]
        dist.broadcast_object_list(meta, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        shape, dtype, device = meta[0]
        if output is not None:
            return shape, dtype, output.device
        device = torch.device(device)  # rank 0's; this rank's own device of that type
        return shape, dtype, torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def map_batches(
    sizes: list[int], compute: Callable[[int], torch.Tensor], share: RankShare | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, output) of every batch, in index order; ``compute(b)`` returns batch ``b``'s output
    (``sizes[b]`` items along the first axis, every batch's items of one shape).

    Without ``share`` (or with one rank) this is ``compute`` over the batches in
    turn. With a share, each rank computes only its batches and receives the
    others' outputs (see the module docstring); every rank must call this with
    the same ``sizes``. ``dtype``: outputs are cast to it (before gathering).
    """
    def own(b: int) -> torch.Tensor:
        out = compute(b)
        if out.shape[0] != sizes[b]:
            raise ValueError(f"batch {b}: {out.shape[0]} outputs for {sizes[b]} items")
        return out if dtype is None else out.to(dtype)

    if share is None or share.world_size == 1:
        for b in range(len(sizes)):
            yield b, own(b)
        return
    world, rank, padded = share.world_size, share.rank, max(sizes, default=0)
    like: tuple | None = None
    for first in range(0, len(sizes), world):
        mine = first + rank
        output = own(mine) if mine < len(sizes) else None
        if like is None:  # every rank needs the shape to take part, also one without a batch
            like = share._like(output) if len(sizes) < world else (tuple(output.shape[1:]), output.dtype,
                                                                   output.device)
        shape, out_dtype, device = like
        send = torch.zeros((padded, *shape), dtype=out_dtype, device=device)
        if output is not None:
            send[: output.shape[0]] = output
        for r, part in enumerate(share._gather(send)):
            if first + r < len(sizes):
                yield first + r, part[: sizes[first + r]]
