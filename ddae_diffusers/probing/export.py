"""``ddae-extract``: a data set's features on disk as Parquet, for heads, clustering or retrieval elsewhere.

Examples::

    ddae-extract --model google/ddpm-cifar10-32 --dataset uoft-cs/cifar10 --layers up_blocks.1.resnets.2 \\
        --timesteps 10 --output_dir cifar10-features
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m ddae_diffusers.probing.export \\
        --model ./my-ddpm --dataset data/cifar10-sample --timesteps 10 50 --output_dir features
    ddae-extract --model ./my-ddpm --dataset data/cifar10-sample --dense_size 8 --output_dir dense-features

Pooled features go through the probe's feature cache (``FeatureCache.extract``) with the clean view of each split:
``View(ViewRole.TRAIN, 0, False)`` for ``--train_split`` (noise from ``derive_seed(seed, 0, 0)``), ``EVAL_VIEW``
for every other split (``derive_seed(seed, 1, 0)``), exactly the views ``ddae-probe`` caches for its train and eval
splits. With the same model, data, ``--max_samples``, seed, dtype, layers and levels the exported rows are the
probe's cache rows (float16, written as float32), and pointing ``--cache_dir`` at a probe's cache reuses it.

Dense maps (``--dense_size S``) do not fit the pooled cache: they are computed per shard (``pooling="spatial"``,
resized bilinearly to S x S) and the Parquet shards themselves are what a rerun resumes from.

Layout of ``output_dir``::

    extract_config.json            the configuration (model and weights fingerprint, data, cells, views, version)
    README.md                      a dataset card whose ``configs`` map each split to its folder
    <split>/part-00000.parquet     example_id (int64), label (when labelled), one column per cell "layer@level"
    feature_cache/                 the pooled feature cache (default --cache_dir)

``datasets.load_dataset(output_dir)`` reads it back. Extraction is sharded across ``accelerate launch``
processes; the main process alone writes.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import EXTRACTION_BATCH_SIZE, DDAEBackbone
from ..data import (
    LABEL_COLUMN_CANDIDATES,
    conversion_note,
    detect_image_column,
    detect_label_column,
    label_names,
    load_split,
)
from ..distributed import broadcast_from_main, host_group, wait_for_main
from ..errors import ArgumentParser, UsageError, run_command
from ..io_utils import atomic_path, check_writable_dir
from ..loading import check_source
from ..noise import EDM_SAMPLING_STEPS, NoiseLevel, noise_level
from .cache import (
    CACHE_FORMAT,
    EVAL_VIEW,
    FeatureCache,
    View,
    ViewRole,
    dataset_fingerprint,
    kernel_settings,
)
from .engine import DTYPES, setup_model
from .result import cell_key
from .sharding import sharded_batches

logger = logging.getLogger(__name__)
SHARD_ROWS = 2048  # rows per Parquet shard of pooled features
DENSE_SHARD_BYTES = 256 << 20  # dense shards hold at most this many bytes of float16 maps (and at least one row)
CONFIG_FILE = "extract_config.json"
SHARD_PATTERN = "part-{:05d}.parquet"
SHARD_METADATA = b"ddae_extract"  # the Parquet schema metadata key holding a shard's key
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # what datasets accepts as a split name


@dataclass
class ExportConfig:
    """Everything an export needs; the flags of ``ddae-extract`` map one to one onto these fields."""

    model: str
    dataset: str
    output_dir: str
    split: list[str] | None = None  # default: every labelled split (every split of an unlabelled data set)
    train_split: str = "train"  # the split read with the probe's train view; every other one gets EVAL_VIEW
    cache_dir: str | None = None  # default: <output_dir>/feature_cache
    image_column: str | None = None
    label_column: str | None = None  # default: auto-detected; no label column -> no labels
    max_samples: int | None = None  # the first rows of each split
    layers: list[str] | None = None  # default: default_layers(backbone)
    timesteps: list[NoiseLevel] | None = None
    sigma_index: list[int] | None = None
    resolution: int | None = None
    prompt: str | None = None
    batch_size: int = EXTRACTION_BATCH_SIZE
    dtype: str = "float32"
    seed: int = 0
    dense_size: int | None = None  # dense maps resized to S x S instead of pooled vectors
    shard_rows: int = SHARD_ROWS

    def __post_init__(self):
        """Checks every flag that needs neither the model nor the data."""
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise UsageError(f"--batch_size and --shard_rows must be >= 1, got {self.batch_size}, {self.shard_rows}.")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}.")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"--max_samples must be >= 1, got {self.max_samples}.")
        if self.dense_size is not None and self.dense_size < 1:
            raise UsageError(f"--dense_size must be >= 1 (the side of the stored maps), got {self.dense_size}.")
        if self.sigma_index is not None and self.timesteps is not None:
            raise UsageError("Give --timesteps or --sigma_index, not both: each sets the noise levels.")
        for split in self.split or []:
            if not _SPLIT_NAME.match(split):
                raise UsageError(
                    f"--split {split!r} is not a plain split name (letters, digits, _ and .): slices such as "
                    "train[:100] are not exported; use --max_samples."
                )

    @property
    def feature_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.output_dir, "feature_cache")


def split_view(config: ExportConfig, split: str) -> View:
    """The clean view a split is read with: the probe's train view 0 for ``train_split``, ``EVAL_VIEW`` else."""
    return View(ViewRole.TRAIN, 0, False) if split == config.train_split else EVAL_VIEW


