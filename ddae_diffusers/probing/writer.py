"""Writing computed rows into cache units on a thread, off the path that feeds the accelerator.

The main process hands each computed batch to :class:`CacheWriter` (a bounded queue) and goes on computing. The
thread takes every batch waiting, writes their rows into the units' files, syncs each touched file once, then
appends and syncs the progress records (checksums of the written bytes): a record is never on disk before its
rows, so a kill at any moment leaves only whole, checked ranges. A failure stops all further writes and is raised
in the main process at its next :meth:`~CacheWriter.put` and at :meth:`~CacheWriter.close`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError

if TYPE_CHECKING:
    from .cache import CacheUnit

Target = tuple["CacheUnit", int, int]  # a unit and the columns [start, stop) of the block it holds


class CacheWriter:
    """Writes ``(ids, (B, width) float32 block)`` batches into units (each in its dtype) on a thread; at most
    ``max_pending`` wait.

    ``ready``, when given with a batch, is waited on before its block is read (a CUDA event of its copy to the
    host)."""

    def __init__(self, max_pending: int = 4):
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._where = ""
        self._put = 0
        self._handled = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="feature-cache-writer", daemon=True)
        self._thread.start()

    def put(self, ids: Sequence[int], block: torch.Tensor, targets: Sequence[Target], ready=None) -> None:
        """Queues rows ``ids`` of ``block`` for ``targets`` (waits while ``max_pending`` batches wait); raises the
        writer's failure, if any."""
        self._raise()
        self._queue.put((list(ids), block, list(targets), ready))
        self._put += 1

    def wait(self) -> None:
        """Returns once every queued batch is written and recorded; raises the writer's failure, if any."""
        with self._changed:
            self._changed.wait_for(lambda: self._handled >= self._put)
        self._raise()

    def close(self, raise_error: bool = True) -> None:
        """Writes what is queued, stops the thread and raises its failure (unless ``raise_error`` is False)."""
        self._queue.put(None)
        self._thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            reason = " ".join(f"{type(self._error).__name__}: {self._error}".split())
            raise UsageError(
                f"Writing the feature cache{self._where} failed ({reason}); the rows recorded before are kept: free "
                "disk space or fix the folder, then rerun to compute the rest."
            ) from self._error

    def _run(self) -> None:
        done = False
        while not done:
            items = [self._queue.get()]
            while items[-1] is not None:  # every batch already waiting: one sync per file for all of them
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = items[-1] is None
            items = [item for item in items if item is not None]
            if self._error is None and items:
                try:
                    self._write(items)
                except BaseException as error:  # raised in the main thread; no later batch is written
                    self._error = error
            with self._changed:
                self._handled += len(items)
                self._changed.notify_all()

    def _write(self, items: list) -> None:
        """Writes all rows of ``items``, syncs each touched features file, then records and syncs the ranges."""
        ranges: dict[CacheUnit, list[tuple[int, int, str]]] = {}
        for ids, block, targets, ready in items:
            if ready is not None:
                ready.synchronize()
            stored = {}  # the block in each unit's dtype, converted once
            for unit, start, stop in targets:
                self._where = f" in {os.path.dirname(unit.folder)}"
                if unit.dtype not in stored:
                    stored[unit.dtype] = block.to(unit.dtype).numpy()
                ranges.setdefault(unit, []).extend(unit.put_rows(ids, stored[unit.dtype][:, start:stop]))
        for unit in ranges:
            self._where = f" in {os.path.dirname(unit.folder)}"
            unit.sync()
        for unit, written in ranges.items():
            self._where = f" in {os.path.dirname(unit.folder)}"
            unit.record(written)


__all__ = ["CacheWriter", "Target"]
