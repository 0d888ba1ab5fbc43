"""A resumable, self-checking fp16 feature cache for the probe grid.

One *unit* holds the pooled features of every requested layer at one timestep, for one view
of one split: an ``(N, sum of layer widths)`` float16 ``.npy`` file plus ``progress.jsonl``, one
line per written row range with its SHA-256. Units live in folders
named by a fingerprint of everything that determines the numbers: model weights and
scheduler, data set, preprocessing, seed, view, layers, timestep, and the device type and float32 precision
settings that select the kernels.

Extraction streams batches: a ``DataLoader`` (``loader.py``) decodes and converts each planned batch once, one
forward per (batch, timestep) captures all layers, and a writer thread (``writer.py``) writes the pooled rows to
the file, syncs them, then records them. Rows are written and read with positional
file I/O (never a memory map), so a process holds only the rows it asked for: the probe reads
the cache as a :class:`~ddae_diffusers.probing.table.FeatureTable`, a block of rows at a time.
An interrupted extraction resumes from the recorded ranges; a range whose bytes no longer match its checksum, or a file
of the wrong size, is recomputed -- never used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from ..capture import DDAEBackbone, derive_seed
from ..data import pixels_of, random_crop_flip
from ..distributed import broadcast_from_main
from .loader import planned_pixels
from .sharding import Ranks, sharded_batches
from .table import FeatureTable, as_rows
from .writer import CacheWriter, Target

logger = logging.getLogger(__name__)
CACHE_FORMAT = 2  # 2: example noise seeded by capture.derive_seed (format 1 features used other noise)
Key = tuple[str, int]


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    digest.update(name.encode())
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def _hash_module(digest, module: torch.nn.Module) -> None:
    digest.update(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        _hash_tensor(digest, name, tensor)


def weights_fingerprint(backbone: DDAEBackbone) -> str:
    """SHA-256 of the denoiser's (and VAE's) classes and weights, and the scheduler config.

    It reads every weight once; hash before the model moves to an accelerator, where reading means copying back."""
    digest = hashlib.sha256()
    for module in [backbone.denoiser] + ([backbone.vae] if backbone.vae is not None else []):
        _hash_module(digest, module)
    config = dict(backbone.scheduler.config)
    if "_use_default_values" in config:  # diffusers lists them in set order, which changes with the hash seed
        config["_use_default_values"] = sorted(config["_use_default_values"])
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def vae_fingerprint(backbone: DDAEBackbone) -> str:
    """SHA-256 of the VAE's class and weights (the key of its cached latents)."""
    digest = hashlib.sha256()
    _hash_module(digest, backbone.vae)
    return digest.hexdigest()


def model_fingerprint(backbone: DDAEBackbone, weights: str | None = None) -> str:
    """SHA-256 of :func:`weights_fingerprint` (``weights`` when already computed) and, for text-conditioned models,
    the conditioning (the prompt's embeddings)."""
    digest = hashlib.sha256((weights or weights_fingerprint(backbone)).encode())
    for name, tensor in sorted((backbone.conditioning or {}).items()):
        _hash_tensor(digest, f"conditioning.{name}", tensor)
    return digest.hexdigest()


def kernel_settings(device: torch.device) -> dict:
    """What selects the kernels that compute a feature: the device type and the float32 precision settings (on
    CUDA, TF32 for matmuls and cuDNN convolutions; on CPU, oneDNN's). Rows computed under other settings differ
    in the last bits, so they never share a cache unit."""
    device = torch.device(device)
    settings = {"device": device.type, "fp32_precision_default": torch.backends.fp32_precision}
    if device.type == "cuda":
        settings["fp32_precision"] = {
            "matmul": torch.backends.cuda.matmul.fp32_precision,
            "conv": torch.backends.cudnn.conv.fp32_precision,
        }
    elif device.type == "cpu":
        settings["fp32_precision"] = {
            "matmul": torch.backends.mkldnn.matmul.fp32_precision,
            "conv": torch.backends.mkldnn.conv.fp32_precision,
        }
    return settings