@dataclass
class ExportPlan:
    """Checked inputs of an export: model, cells, and each split's rows and labels."""

    config: ExportConfig
    backbone: DDAEBackbone
    splits: dict[str, object]  # split -> datasets.Dataset
    labels: dict[str, np.ndarray | None]  # split -> (N,) int64, or None without a label column
    image_column: str
    label_column: str | None
    id2label: dict[str, str] | None
    layers: list[str]
    timesteps: list[NoiseLevel]
    resolution: int
    shapes: dict[str, list[int]] = field(default_factory=dict)  # cell key -> stored shape ([D] or [C, S, S])
    weights: str | None = None  # weights fingerprint (main process)

    @property
    def cells(self) -> list[tuple[str, NoiseLevel]]:
        return [(layer, t) for layer in self.layers for t in self.timesteps]

    def shard_rows(self) -> int:
        """Rows per shard: ``config.shard_rows``, fewer for dense maps beyond :data:`DENSE_SHARD_BYTES`."""
        if self.config.dense_size is None:
            return self.config.shard_rows
        row_bytes = 2 * sum(int(np.prod(shape)) for shape in self.shapes.values())
        return max(1, min(self.config.shard_rows, DENSE_SHARD_BYTES // row_bytes))


def _split_names(dataset: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(dataset))
    except Exception as error:  # noqa: BLE001 - missing, offline, not a data set: one line for all
        raise UsageError(f"Could not list the splits of data set {dataset!r} ({error}): pass --split.") from None


def _has_label_column(dataset, given: str | None) -> bool:
    return given is not None or any(name in dataset.features for name in LABEL_COLUMN_CANDIDATES)


def _load_splits(config: ExportConfig) -> tuple[dict, dict, str, str | None, dict | None]:
    """Loads the requested splits (default: the labelled ones) and checks their columns and labels."""
    names = list(dict.fromkeys(config.split)) if config.split else _split_names(config.dataset)
    splits = {name: load_split(config.dataset, name, config.max_samples) for name in names}
    first = next(iter(splits.values()))
    image_column = detect_image_column(first, config.image_column)
    label_column = None
    if _has_label_column(first, config.label_column):
        label_column = detect_label_column(first, config.label_column)
    labels: dict[str, np.ndarray | None] = {}
    for name, dataset in splits.items():
        detect_image_column(dataset, image_column)
        if label_column is not None:
            detect_label_column(dataset, label_column)
            labels[name] = np.asarray(dataset[label_column], dtype=np.int64)
        else:
            labels[name] = None
    if not config.split and label_column is not None:  # default: the labelled splits (-1 marks "no label")
        labelled = [name for name in names if labels[name].min() >= 0]
        if labelled:
            splits = {name: splits[name] for name in labelled}
            labels = {name: labels[name] for name in labelled}
    class_names = label_names(first, label_column) if label_column is not None else None
    id2label = {str(i): name for i, name in enumerate(class_names)} if class_names else None
    cache_dir = os.path.abspath(config.feature_cache_dir)
    for name in splits:
        if os.path.abspath(os.path.join(config.output_dir, name)) == cache_dir:
            raise UsageError(f"Split {name!r} would be written into the feature cache {cache_dir}: pass --cache_dir.")
    return splits, labels, image_column, label_column, id2label


def prepare_export(config: ExportConfig, backbone: DDAEBackbone | None = None, accelerator=None) -> ExportPlan:
    """Validates every input (folders, splits, columns, model, layers, levels, resolution, dense size) and loads
    model and data; raises a ``UsageError`` before any extraction.

    As ``engine.prepare``: the weights are fingerprinted where they were loaded (main process), then the model
    moves to ``accelerator.device``, where the layer catalogue and one test forward run under the run's dtype."""
    check_writable_dir(config.output_dir, "--output_dir")
    if config.dense_size is None:
        check_writable_dir(config.feature_cache_dir, "--cache_dir")
    splits, labels, image_column, label_column, id2label = _load_splits(config)

    if backbone is None:
        backbone = DDAEBackbone.from_pretrained(config.model)
    pooling = "avg" if config.dense_size is None else "spatial"
    model = setup_model(config, backbone, accelerator, pooling)
    backbone, layers, timesteps, resolution, probe = (
        model.backbone, model.layers, model.timesteps, model.resolution, model.test_features
    )
    weights = model.weights
    note = conversion_note(next(iter(splits.values()))[0][image_column], resolution)
    if note:
        logger.warning(f"{note} for the model (first image).")
    shapes = {}
    for layer, t in [(layer, t) for layer in layers for t in timesteps]:
        width = probe[layer, timesteps[0]].shape[1]
        shape = [width] if config.dense_size is None else [width, config.dense_size, config.dense_size]
        shapes[cell_key(layer, t)] = shape
    return ExportPlan(
        config, backbone, splits, labels, image_column, label_column, id2label, layers, timesteps, resolution,
        shapes, weights,
    )


# ------------------------------------------------------------------ Parquet
def shard_ranges(num_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of the shards of a split, in order."""
    return [(start, min(start + shard_rows, num_rows)) for start in range(0, num_rows, shard_rows)]


def shard_path(output_dir: str, split: str, index: int) -> str:
    return os.path.join(output_dir, split, SHARD_PATTERN.format(index))


def _shard_key(split_key: dict, start: int, stop: int) -> str:
    return json.dumps({**split_key, "rows": [start, stop]}, sort_keys=True)


def _shard_is_current(path: str, key: str, num_rows: int) -> bool:
    """Whether the shard at ``path`` exists, is readable, holds ``num_rows`` rows and was written for ``key``."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        return False
    try:
        metadata = pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is rewritten
        return False
    stored = (metadata.metadata or {}).get(SHARD_METADATA)
    return stored is not None and stored.decode() == key and metadata.num_rows == num_rows


def _schema(plan: ExportPlan, key: str):
    """The Arrow schema of a shard: ``datasets`` features (ClassLabel names kept) + the shard key."""
    import datasets

    dense = plan.config.dense_size is not None
    features = {"example_id": datasets.Value("int64")}
    if plan.label_column is not None:
        names = [plan.id2label[str(i)] for i in range(len(plan.id2label))] if plan.id2label else None
        features["label"] = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    for name, shape in plan.shapes.items():
        features[name] = datasets.List(datasets.Value("float16" if dense else "float32"), length=int(np.prod(shape)))
    schema = datasets.Features(features).arrow_schema
    for name, shape in plan.shapes.items():
        index = schema.get_field_index(name)
        schema = schema.set(index, schema.field(index).with_metadata({"shape": json.dumps(shape)}))
    return schema.with_metadata({**(schema.metadata or {}), SHARD_METADATA: key.encode()})


def write_shard(plan: ExportPlan, path: str, key: str, ids: np.ndarray, labels: np.ndarray | None,
                columns: dict[str, np.ndarray]) -> None:
    """Writes one shard atomically: ``ids`` (B,), ``labels`` (B,) or None, ``{cell key: (B, prod(shape))}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(plan, key)
    arrays = [pa.array(ids, pa.int64())]
    if plan.label_column is not None:
        arrays.append(pa.array(labels, pa.int64()))
    for name in plan.shapes:
        values = columns[name]
        if not np.isfinite(values).all():
            raise UsageError(
                f"Features of {name} for rows {ids[0]}..{ids[-1]} are not finite (beyond float16's range?): "
                "nothing written for them."
            )
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
    table = pa.Table.from_arrays(arrays, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size) float32, bilinear (antialiased when shrinking); unchanged at that size."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps.float()
    shrink = size < maps.shape[-2] or size < maps.shape[-1]
    return F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


# ------------------------------------------------------------------ the export
def _split_key(plan: ExportPlan, split: str, base: dict) -> dict:
    view = split_view(plan.config, split)
    return {**base, "split": split, "dataset": dataset_fingerprint(plan.splits[split], split),
            "view": [int(view.role), view.index, view.augment]}


def _missing_shards(plan: ExportPlan, split: str, split_key: dict) -> list[tuple[int, int, int]]:
    """``(index, start, stop)`` of the shards of ``split`` not yet on disk for ``split_key``."""
    ranges = shard_ranges(len(plan.splits[split]), plan.shard_rows())
    return [
        (index, start, stop)
        for index, (start, stop) in enumerate(ranges)
        if not _shard_is_current(
            shard_path(plan.config.output_dir, split, index), _shard_key(split_key, start, stop), stop - start
        )
    ]


def _export_pooled(plan: ExportPlan, split: str, split_key: dict, missing: list, cache: FeatureCache, extract: dict,
                   is_main: bool) -> None:
    """Fills the cache rows of the missing shards (all processes), then writes those shards (main process)."""
    rows = [row for _, start, stop in missing for row in range(start, stop)]
    view = split_view(plan.config, split)
    table = cache.extract(plan.splits[split], split, plan.image_column, view, rows=rows, **extract)
    if not is_main:
        return
    position = 0
    for index, start, stop in missing:
        block = table.read(np.arange(position, position + stop - start))
        position += stop - start
        columns = {cell_key(layer, t): block[layer, t].float().numpy() for layer, t in plan.cells}
        _write(plan, split, split_key, index, start, stop, columns)


def _write(plan: ExportPlan, split: str, split_key: dict, index: int, start: int, stop: int, columns: dict) -> None:
    labels = plan.labels[split]
    write_shard(
        plan, shard_path(plan.config.output_dir, split, index), _shard_key(split_key, start, stop),
        np.arange(start, stop), None if labels is None else labels[start:stop], columns,
    )


def _export_dense(plan: ExportPlan, split: str, split_key: dict, missing: list, extract: dict, is_main: bool) -> None:
    """Computes the missing shards' dense maps batch by batch (sharded across processes) and writes each shard
    when its rows are in (main process)."""
    from tqdm.auto import tqdm

    config, backbone, dataset = plan.config, plan.backbone, plan.splits[split]
    view, dtype, size = split_view(config, split), DTYPES[config.dtype], config.dense_size
    batch_size, accelerator, on_batch = extract["batch_size"], extract["accelerator"], extract["on_batch"]

    def compute(ids: list[int]) -> torch.Tensor:
        """(B, sum of C * S * S) float32 maps of rows ``ids`` (consecutive), cells in column order."""
        images = dataset[ids[0] : ids[-1] + 1][plan.image_column]
        pixels = view.pixels(images, ids, plan.resolution, config.seed)
        maps = backbone.features(pixels, plan.layers, plan.timesteps, pooling="spatial",
                                 seed=view.noise_seed(config.seed), example_ids=ids, dtype=dtype)  # fmt: skip
        return torch.cat([resize_maps(maps[cell], size).flatten(1) for cell in plan.cells], dim=1).cpu()

    batches, owner = [], []
    for position, (_, start, stop) in enumerate(missing):
        for first in range(start, stop, batch_size):
            batches.append(list(range(first, min(first + batch_size, stop))))
            owner.append(position)
    widths = [int(np.prod(plan.shapes[cell_key(*cell)])) for cell in plan.cells]
    bar = tqdm(total=len(batches), desc=f"dense maps {split}", disable=not (extract["progress"] and is_main))
    parts: list[torch.Tensor] = []
    for number, (ids, block) in enumerate(sharded_batches(batches, compute, sum(widths), accelerator)):
        if not is_main:
            continue
        parts.append(block.cpu().to(torch.float16))
        if on_batch is not None:
            on_batch(ids[0], ids[-1] + 1)
        bar.update(1)
        if number + 1 == len(batches) or owner[number + 1] != owner[number]:
            index, start, stop = missing[owner[number]]
            pieces = torch.cat(parts).split(widths, dim=1)
            columns = {cell_key(*cell): piece.numpy() for cell, piece in zip(plan.cells, pieces, strict=True)}
            _write(plan, split, split_key, index, start, stop, columns)
            parts = []
    bar.close()


def _remove_stale(plan: ExportPlan) -> None:
    """Removes shards this export does not list: beyond a split's last shard, or of splits it does not export."""
    import pyarrow.parquet as pq

    output_dir = plan.config.output_dir
    for path in glob.glob(os.path.join(output_dir, "*", "part-*.parquet")):
        split = os.path.basename(os.path.dirname(path))
        if split in plan.splits:
            count = len(shard_ranges(len(plan.splits[split]), plan.shard_rows()))
            if os.path.basename(path) in {SHARD_PATTERN.format(i) for i in range(count)}:
                continue
        try:
            ours = SHARD_METADATA in (pq.read_schema(path).metadata or {})
        except Exception:  # noqa: BLE001 - unreadable: one of ours cut short
            ours = True
        if ours:
            os.remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))


def _write_card(plan: ExportPlan) -> None:
    """``README.md``: a dataset card whose ``configs`` map each split to its folder (any split name loads)."""
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in plan.splits:
        lines += [f"  - split: {split}", f"    path: {split}/part-*.parquet"]
    lines += ["---", "", f"Features of `{plan.config.model}` on `{plan.config.dataset}`, written by `ddae-extract`; "
              f"see `{CONFIG_FILE}`.", ""]
    with atomic_path(os.path.join(plan.config.output_dir, "README.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines))


def describe_export(plan: ExportPlan, num_processes: int = 1) -> dict:
    """The content of ``extract_config.json``."""
    from .. import __version__

    config = plan.config
    axis = plan.backbone.noise_axis
    splits = {}
    for split, dataset in plan.splits.items():
        view = split_view(config, split)
        splits[split] = {
            "num_rows": len(dataset),
            "num_shards": len(shard_ranges(len(dataset), plan.shard_rows())),
            "view": {"role": view.role.name.lower(), "index": view.index, "augment": view.augment},
            "noise_seed": view.noise_seed(config.seed),
        }
    return {
        "package": "ddae-diffusers",
        "version": __version__,
        "model": config.model,
        "weights_fingerprint": plan.weights,
        "objective": plan.backbone.objective,
        "dataset": config.dataset,
        "image_column": plan.image_column,
        "label_column": plan.label_column,
        "id2label": plan.id2label,
        "splits": splits,
        "resolution": plan.resolution,
        "dtype": config.dtype,
        "seed": config.seed,
        "pooling": "avg" if config.dense_size is None else "spatial",
        "dense_size": config.dense_size,
        "stored_dtype": "float32 (float16 cache values)" if config.dense_size is None else "float16",
        "layers": plan.layers,
        "timesteps": plan.timesteps,
        "noise_levels": [axis.describe(t) for t in plan.timesteps],
        "cells": [{"key": cell_key(layer, t), "layer": layer, "timestep": t, "shape": plan.shapes[cell_key(layer, t)]}
                  for layer, t in plan.cells],
        "kernels": kernel_settings(plan.backbone.device),
        "num_processes": num_processes,
        "config": asdict(config),
    }


def run_export(
    config: ExportConfig,
    accelerator=None,
    backbone: DDAEBackbone | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    progress: bool = True,
    prepared: ExportPlan | None = None,
) -> dict | None:
    """Extracts and writes every split's shards; returns ``extract_config.json``'s content (main process only).

    Only shards missing on disk (or written for other settings) are written; their rows come from the feature
    cache, which a rerun reuses. ``on_batch(first, stop)`` runs after each computed batch (main process)."""
    host_group()
    plan = prepared or prepare_export(config, backbone, accelerator)
    plan.backbone.denoiser.eval()
    is_main = accelerator is None or accelerator.is_main_process
    weights = broadcast_from_main(plan.weights, accelerator)
    plan.weights = weights
    dtype = DTYPES[config.dtype]
    base = {
        "weights": weights, "prompt": config.prompt, "kernels": kernel_settings(plan.backbone.device),
        "resolution": plan.resolution, "dtype": str(dtype), "seed": config.seed, "cells": list(plan.shapes),
        "shapes": plan.shapes, "image_column": plan.image_column, "label_column": plan.label_column,
        "cache_format": CACHE_FORMAT, "pooling": "avg" if config.dense_size is None else "spatial",
    }
    cache = None
    if config.dense_size is None:
        cache = FeatureCache(config.feature_cache_dir, plan.backbone, plan.layers, plan.timesteps, plan.resolution,
                             config.seed, dtype, weights=weights)  # fmt: skip
    extract = dict(batch_size=config.batch_size, accelerator=accelerator, on_batch=on_batch, progress=progress)
    for split in plan.splits:
        split_key = _split_key(plan, split, base)
        missing = broadcast_from_main(_missing_shards(plan, split, split_key) if is_main else None, accelerator)
        if not missing:
            continue
        if cache is not None:
            _export_pooled(plan, split, split_key, missing, cache, extract, is_main)
        else:
            _export_dense(plan, split, split_key, missing, extract, is_main)
    if not is_main:
        wait_for_main(accelerator)
        return None
    _remove_stale(plan)
    _write_card(plan)
    description = describe_export(plan, accelerator.num_processes if accelerator is not None else 1)
    with atomic_path(os.path.join(config.output_dir, CONFIG_FILE)) as tmp, open(tmp, "w") as f:
        json.dump(description, f, indent=1)
    wait_for_main(accelerator)
    return description


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ddae-extract",
        description="A data set's DDAE features (pooled or dense, any layer x noise level) as Parquet shards that "
                    "datasets.load_dataset(output_dir) reads back.",
    )
    add = parser.add_argument
    add("--model", required=True, help="Hub id or folder of a diffusers pipeline (model_index.json) or model.")
    add("--dataset", required=True, help="Hub id or local folder loadable by datasets.load_dataset.")
    add("--split", nargs="+", default=None,
        help="Splits to export (default: every labelled split; every split of an unlabelled data set).")
    add("--train_split", default="train",
        help="The split read with ddae-probe's train view (noise seed derive_seed(seed, 0, 0)); every other split "
             "gets its eval view (derive_seed(seed, 1, 0)), so the rows equal the probe's for the same settings.")
    add("--image_column", default=None, help="Image column (default: auto-detected, e.g. img/image).")
    add("--label_column", default=None,
        help="Integer class-label column (default: auto-detected, e.g. label; none found: no label column).")
    add("--max_samples", type=int, default=None, help="Export the first N rows of each split.")
    add("--layers", nargs="+", default=None,
        help="Block names (default: every resnet/attention output of encoder, mid block and decoder).")
    add("--timesteps", "--noise_levels", dest="timesteps", nargs="+", type=noise_level, default=None,
        help="Noise levels in the model's units: diffusers timestep indices (DDPM) or sigmas (EDM).")
    add("--sigma_index", nargs="+", type=int, default=None,
        help=f"EDM models: noise levels as indices of the {EDM_SAMPLING_STEPS}-step EDM sampling schedule.")
    add("--resolution", type=int, default=None, help="Image side (default: the model's sample size).")
    add("--prompt", default=None, help="Text-conditioned models: condition on this prompt (default: empty).")
    add("--dense_size", type=int, default=None, metavar="S",
        help="Store dense maps resized to S x S (flattened float16, shape [C, S, S] in the column metadata) instead "
             "of pooled vectors.")
    add("--batch_size", type=int, default=EXTRACTION_BATCH_SIZE, help="Extraction batch size.")
    add("--shard_rows", type=int, default=SHARD_ROWS, help="Rows per Parquet shard (dense shards may hold fewer).")
    add("--dtype", choices=list(DTYPES), default="float32", help="Autocast dtype of the forward passes.")
    add("--seed", type=int, default=0, help="Base seed of the noise (as ddae-probe's --seed).")
    add("--output_dir", required=True)
    add("--cache_dir", default=None, help="Feature cache (default: <output_dir>/feature_cache).")
    return parser


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    args.model = check_source(args.model, "--model")
    args.dataset = check_source(args.dataset, "--dataset")
    config = ExportConfig(**vars(args))
    from accelerate import Accelerator

    accelerator = Accelerator()
    host_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise UsageError(
            "WORLD_SIZE > 1 but accelerate started a single process: on CPU launch with "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N."
        )
    description = run_export(config, accelerator)
    if description is not None:
        rows = ", ".join(f"{split}: {info['num_rows']}" for split, info in description["splits"].items())
        print(f"{len(description['cells'])} cells of {rows} rows -> {config.output_dir}")
    return description


def console_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ddae-extract``: exits 0 on success, 2 with one ``ddae-extract: error: ...`` line on a
    usage error."""
    run_command("ddae-extract", lambda: main(argv))


if __name__ == "__main__":
    console_main()
