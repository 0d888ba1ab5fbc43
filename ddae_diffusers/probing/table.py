"""Feature tables: named (N, D) feature columns, read a block of rows at a time.

The grid's heads, kNN and scores read their features through a table and never as whole arrays, so their memory
grows with the block size times the summed width of the columns, not with N. A table is either held in memory
(:meth:`FeatureTable.from_tensors`) or read from the feature cache's files on demand
(:meth:`~ddae_diffusers.probing.cache.FeatureCache.extract`); row subsets, stacked views and fused columns are
tables too, computed block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import UsageError

CHUNK_ROWS = 4096  # rows per block when a table is read in order (scores, statistics, kNN)
Reader = Callable[[np.ndarray, list], dict]  # (rows (B,) int64, keys) -> {key: (B, D_key) tensor}


def as_rows(rows: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Row ids as a flat int64 array."""
    if isinstance(rows, torch.Tensor):
        rows = rows.cpu().numpy()
    return np.asarray(rows, dtype=np.int64).reshape(-1)


class FeatureTable(Mapping):
    """``{key: (N, D_key)}`` features whose rows are produced on demand by ``reader(rows, keys)``.

    ``table[key]`` reads one whole column (meant for small tables and tests); the probe reads blocks with
    :meth:`read` and :meth:`chunks`.
    """

    def __init__(self, dims: Mapping[Hashable, int], num_rows: int, reader: Reader):
        self.dims = {key: int(width) for key, width in dims.items()}
        self.num_rows = int(num_rows)
        self._reader = reader

    @classmethod
    def from_tensors(cls, features: Mapping[Hashable, torch.Tensor]) -> FeatureTable:
        """A table over in-memory (N, D) tensors (returned as is when ``features`` is already a table)."""
        if isinstance(features, FeatureTable):
            return features
        shapes = {key: tuple(value.shape) for key, value in features.items()}
        if any(len(shape) != 2 for shape in shapes.values()) or len({shape[0] for shape in shapes.values()}) > 1:
            raise UsageError(f"Features must be (N, D) tensors with one N, got shapes {shapes}.")
        num_rows = next(iter(shapes.values()))[0] if shapes else 0

        def reader(rows: np.ndarray, keys: list) -> dict:
            index = torch.from_numpy(rows)
            return {key: features[key][index] for key in keys}

        return cls({key: shape[1] for key, shape in shapes.items()}, num_rows, reader)

    def read(self, rows: Sequence[int] | np.ndarray | torch.Tensor, keys: Iterable | None = None) -> dict:
        """``{key: (len(rows), D_key)}`` for ``rows`` in that order (all keys, or ``keys``)."""
        return self._reader(as_rows(rows), list(self.dims) if keys is None else list(keys))

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[tuple[np.ndarray, dict]]:
        """``(rows, block)`` for consecutive blocks of at most ``size`` rows, in order."""
        for start in range(0, self.num_rows, size):
            rows = np.arange(start, min(start + size, self.num_rows))
            yield rows, self.read(rows)

    def __getitem__(self, key: Hashable) -> torch.Tensor:
        if key not in self.dims:
            raise KeyError(key)
        blocks = [block[key] for _, block in self.select([key]).chunks()]
        return torch.cat(blocks) if blocks else torch.empty(0, self.dims[key])

    def __iter__(self) -> Iterator:
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)

    def select(self, keys: Iterable) -> FeatureTable:
        """The same rows with only ``keys`` (only their columns are read)."""
        keys = list(keys)
        return FeatureTable({key: self.dims[key] for key in keys}, self.num_rows, self._reader)

    def subset(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> FeatureTable:
        """The table of rows ``rows`` (in that order): its row i is this table's row ``rows[i]``."""
        rows = as_rows(rows)
        return FeatureTable(self.dims, len(rows), lambda index, keys: self._reader(rows[index], keys))

    def fuse(self, candidates: Mapping[Hashable, Sequence[Hashable]]) -> FeatureTable:
        """``{name: (N, sum of D)}``: each candidate's columns side by side, float32."""
        candidates = {name: list(keys) for name, keys in candidates.items()}

        def reader(rows: np.ndarray, names: list) -> dict:
            needed = list(dict.fromkeys(key for name in names for key in candidates[name]))
            parts = self._reader(rows, needed)
            return {name: torch.cat([parts[key].float() for key in candidates[name]], dim=1) for name in names}

        dims = {name: sum(self.dims[key] for key in keys) for name, keys in candidates.items()}
        return FeatureTable(dims, self.num_rows, reader)

    @staticmethod
    def concat_rows(tables: Sequence[FeatureTable]) -> FeatureTable:
        """One table with the rows of ``tables`` (same keys) one after another."""
        if len(tables) == 1:
            return tables[0]
        starts = np.cumsum([0] + [table.num_rows for table in tables])

        def reader(rows: np.ndarray, keys: list) -> dict:
            source = np.searchsorted(starts, rows, side="right") - 1
            out: dict = {}
            for i, table in enumerate(tables):
                positions = np.flatnonzero(source == i)
                if len(positions) == 0:
                    continue
                part = table._reader(rows[positions] - starts[i], keys)
                for key, value in part.items():
                    if key not in out:
                        out[key] = value.new_empty((len(rows), value.shape[1]))
                    out[key][torch.from_numpy(positions)] = value
            return out

        return FeatureTable(tables[0].dims, int(starts[-1]), reader)


def column_stats(
    table: FeatureTable, chunk_size: int = CHUNK_ROWS
) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
    """``{key: (mean, biased variance)}``, each (D,) float32, from one pass over ``table`` in float64 blocks
    (blocks merged with Chan et al.'s pairwise update)."""
    count, mean, m2 = 0, {}, {}
    for rows, block in table.chunks(chunk_size):
        n = len(rows)
        for key, value in block.items():
            x = value.double()
            block_mean = x.mean(0)
            block_m2 = ((x - block_mean) ** 2).sum(0)
            if key not in mean:
                mean[key], m2[key] = block_mean, block_m2
                continue
            delta = block_mean - mean[key]
            mean[key] = mean[key] + delta * (n / (count + n))
            m2[key] = m2[key] + block_m2 + delta**2 * (count * n / (count + n))
        count += n
    return {key: (mean[key].float(), (m2[key] / count).float()) for key in mean}


__all__ = ["CHUNK_ROWS", "FeatureTable", "as_rows", "column_stats"]