def dataset_fingerprint(dataset, split: str) -> str:
    """The ``datasets`` fingerprint of ``dataset`` (stable for files on disk), its split and length."""
    return f"{getattr(dataset, '_fingerprint', 'unknown')}:{split}:{len(dataset)}"


class ViewRole(IntEnum):
    """What a view's pass is for; its number seeds the view's noise and augmentation and is part of its cache key."""

    TRAIN = 0
    EVAL = 1
    ONLINE = 2  # the online protocol's views, recomputed every epoch (never cached)
    PAIR = 3  # a second noise draw of the clean training images (alignment, geometry.py)


@dataclass(frozen=True)
class View:
    """One pass over a split: its ``role`` (a :class:`ViewRole`; a plain 0, 1 or 2 is turned into one), its
    ``index``, and ``augment`` = crop (pad 4) + flip.

    Noise comes from ``derive_seed(seed, role, index)`` and each example's augmentation from
    ``derive_seed(seed, role, index, example_id)``, so the view is independent of batching.
    """

    role: ViewRole
    index: int
    augment: bool

    def __post_init__(self):
        object.__setattr__(self, "role", ViewRole(self.role))

    def noise_seed(self, seed: int) -> int:
        return derive_seed(seed, self.role, self.index)

    def pixels(self, images: list, example_ids: Sequence[int], resolution: int, seed: int) -> torch.Tensor:
        """Images of the batch -> (B, 3, R, R) in [-1, 1], augmented per example when ``augment``."""
        pixels = pixels_of(images, resolution)
        if not self.augment:
            return pixels
        rows = []
        for row, example_id in zip(pixels, example_ids, strict=True):
            generator = torch.Generator().manual_seed(derive_seed(seed, self.role, self.index, example_id))
            rows.append(random_crop_flip(row[None], padding=4, flip=True, generator=generator)[0])
        return torch.stack(rows)


EVAL_VIEW = View(ViewRole.EVAL, 0, False)  # the test split: clean images, noise from derive_seed(seed, 1, 0)
PAIR_VIEW = View(ViewRole.PAIR, 0, False)  # train view 0's images with another noise draw


