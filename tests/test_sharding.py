"""Extraction scheduling: which rows each rank computes, padding, and gathering in row order.

Ranks are simulated by threads whose ``gather`` meets at a barrier (any world size, in one process), and run for
real as two CPU processes under ``accelerate launch``.
"""

from __future__ import annotations

import json
import textwrap
import threading

import pytest
import torch
from device_harness import launch_two_processes

from ddae_diffusers.probing.sharding import Ranks, gather_parts, sharded_batches, sharded_rows

WIDTH = 3


def rows_of(ids) -> torch.Tensor:
    """(len(ids), WIDTH): row ``i`` is ``ids[i] + [0, 0.25, 0.5]``, exact in bfloat16 for ids below 64."""
    return torch.tensor(ids, dtype=torch.float32).reshape(-1, 1) + torch.arange(WIDTH) / 4


class ThreadRanks:
    """``world`` fake accelerators whose ``gather`` concatenates every thread's tensor, as an all-gather does."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.sent: list[list[torch.Tensor]] = [[] for _ in range(world)]  # per rank, the padded blocks it gathered
        self.computed: list[list[list[int]]] = [[] for _ in range(world)]  # per rank, the ids it computed

    def accelerator(self, rank: int):
        group = self

        class Accelerator:
            num_processes, process_index, device = group.world, rank, torch.device("cpu")

            @staticmethod
            def gather(tensor: torch.Tensor) -> torch.Tensor:
                group.sent[rank].append(tensor.clone())
                group.barrier.wait()  # every rank has sent its block for this gather
                out = torch.cat([sent[len(group.sent[rank]) - 1] for sent in group.sent])
                group.barrier.wait()
                return out

        return Accelerator()

    def compute(self, rank: int, dtype: torch.dtype = torch.float32):
        def compute(ids: list[int]) -> torch.Tensor:
            self.computed[rank].append(list(ids))
            return rows_of(ids).to(dtype)

        return compute

    def run(self, work) -> list:
        """``work(rank, accelerator, compute)`` on every rank at once; the results in rank order."""
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int):
            try:
                results[rank] = work(rank, self.accelerator(rank), self.compute(rank))
            except BaseException as error:  # surfaced below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


# ------------------------------------------------------------------ the schedule
@pytest.mark.parametrize("world", [1, 2, 3])
def test_strided_rows_cover_every_row_once(world):
    ids = [7, 3, 11, 0, 5]
    shares = [Ranks(world, rank).strided(ids) for rank in range(world)]
    assert shares == [ids[rank::world] for rank in range(world)]
    assert sorted(sum(shares, [])) == sorted(ids)
    assert Ranks(world).strided_counts(len(ids)) == [len(share) for share in shares]


def test_rounds_give_rank_r_the_r_th_batch_of_each_round():
    assert Ranks(2).rounds(5) == [range(0, 2), range(2, 4), range(4, 5)]
    assert Ranks(3).rounds(3) == [range(0, 3)]
    assert Ranks(1).rounds(2) == [range(0, 1), range(1, 2)]
    assert Ranks(2).rounds(0) == []


def test_ranks_of_an_accelerator_and_a_bad_rank():
    assert Ranks.of(None) == Ranks(1, 0) and Ranks.of(None).is_main
    group = ThreadRanks(2)
    assert Ranks.of(group.accelerator(1)) == Ranks(2, 1) and not Ranks(2, 1).is_main
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        Ranks(2, 2)


# ------------------------------------------------------------------ one process
def test_one_process_computes_everything_in_float32_without_padding():
    group = ThreadRanks(1)
    rows = sharded_rows([4, 1, 9], group.compute(0, torch.bfloat16), WIDTH)
    assert rows.dtype == torch.float32 and torch.equal(rows, rows_of([4, 1, 9]))
    batches = list(sharded_batches([[0, 1], [2]], group.compute(0), WIDTH))
    assert [ids for ids, _ in batches] == [[0, 1], [2]]
    assert all(torch.equal(block, rows_of(ids)) for ids, block in batches)
    assert group.computed[0] == [[4, 1, 9], [0, 1], [2]]
    assert sharded_rows([], group.compute(0), WIDTH).shape == (0, WIDTH)
    assert group.computed[0] == [[4, 1, 9], [0, 1], [2]]  # no call for no rows


def test_wrong_row_count_is_refused():
    with pytest.raises(ValueError, match=r"rank 0 has rows of shape \(2, 3\) for counts \[3\]"):
        gather_parts(torch.zeros(2, 3), [3])


# ------------------------------------------------------------------ several ranks (threads)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("ids", [[7, 3, 11, 0, 5], [6], [2, 8], list(range(12))])
def test_strided_rows_are_gathered_in_row_order_on_every_rank(world, ids):
    group = ThreadRanks(world)
    results = group.run(lambda rank, accelerator, compute: sharded_rows(ids, compute, WIDTH, accelerator))
    for rank, rows in enumerate(results):
        assert torch.equal(rows, rows_of(ids)), rank
        share = ids[rank::world]
        assert group.computed[rank] == ([share] if share else [])
        # every rank sends one block padded with zero rows to the largest share
        (sent,) = group.sent[rank]
        assert sent.shape == (len(ids[0::world]), WIDTH) and sent.dtype == torch.float32
        assert torch.equal(sent[: len(share)], rows_of(share)) and not sent[len(share) :].any()


@pytest.mark.parametrize("world", [2, 3])
def test_batches_go_round_robin_and_come_back_in_order(world):
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10], [11]]
    group = ThreadRanks(world)
    results = group.run(lambda rank, accelerator, compute: list(sharded_batches(batches, compute, WIDTH, accelerator)))
    for rank, received in enumerate(results):
        assert [ids for ids, _ in received] == batches
        assert all(torch.equal(block, rows_of(ids)) for ids, block in received)
        assert group.computed[rank] == batches[rank::world]
        rounds = [batches[k : k + world] for k in range(0, len(batches), world)]
        assert len(group.sent[rank]) == len(rounds)  # one gather per round, on every rank
        for sent, batch_round in zip(group.sent[rank], rounds, strict=True):
            mine = batch_round[rank] if rank < len(batch_round) else []
            assert sent.shape == (max(len(batch) for batch in batch_round), WIDTH)
            assert torch.equal(sent[: len(mine)], rows_of(mine)) and not sent[len(mine) :].any()


# ------------------------------------------------------------------ two real processes
TWO_RANKS = """
import json
import os
import sys

