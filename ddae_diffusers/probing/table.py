"""Feature tables: named (N, D) feature columns, read a block of rows at a time.

The grid's heads, kNN and scores read their features through a table and never as whole arrays, so their memory
grows with the block size times the summed width of the columns, not with N. A table is either held in memory
(:meth:`FeatureTable.from_tensors`) or read from the feature cache's files on demand
(:meth:`~ddae_diffusers.probing.cache.FeatureCache.extract`); row subsets, stacked views and fused columns are
tables too, computed block by block.

A table also names a ``device``: where its rows are (that of its tensors when in memory, the CPU when read from the
cache) and so where the probe computes by default. Consumers move each block to the device they compute on
(:func:`to_device`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import UsageError

CHUNK_ROWS = 4096  # rows per block when a table is read in order (scores, statistics, kNN)
Reader = Callable[[np.ndarray, list], dict]  # (rows (B,) int64, keys) -> {key: (B, D_key) tensor}
Device = torch.device | str
FLOAT64_DEVICES = ("cpu", "cuda")  # device types with float64 kernels (not Apple's MPS, for one)


def as_rows(rows: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Row ids as a flat int64 array."""
    if isinstance(rows, torch.Tensor):
        rows = rows.cpu().numpy()
    return np.asarray(rows, dtype=np.int64).reshape(-1)


def compute_device(device: Device | None, *tables: FeatureTable) -> torch.device:
    """``device`` if given, else the first of ``tables``' devices that is not the CPU, else the CPU."""
    if device is not None:
        return torch.device(device)
    return next((table.device for table in tables if table.device.type != "cpu"), torch.device("cpu"))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when already there); copies to an accelerator do not block the host."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def block_to(block: Mapping[Hashable, torch.Tensor], device: torch.device) -> dict:
    """``{key: (B, D_key)}`` with every tensor on ``device``, dtypes kept."""
    return {key: to_device(value, device) for key, value in block.items()}


def stats_dtype(device: Device) -> torch.dtype:
    """float64 on devices that have it (CPU, CUDA), float32 elsewhere (e.g. MPS)."""
    return torch.float64 if torch.device(device).type in FLOAT64_DEVICES else torch.float32


class FeatureTable(Mapping):
    """``{key: (N, D_key)}`` features whose rows are produced on demand by ``reader(rows, keys)``.

    ``table[key]`` reads one whole column (meant for small tables and tests); the probe reads blocks with
    :meth:`read` and :meth:`chunks`. ``device`` is where the reader's tensors are (default: the CPU).
    """

    def __init__(self, dims: Mapping[Hashable, int], num_rows: int, reader: Reader, device: Device | None = None):
        self.dims = {key: int(width) for key, width in dims.items()}
        self.num_rows = int(num_rows)
        self._reader = reader
        self.device = torch.device("cpu" if device is None else device)

    @classmethod
    def from_tensors(cls, features: Mapping[Hashable, torch.Tensor]) -> FeatureTable:
        """A table over in-memory (N, D) tensors of any device and dtype (returned as is when ``features`` is
        already a table); its ``device`` is the tensors' (the first non-CPU one when they differ)."""
        if isinstance(features, FeatureTable):
            return features
        shapes = {key: tuple(value.shape) for key, value in features.items()}
        if any(len(shape) != 2 for shape in shapes.values()) or len({shape[0] for shape in shapes.values()}) > 1:
            raise UsageError(f"Features must be (N, D) tensors with one N, got shapes {shapes}.")
        num_rows = next(iter(shapes.values()))[0] if shapes else 0
        devices = [value.device for value in features.values()]
        device = next((d for d in devices if d.type != "cpu"), torch.device("cpu"))

        def reader(rows: np.ndarray, keys: list) -> dict:
            index = torch.from_numpy(rows)
            return {key: features[key][to_device(index, features[key].device)] for key in keys}

        return cls({key: shape[1] for key, shape in shapes.items()}, num_rows, reader, device)

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
        return torch.cat(blocks) if blocks else torch.empty(0, self.dims[key], device=self.device)

    def __iter__(self) -> Iterator:
        return iter(self.dims)

    def __len__(self) -> int:
        return len(self.dims)

    def select(self, keys: Iterable) -> FeatureTable:
        """The same rows with only ``keys`` (only their columns are read)."""
        keys = list(keys)
        return FeatureTable({key: self.dims[key] for key in keys}, self.num_rows, self._reader, self.device)

    def subset(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> FeatureTable:
        """The table of rows ``rows`` (in that order): its row i is this table's row ``rows[i]``."""
        rows = as_rows(rows)
        return FeatureTable(self.dims, len(rows), lambda index, keys: self._reader(rows[index], keys), self.device)

    def fuse(self, candidates: Mapping[Hashable, Sequence[Hashable]]) -> FeatureTable:
        """``{name: (N, sum of D)}``: each candidate's columns side by side, float32, on this table's device."""
        candidates = {name: list(keys) for name, keys in candidates.items()}

        def reader(rows: np.ndarray, names: list) -> dict:
            needed = list(dict.fromkeys(key for name in names for key in candidates[name]))
            parts = self._reader(rows, needed)
            return {name: torch.cat([parts[key].float() for key in candidates[name]], dim=1) for name in names}

        dims = {name: sum(self.dims[key] for key in keys) for name, keys in candidates.items()}
        return FeatureTable(dims, self.num_rows, reader, self.device)

    @staticmethod
    def concat_rows(tables: Sequence[FeatureTable]) -> FeatureTable:
        """One table with the rows of ``tables`` (same keys, same device) one after another."""
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
                    out[key][to_device(torch.from_numpy(positions), value.device)] = value
            return out

        return FeatureTable(tables[0].dims, int(starts[-1]), reader, tables[0].device)


def column_stats(
    table: FeatureTable,
    chunk_size: int = CHUNK_ROWS,
    device: Device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
    """``{key: (mean, biased variance)}``, each (D,) float32 on ``device``, from one pass over ``table``.

    Blocks of ``chunk_size`` rows are moved to ``device`` (default: the table's) and accumulated in ``dtype``
    (default: :func:`stats_dtype` of the device, float64 where it exists), merged with Chan et al.'s pairwise update.
    """
    device = compute_device(device, table)
    dtype = stats_dtype(device) if dtype is None else dtype
    if not dtype.is_floating_point:
        raise UsageError(f"column_stats accumulates in a float dtype, got {dtype}: pass dtype=torch.float32.")
    count, mean, m2 = 0, {}, {}
    for rows, block in table.chunks(chunk_size):
        n = len(rows)
        for key, value in block.items():
            x = to_device(value, device).to(dtype)
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


__all__ = [
    "CHUNK_ROWS",
    "FeatureTable",
    "as_rows",
    "block_to",
    "column_stats",
    "compute_device",
    "stats_dtype",
    "to_device",
]