class CacheUnit:
    """Features of ``layers`` (widths ``dims``) at one timestep for ``num_rows`` examples, on disk, as ``dtype``
    (float16 for features; float32 for the VAE latents of :meth:`FeatureCache.latent_unit`)."""

    def __init__(
        self, folder: str, key: dict, num_rows: int, layers: Sequence[str], dims: Sequence[int],
        dtype: torch.dtype = torch.float16,
    ):  # fmt: skip
        self.folder = folder
        self.dtype = dtype
        self.numpy_dtype = np.dtype(str(dtype).removeprefix("torch."))
        self.key = key
        self.num_rows = num_rows
        self.layers = list(layers)
        self.dims = [int(d) for d in dims]
        self.offsets = np.cumsum([0] + self.dims).tolist()
        self.array_path = os.path.join(folder, "features.npy")
        self.progress_path = os.path.join(folder, "progress.jsonl")
        self.meta_path = os.path.join(folder, "meta.json")
        self._file = None  # the open features.npy; rows start at byte self._data_offset
        self._data_offset = 0
        self.done = np.zeros(num_rows, dtype=bool)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_rows, self.offsets[-1]

    def _expected_meta(self) -> dict:
        meta = {"format": CACHE_FORMAT, "key": self.key, "shape": list(self.shape), "layers": self.layers}
        return meta if self.dtype == torch.float16 else {**meta, "dtype": str(self.numpy_dtype)}

    @property
    def row_bytes(self) -> int:
        return self.offsets[-1] * self.numpy_dtype.itemsize

    def open(self) -> None:
        """Opens or creates the features file, and marks the rows whose recorded checksums still hold."""
        meta_ok, problem = False, None
        if os.path.isfile(self.meta_path):
            try:
                with open(self.meta_path) as f:
                    meta_ok = json.load(f) == json.loads(json.dumps(self._expected_meta()))
                problem = None if meta_ok else "its meta.json describes other features"
            except (OSError, ValueError) as error:
                problem = f"meta.json is unreadable ({type(error).__name__})"
        array = None
        if meta_ok and os.path.isfile(self.array_path):
            try:
                # mapped read-only to check header and size ("r+" would silently extend a truncated file)
                array = np.load(self.array_path, mmap_mode="r")
                if array.shape != self.shape or array.dtype != self.numpy_dtype:
                    array, problem = None, f"features.npy holds {array.shape} {array.dtype}, not {self.shape}"
            except (OSError, ValueError, EOFError) as error:  # empty, truncated header or data
                array, problem = None, f"features.npy is unreadable ({type(error).__name__}: {error})"
        elif meta_ok:
            problem = "features.npy is missing"
        if problem is not None:
            logger.warning(f"Feature cache {self.folder}: {problem}; recomputing it.")
        if array is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder)
            with open(self.meta_path, "w") as f:
                json.dump(self._expected_meta(), f, indent=1)
            array = np.lib.format.open_memmap(self.array_path, mode="w+", dtype=self.numpy_dtype, shape=self.shape)
            array.flush()
        self._data_offset = int(array.offset)
        del array  # unmapped: rows are read and written at their byte offsets
        self._file = open(self.array_path, "r+b")
        self.done[:] = False
        for start, stop in self.verified_ranges():
            self.done[start:stop] = True

    def attach(self) -> None:
        """Opens the file of a unit that the main process has filled and checked, read-only and without checking
        it again: how the other processes read it."""
        array = np.load(self.array_path, mmap_mode="r")
        self._data_offset = int(array.offset)
        del array
        self._file = open(self.array_path, "rb")
        self.done[:] = True

    def verified_ranges(self) -> list[tuple[int, int]]:
        """Recorded (start, stop) row ranges whose bytes still match their SHA-256."""
        if not os.path.isfile(self.progress_path):
            return []
        ranges = []
        with open(self.progress_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    start, stop, digest = int(record["start"]), int(record["stop"]), record["sha256"]
                except (ValueError, KeyError, TypeError):
                    continue  # a half-written last line
                if 0 <= start < stop <= self.num_rows and self._digest(start, stop) == digest:
                    ranges.append((start, stop))
        return ranges

    def _pread(self, size: int, position: int) -> bytes:
        """Up to ``size`` bytes at byte ``position`` of the features file (seek and read where there is no pread)."""
        if hasattr(os, "pread"):
            return os.pread(self._file.fileno(), size, position)
        self._file.seek(position)
        return self._file.read(size)

    def _pwrite(self, data: bytes | memoryview, position: int) -> None:
        if hasattr(os, "pwrite"):
            written = os.pwrite(self._file.fileno(), data, position)
        else:
            self._file.seek(position)
            written = self._file.write(data)
            self._file.flush()
        if written != len(data):
            raise OSError(f"Short write to {self.array_path} (is the disk full?).")

    def _read_bytes(self, start: int, stop: int) -> Iterator[bytes]:
        """The bytes of rows ``start:stop``, in pieces of at most 64 MiB."""
        position, end = self._data_offset + start * self.row_bytes, self._data_offset + stop * self.row_bytes
        while position < end:
            piece = self._pread(min(end - position, 1 << 26), position)
            if not piece:
                raise OSError(f"{self.array_path} ends before row {stop}.")
            position += len(piece)
            yield piece

    def _digest(self, start: int, stop: int) -> str:
        digest = hashlib.sha256()
        for piece in self._read_bytes(start, stop):
            digest.update(piece)
        return digest.hexdigest()

    def _rows(self, index: np.ndarray) -> np.ndarray:
        """(len(index), width) rows ``index`` (any order), one read per run of consecutive ids."""
        order = np.argsort(index, kind="stable")
        ids = index[order]
        starts = np.flatnonzero(np.diff(ids, prepend=-2) != 1)  # where each run of consecutive ids begins
        stops = np.append(starts[1:], len(ids))
        ordered = np.empty((len(ids), self.offsets[-1]), dtype=self.numpy_dtype)
        row_bytes, offset = self.row_bytes, self._data_offset
        for first, stop, row in zip(starts.tolist(), stops.tolist(), ids[starts].tolist(), strict=True):
            size = (stop - first) * row_bytes
            data = self._pread(size, offset + row * row_bytes) if size <= 1 << 26 else b""
            if len(data) != size:  # a run over 64 MiB, or a short read
                data = b"".join(self._read_bytes(row, row + stop - first))
            ordered[first:stop] = np.frombuffer(data, dtype=self.numpy_dtype).reshape(stop - first, -1)
        out = np.empty_like(ordered)
        out[order] = ordered
        return out

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def write(self, ids: Sequence[int], rows: dict[str, torch.Tensor]) -> None:
        """Writes ``{layer: (B, D)}`` at rows ``ids`` (ascending), syncs, then records a checksum per run of
        consecutive ids."""
        block = torch.cat([rows[layer].float() for layer in self.layers], dim=1).to(self.dtype).numpy()
        ranges = self.put_rows(ids, block)
        self.sync()
        self.record(ranges)

    def put_rows(self, ids: Sequence[int], block: np.ndarray) -> list[tuple[int, int, str]]:
        """Writes the (B, width) ``block`` (of the unit's dtype) at rows ``ids`` (ascending), unsynced and unrecorded;
        returns ``(start, stop, sha256)`` per run of consecutive ids, the checksum of the bytes written."""
        if block.dtype != self.numpy_dtype:
            raise ValueError(f"rows of dtype {block.dtype} for unit {self.folder} of dtype {self.numpy_dtype}.")
        block = np.ascontiguousarray(block)
        if block.shape != (len(ids), self.offsets[-1]):
            raise ValueError(f"rows of shape {block.shape} do not fit {len(ids)} rows of unit {self.folder}.")
        ids = np.asarray(ids)
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        ranges, first = [], 0
        for run in np.split(ids, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            data = memoryview(block[first : first + stop - start]).cast("B")
            self._pwrite(data, self._data_offset + start * self.row_bytes)
            ranges.append((start, stop, hashlib.sha256(data).hexdigest()))
            first += stop - start
        return ranges

    def sync(self) -> None:
        """Syncs the features file: rows written before are on disk."""
        os.fsync(self._file.fileno())

    def record(self, ranges: Sequence[tuple[int, int, str]]) -> None:
        """Appends and syncs the progress records of ``(start, stop, sha256)`` ranges, whose rows are synced."""
        with open(self.progress_path, "a") as f:
            f.write("".join(json.dumps({"start": a, "stop": b, "sha256": digest}) + "\n" for a, b, digest in ranges))
            f.flush()
            os.fsync(f.fileno())
        for start, stop, _ in ranges:
            self.done[start:stop] = True

    def read(self, rows: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``{layer: (N, D)}`` copies (the unit's dtype) of all rows (or of ``rows``, in that order), which must be
        written."""
        index = np.arange(self.num_rows) if rows is None else as_rows(rows)
        if not self.done[index].all():
            raise RuntimeError(f"Cache unit {self.folder} lacks some of the requested rows.")
        block = self._rows(index)
        return {
            layer: torch.from_numpy(np.array(block[:, self.offsets[i] : self.offsets[i + 1]]))
            for i, layer in enumerate(self.layers)
        }


def missing_batches(units: Sequence[CacheUnit], batch_size: int, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Ascending row ids, at most ``batch_size`` per batch, that any unit still lacks (among ``rows``, default all)."""
    missing = np.zeros(units[0].num_rows, dtype=bool)
    for unit in units:
        missing |= ~unit.done
    if rows is not None:
        wanted = np.zeros_like(missing)
        wanted[np.asarray(rows, dtype=np.int64)] = True
        missing &= wanted
    ids = np.flatnonzero(missing).tolist()
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def extraction_plan(
    units: Sequence[CacheUnit], batch_size: int, rows: Sequence[int] | None = None
) -> list[tuple[list[int], list[list[int]]]]:
    """What to compute: the units lacking some of ``rows`` (default all), grouped by which rows they have, each
    group with its batches of missing row ids. One forward per row and timestep, so a row that one unit already
    holds is never recomputed for it."""
    wanted = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
    groups: dict[bytes, list[int]] = {}
    for i, unit in enumerate(units):
        if not unit.done[wanted].all():
            groups.setdefault(np.packbits(unit.done).tobytes(), []).append(i)
    return [(todo, missing_batches([units[i] for i in todo], batch_size, rows)) for todo in groups.values()]


def units_table(units: Sequence[CacheUnit]) -> FeatureTable:
    """The (open, filled) units of one view as one table ``{(layer, t): (N, D) float16}``, read on demand."""
    dims = {
        (layer, unit.key["timestep"]): width
        for unit in units
        for layer, width in zip(unit.layers, unit.dims, strict=True)
    }

    def reader(rows: np.ndarray, keys: list) -> dict:
        wanted = set(keys)
        out = {}
        for unit in units:
            t = unit.key["timestep"]
            if any((layer, t) in wanted for layer in unit.layers):
                out.update({(layer, t): value for layer, value in unit.read(rows).items() if (layer, t) in wanted})
        return out

    return FeatureTable(dims, units[0].num_rows, reader)


class FeatureCache:
    """All cache units of one probe run: for each view of a split, one unit per timestep.

    Args:
        cache_dir: root folder; units go to ``cache_dir/<role>-v<view>-t<t>-<fingerprint>``.
        backbone: the model (its weights are fingerprinted).
        layers: layer names in execution order; timesteps: diffusers indices.
        resolution: image side; seed: base seed of noise and augmentation; dtype: autocast dtype.
        weights: the backbone's :func:`weights_fingerprint` when already computed (hashed on first use otherwise).

    The units' key also records :func:`kernel_settings` of the backbone's device: a cache filled on one device
    type (or TF32 setting) is not resumed on another.
    """

    def __init__(
        self,
        cache_dir: str,
        backbone: DDAEBackbone,
        layers: Sequence[str],
        timesteps: Sequence[int],
        resolution: int,
        seed: int,
        dtype: torch.dtype | None = None,
        weights: str | None = None,
    ):
        self.cache_dir = cache_dir
        self.backbone = backbone
        self.layers = list(layers)
        self.timesteps = list(timesteps)
        self.dims = [backbone.layer_info(layer).feature_dim for layer in self.layers]
        self.resolution = resolution
        self.seed = seed
        self.dtype = dtype
        self.weights = weights
        self._model_fingerprint: str | None = None
        self._fingerprints: dict[str, str] = {}  # shared with the copies of with_timesteps

    def with_timesteps(self, timesteps: Sequence[int]) -> FeatureCache:
        """The same cache over other timesteps, sharing the model's fingerprint (hashed once)."""
        other = copy.copy(self)
        other.timesteps = list(timesteps)
        other._model_fingerprint = self._base_key()["model"]
        return other

    def _base_key(self) -> dict:
        if self._model_fingerprint is None:
            self._model_fingerprint = model_fingerprint(self.backbone, self.weights)
        return {
            "model": self._model_fingerprint,
            "kernels": kernel_settings(self.backbone.device),
            "resolution": self.resolution,
            "center_crop": True,
            "pooling": "avg",
            "dtype": str(self.dtype),
            "seed": self.seed,
            "layers": self.layers,
        }

    def units(self, dataset, split: str, view: View, image_column: str) -> list[CacheUnit]:
        """The (unopened) units of ``view`` over ``dataset``'s ``image_column``, one per timestep.

        The key holds everything that changes a feature: weights and scheduler, data set content (its
        fingerprint covers files, revision and selected rows), split, image column, resolution and crop,
        pooling, dtype, the device's kernel settings, seed, view and its augmentation, timestep, layers and the
        cache format.
        """
        units = []
        for t in self.timesteps:
            key = {
                **self._base_key(),
                "dataset": dataset_fingerprint(dataset, split),
                "image_column": image_column,
                "view": [view.role, view.index, view.augment],
                "augmentation": "crop4+flip" if view.augment else "none",
                "timestep": t,
            }
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
            name = f"{ViewRole(view.role).name.lower()}-v{view.index}-t{t}-{digest}"
            units.append(CacheUnit(os.path.join(self.cache_dir, name), key, len(dataset), self.layers, self.dims))
        return units

    def extract(
        self,
        dataset,
        split: str,
        image_column: str,
        view: View,
        batch_size: int,
        accelerator=None,
        on_batch: Callable[[int, int], None] | None = None,
        progress: bool = True,
        rows: Sequence[int] | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> FeatureTable | None:
        """Fills the units of ``view`` and returns them as a table ``{(layer, t): (N, D) float16}`` read from disk
        on demand (None off the main process); with ``rows``, only those rows are computed and the table holds
        them (``(len(rows), D)``, in that order).

        Batches still missing are split round-robin across the processes of ``accelerator``
        (:func:`~.sharding.sharded_batches`); each process loads its batches' pixels with ``num_workers`` loader
        processes (0: itself; :func:`~.loader.planned_pixels`), into pinned memory with ``pin_memory`` (default:
        when the backbone is on CUDA). Rows stay on the device up to the gather; the main process copies them to
        the host once and hands them to a writer thread (:class:`~.writer.CacheWriter`). ``on_batch(first, stop)``
        (the span of its rows) is called on the main process once a batch is written and recorded (each batch is
        then written before the next is handed over).

        A latent model's images are VAE-encoded once per view into its :meth:`latent_unit` (the same way: loader,
        shards, writer), and the forwards read the latents back: a later pass over the view (other noise levels,
        a halving rung, another run) neither decodes nor encodes again.
        """
        ranks = Ranks.of(accelerator)
        units = self.units(dataset, split, view, image_column)
        device = self.backbone.device  # read once: it walks the model's modules
        if pin_memory is None:
            pin_memory = device.type == "cuda"
        loading = dict(num_workers=num_workers, pin_memory=pin_memory)
        latents = self.latent_unit(dataset, split, view, image_column) if self.backbone.vae is not None else None
        with self._locked(units + ([latents] if latents is not None else []), ranks.is_main):
            plan: list[tuple[list[int], list[list[int]]]] = []  # (units to fill, their batches of row ids)
            if ranks.is_main:
                for unit in units:
                    unit.open()
                plan = extraction_plan(units, batch_size, rows)
            plan = broadcast_from_main(plan, accelerator)  # the other ranks wait on the host while units are checked
            mine = [batch for _, batches in plan for batch in ranks.strided(batches)]  # this rank's, in order
            if latents is not None and plan:
                needed = sorted({i for _, batches in plan for batch in batches for i in batch})
                self._fill_latents(latents, needed, dataset, image_column, view, batch_size, accelerator, progress,
                                   loading)  # fmt: skip
                stream = self._latent_stream(latents, mine)
            else:  # the loader's workers fork now, before the writer thread starts
                stream = planned_pixels(dataset, image_column, view, self.resolution, self.seed, mine, **loading)
            desc = f"features {split} view {view.index}"

            def fill(todo: list[int]) -> tuple[Callable[[list[int]], torch.Tensor], int, list[Target]]:
                timesteps = [units[i].key["timestep"] for i in todo]

                def compute(ids: list[int]) -> torch.Tensor:
                    inputs = _next_batch(stream, ids).to(device, non_blocking=True)
                    return self._compute(ids, inputs, view, timesteps, latents is not None)

                return compute, sum(self.dims) * len(timesteps), self._targets(units, todo)

            self._run(plan, fill, stream, accelerator, on_batch, progress, desc)
            if not ranks.is_main:
                return None
            table = units_table(units)
            return table if rows is None else table.subset(rows)

    def latent_unit(self, dataset, split: str, view: View, image_column: str) -> CacheUnit:
        """The (unopened) unit of a latent model's VAE latents of ``view``: (N, c * h * w) float32, the exact
        output of :meth:`DDAEBackbone.encode` under the cache's dtype. Its key holds what changes a latent: the
        VAE's weights (not the denoiser's: models sharing a VAE share it), the device's kernels, data, image
        column, resolution and crop, dtype, seed and view."""
        if "vae" not in self._fingerprints:
            self._fingerprints["vae"] = vae_fingerprint(self.backbone)
        base = self._base_key()
        key = {
            "content": "vae_latents",
            "vae": self._fingerprints["vae"],
            **{name: base[name] for name in ("kernels", "resolution", "center_crop", "dtype", "seed")},
            "dataset": dataset_fingerprint(dataset, split),
            "image_column": image_column,
            "view": [view.role, view.index, view.augment],
            "augmentation": "crop4+flip" if view.augment else "none",
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        name = f"latents-{ViewRole(view.role).name.lower()}-v{view.index}-{digest}"
        side = self.resolution // self.backbone.vae_scale
        width = int(self.backbone.vae.config.latent_channels) * side * side
        return CacheUnit(os.path.join(self.cache_dir, name), key, len(dataset), ["latents"], [width], torch.float32)

    def _fill_latents(
        self, unit: CacheUnit, rows: list[int], dataset, image_column: str, view: View, batch_size: int,
        accelerator, progress: bool, loading: dict,
    ) -> None:  # fmt: skip
        """Encodes the ``rows`` that ``unit`` lacks, then opens it for reading on every process."""
        ranks = Ranks.of(accelerator)
        batches: list[list[int]] = []
        if ranks.is_main:
            unit.open()
            batches = missing_batches([unit], batch_size, rows)
        batches = broadcast_from_main(batches, accelerator)
        mine = ranks.strided(batches)
        stream = planned_pixels(dataset, image_column, view, self.resolution, self.seed, mine, **loading)
        device = self.backbone.device

        def fill(todo: list[int]) -> tuple[Callable[[list[int]], torch.Tensor], int, list[Target]]:
            def compute(ids: list[int]) -> torch.Tensor:
                pixels = _next_batch(stream, ids).to(device, non_blocking=True)
                return self.backbone.encode(pixels, self.dtype).flatten(1)

            return compute, unit.dims[0], [(unit, 0, unit.dims[0])]

        self._run([([0], batches)] if batches else [], fill, stream, accelerator, None, progress,
                  f"latents view {view.index}")  # fmt: skip
        broadcast_from_main(None, accelerator)  # the other ranks read the unit once the main process wrote it all
        if not ranks.is_main:
            unit.attach()

    def _latent_stream(self, unit: CacheUnit, batches: list[list[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """``(ids, (B, c, h, w) float32 latents)`` of ``batches`` in order, read from ``unit``."""
        side = self.resolution // self.backbone.vae_scale
        for ids in batches:
            yield ids, unit.read(ids)["latents"].view(len(ids), -1, side, side)

    def _run(
        self,
        plan: list[tuple[list[int], list[list[int]]]],
        fill: Callable[[list[int]], tuple[Callable[[list[int]], torch.Tensor], int, list[Target]]],
        stream: Iterator,
        accelerator,
        on_batch: Callable[[int, int], None] | None,
        progress: bool,
        desc: str,
    ) -> None:
        """Computes and writes every batch of ``plan``: for each ``(todo, batches)``, ``fill(todo)`` gives the
        function of a batch's ids -> (B, width) rows on the device, the width, and where the columns go. Batches are
        shared across processes; the main process writes on a :class:`~.writer.CacheWriter` thread. ``stream`` (the
        inputs of this process's batches) is closed at the end, stopping any loader workers."""
        from tqdm.auto import tqdm

        is_main = Ranks.of(accelerator).is_main
        writer = None
        try:
            writer = CacheWriter() if is_main and plan else None
            bar = tqdm(total=sum(len(batches) for _, batches in plan), desc=desc, disable=not (progress and is_main))
            for todo, batches in plan:
                compute, width, targets = fill(todo)
                for ids, block in sharded_batches(batches, compute, width, accelerator):
                    if writer is not None:
                        host, ready = _to_host(block)
                        writer.put(ids, host, targets, ready)
                        if on_batch is not None:
                            writer.wait()
                            on_batch(ids[0], ids[-1] + 1)
                        bar.update(1)
        except BaseException:
            if writer is not None:
                writer.close(raise_error=False)  # what is queued is still written and recorded
            raise
        finally:
            stream.close()
        if writer is not None:
            writer.close()
        bar.close()

    def _locked(self, units: list[CacheUnit], is_main: bool) -> contextlib.ExitStack:
        """Holds a file lock on each unit (in name order, so two runs never deadlock) on the main process.

        Two ``ddae-probe`` runs on one cache then never write the same unit at once: the second waits, finds
        the unit complete (or its missing rows) and reuses what the first wrote.
        """
        from filelock import FileLock

        stack = contextlib.ExitStack()
        if is_main:
            lock_dir = os.path.join(self.cache_dir, ".locks")
            os.makedirs(lock_dir, exist_ok=True)
            for unit in sorted(units, key=lambda u: u.folder):
                stack.enter_context(FileLock(os.path.join(lock_dir, os.path.basename(unit.folder) + ".lock")))
        return stack

    def _compute(
        self, ids: list[int], inputs: torch.Tensor, view: View, timesteps: list[int], latents: bool = False
    ) -> torch.Tensor:
        """(len(ids), width) float32 on the backbone's device: the layers of each timestep at rows ``ids`` (their
        (B, 3, R, R) pixels, or with ``latents`` their encoded latents, on that device), concatenated in unit
        order."""
        images = None if latents else inputs
        features = self.backbone.features(
            images, self.layers, timesteps, seed=view.noise_seed(self.seed), example_ids=ids, dtype=self.dtype,
            latents=inputs if latents else None,
        )
        return torch.cat([features[layer, t] for t in timesteps for layer in self.layers], dim=1)

    def _targets(self, units: list[CacheUnit], todo: list[int]) -> list[Target]:
        """Where the units ``todo`` sit in a computed (B, width) block: ``(unit, first column, stop column)``."""
        width, out = sum(self.dims), []
        for position, unit_index in enumerate(todo):
            out.append((units[unit_index], position * width, (position + 1) * width))
        return out


def _next_batch(stream: Iterator[tuple[list[int], torch.Tensor]], ids: list[int]) -> torch.Tensor:
    """The inputs of the next batch of ``stream``, which must be rows ``ids``."""
    loaded, inputs = next(stream)
    if loaded != ids:
        raise RuntimeError(f"the loader gave rows {loaded[:3]}... for rows {ids[:3]}...")
    return inputs


def _to_host(block: torch.Tensor) -> tuple[torch.Tensor, object | None]:
    """``(host rows, ready)``: ``block`` itself on the CPU; from CUDA a non-blocking copy into pinned memory and
    the event that marks it done (nothing waits for it here)."""
    if block.device.type == "cpu":
        return block, None
    if block.device.type != "cuda":
        return block.cpu(), None
    host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
    host.copy_(block, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