import torch
from accelerate import Accelerator
from ddae_diffusers.probing.sharding import sharded_batches, sharded_rows

accelerator = Accelerator()
computed, sent = [], []
gather = accelerator.gather


def recording_gather(tensor):
    sent.append(tensor.tolist())
    return gather(tensor)


accelerator.gather = recording_gather


def compute(ids):
    computed.append(list(ids))
    return (torch.tensor(ids, dtype=torch.float32).reshape(-1, 1) + torch.arange(3) / 4).to(torch.bfloat16)


rows = sharded_rows([7, 3, 11, 0, 5], compute, 3, accelerator)
batches = [[ids, block.tolist()] for ids, block in sharded_batches([[0, 1, 2], [3, 4, 5], [6, 7]], compute, 3,
                                                                       accelerator)]
with open(os.path.join(sys.argv[1], f"rank-{accelerator.process_index}.json"), "w") as f:
    json.dump({"computed": computed, "sent": sent, "rows": rows.tolist(), "dtype": str(rows.dtype),
               "batches": batches}, f)
accelerator.end_training()  # leaves the process group on every rank before exiting
"""


def test_two_processes_compute_their_share_and_gather_in_row_order(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    done = launch_two_processes(str(script), str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [result["computed"] for result in results] == [[[7, 11, 5], [0, 1, 2], [6, 7]], [[3, 0], [3, 4, 5]]]
    for result in results:
        assert result["dtype"] == "torch.float32"
        assert result["rows"] == rows_of([7, 3, 11, 0, 5]).tolist()
        assert result["batches"] == [[ids, rows_of(ids).tolist()] for ids in ([0, 1, 2], [3, 4, 5], [6, 7])]
    # rank 1 pads its 2 strided rows to 3, and sends 2 zero rows in the last round, where it has no batch
    assert results[1]["sent"] == [
        rows_of([3, 0]).tolist() + [[0.0] * WIDTH],
        rows_of([3, 4, 5]).tolist(),
        [[0.0] * WIDTH] * 2,
    ]
    assert results[0]["sent"] == [rows_of([7, 11, 5]).tolist(), rows_of([0, 1, 2]).tolist(), rows_of([6, 7]).tolist()]
