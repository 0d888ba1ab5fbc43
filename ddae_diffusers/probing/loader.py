"""The pixels of planned batches, read through a ``torch.utils.data.DataLoader`` over a ``datasets`` data set.

Item ``k`` of :class:`PlannedPixels` is batch ``k`` of a plan (its ascending row ids): the rows' images are read
from the Arrow table in one slice, decoded once with the image feature's own decoder, then converted and augmented
per example id (:meth:`~.cache.View.pixels`). Every step is a pure function of the row ids, the view, the resolution
and the seed, so the pixels -- and the features computed from them -- are the same bits whether they are made in
the main process (``num_workers=0``) or in worker processes that prefetch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import View


class PlannedPixels(torch.utils.data.Dataset):
    """Batch ``k`` of ``batches`` -> ``(ids (B,) int64, pixels (B, 3, R, R) float32 in [-1, 1])``."""

    def __init__(self, dataset, image_column: str, view: View, resolution: int, seed: int,
                 batches: Sequence[Sequence[int]]):  # fmt: skip
        import datasets

        self.dataset = dataset
        self.raw = dataset.with_format("arrow")  # encoded values (bytes and path), decoded in __getitem__
        self.feature = dataset.features[image_column]
        self.decodes = isinstance(self.feature, datasets.Image) and self.feature.decode
        self.image_column = image_column
        self.view = view
        self.resolution = resolution
        self.seed = seed
        self.batches = [list(batch) for batch in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def images(self, ids: list[int]) -> list:
        """The decoded images of rows ``ids`` (ascending), read in one slice of the table."""
        consecutive = ids[-1] - ids[0] + 1 == len(ids)
        if self.decodes:
            table = self.raw[ids[0] : ids[-1] + 1] if consecutive else self.raw[ids]
            values = table.column(self.image_column).to_pylist()
            if all(value is not None and value.get("bytes") is not None for value in values):
                return [self.feature.decode_example(value) for value in values]
        rows = self.dataset[ids[0] : ids[-1] + 1] if consecutive else self.dataset.select(ids)[:]
        return rows[self.image_column]  # images given by path, or not an image feature: the data set decodes

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.batches[index]
        pixels = self.view.pixels(self.images(ids), ids, self.resolution, self.seed)
        return torch.tensor(ids, dtype=torch.int64), pixels


def planned_pixels(
    dataset,
    image_column: str,
    view: View,
    resolution: int,
    seed: int,
    batches: Sequence[Sequence[int]],
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(ids, (B, 3, R, R) pixels)`` of every batch in order, loaded by ``num_workers`` processes (0: this one)
    that keep ``prefetch_factor`` batches each ahead, into pinned memory with ``pin_memory``.

    The workers start now (before the caller starts any thread); closing the generator stops them."""
    if not batches:
        return _as_lists(iter(()))
    loader = torch.utils.data.DataLoader(
        PlannedPixels(dataset, image_column, view, resolution, seed, batches),
        batch_size=None,  # each item is already a planned batch
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return _as_lists(iter(loader))


def _as_lists(loaded: Iterator) -> Iterator[tuple[list[int], torch.Tensor]]:
    for ids, pixels in loaded:
        yield ids.tolist(), pixels


__all__ = ["PlannedPixels", "planned_pixels"]
