"""Which rows each process computes, and the gathering of what they computed, in row order.

Under ``accelerate launch`` every rank runs the same schedule, so each knows which rows every other rank computes
and how many: nothing but the features travels. Two schedules share one gather:

- :func:`sharded_rows` splits one batch: rank ``r`` computes ``ids[r::world]``, and every rank gets the whole batch
  back in the order of ``ids`` (the online protocol, whose heads train on every rank's batch).
- :func:`sharded_batches` splits a list of batches: in round ``k`` rank ``r`` computes batch ``k * world + r``, and
  every rank gets each batch in list order (the feature cache, whose main process writes them).

A gather (:func:`gather_parts`) pads each rank's rows with zeros to the round's largest count (a collective needs
one shape on every rank), all-gathers them on the accelerator's device and cuts the padding off again. Rows are
float32 whatever the computed dtype; with one process nothing is padded or moved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

Compute = Callable[[list[int]], torch.Tensor]  # row ids (B,) -> (B, width) rows


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``world`` processes (rank 0, the main process, writes and reports)."""

    world: int = 1
    rank: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}: give a rank below the world size.")

    @classmethod
    def of(cls, accelerator=None) -> Ranks:
        """The ranks of ``accelerator`` (an ``accelerate.Accelerator``); one process without one."""
        if accelerator is None:
            return cls()
        return cls(accelerator.num_processes, accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def strided(self, ids: Sequence[int]) -> list[int]:
        """The rows of ``ids`` this rank computes: ``ids[rank::world]``."""
        return list(ids)[self.rank :: self.world]

    def strided_counts(self, num_rows: int) -> list[int]:
        """How many of ``num_rows`` rows each rank computes under :meth:`strided`, in rank order."""
        return [len(range(r, num_rows, self.world)) for r in range(self.world)]

    def rounds(self, num_batches: int) -> list[range]:
        """Batch indices by round: round ``k`` holds batches ``k * world`` up to ``k * world + world - 1`` (fewer in
        the last), rank ``r`` computing the ``r``-th."""
        return [range(k, min(k + self.world, num_batches)) for k in range(0, num_batches, self.world)]


def gather_parts(part: torch.Tensor, counts: Sequence[int], accelerator=None) -> list[torch.Tensor]:
    """Every rank's rows, in rank order, on every rank: ``part`` (counts[rank], D) is this rank's.

    Returns ``world`` float32 tensors ``(counts[r], D)``, on the accelerator's device (with one process, ``part``'s).
    Call it on every rank with the same ``counts``."""
    ranks = Ranks.of(accelerator)
    if len(counts) != ranks.world or part.ndim != 2 or part.shape[0] != counts[ranks.rank]:
        raise ValueError(
            f"rank {ranks.rank} has rows of shape {tuple(part.shape)} for counts {list(counts)}: give (count, D) "
            "rows and one count per process."
        )
    if ranks.world == 1:
        return [part.to(torch.float32)]
    rows = max(counts)
    block = torch.zeros(rows, part.shape[1], dtype=torch.float32, device=accelerator.device)
    block[: part.shape[0]] = part
    gathered = accelerator.gather(block).view(ranks.world, rows, part.shape[1])
    return [gathered[r, :count] for r, count in enumerate(counts)]


def _computed(compute: Compute, ids: list[int], width: int) -> torch.Tensor:
    """(len(ids), width) rows ``ids`` (no call for no rows)."""
    return compute(ids) if ids else torch.zeros(0, width)


def sharded_rows(ids: Sequence[int], compute: Compute, width: int, accelerator=None) -> torch.Tensor:
    """(len(ids), width) float32 rows ``ids`` in that order, on every rank; rank ``r`` computes ``ids[r::world]``
    with ``compute`` (on the accelerator's device; with one process, where ``compute`` returns them)."""
    ranks = Ranks.of(accelerator)
    counts = ranks.strided_counts(len(ids))
    parts = gather_parts(_computed(compute, ranks.strided(ids), width), counts, accelerator)
    if ranks.world == 1:
        return parts[0]
    rows = parts[0].new_empty((len(ids), width))
    for r, part in enumerate(parts):
        rows[r :: ranks.world] = part
    return rows


def sharded_batches(
    batches: Sequence[Sequence[int]], compute: Compute, width: int, accelerator=None
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yields ``(ids, (len(ids), width) float32 rows)`` of every batch in list order, on every rank, a round of
    ``world`` batches at a time: in round ``k`` rank ``r`` computes batch ``k * world + r`` with ``compute``.

    Every rank must pass the same ``batches`` and consume the whole iterator (each round is one gather)."""
    ranks = Ranks.of(accelerator)
    for batch_round in ranks.rounds(len(batches)):
        round_batches = [list(batches[i]) for i in batch_round]
        counts = [len(batch) for batch in round_batches] + [0] * (ranks.world - len(round_batches))
        mine = round_batches[ranks.rank] if ranks.rank < len(round_batches) else []
        parts = gather_parts(_computed(compute, mine, width), counts, accelerator)
        yield from zip(round_batches, parts, strict=False)


__all__ = ["Compute", "Ranks", "gather_parts", "sharded_batches", "sharded_rows"]
