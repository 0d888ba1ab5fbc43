"""Nearest neighbours of query images among a data set's pooled features (see :mod:`ddae_diffusers.visualize`).

The data set's features are those of the probe's train view 0 (clean images, the probe's fixed noise): read from
a probe's feature cache when one holds them, else computed (and stored as a cache unit when a cache folder is
given). Cosine similarity; raw pixels are the baseline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .capture import DDAEBackbone
from .errors import UsageError
from .image_processing_ddae import images_to_tensor
from .noise import NoiseLevel
from .visualize_common import (
    SPACES,
    ImagesLike,
    Progress,
    as_pixels,
    check_positive,
    checked_cells,
    figure_image,
    grid_figure,
    to_uint8,
)


def _train_view():
    """The probe's train view 0: the clean training images with their fixed noise."""
    from .probing.cache import View, ViewRole

    return View(ViewRole.TRAIN, 0, False)


@dataclass
class Neighbours:
    """The ``k`` nearest training images of each query.

    ``indices``, ``similarities``: (Q, k) int64 rows of the data set and float32 cosine similarities, best first,
    in the ``space`` asked for (``"features"``: pooled features of ``layer`` at ``level``; ``"pixels"``: the raw
    [-1, 1] pixels). ``pixel_indices`` / ``pixel_similarities``: the same in pixel space when the baseline was
    asked for. ``source``: ``"cache"`` (read from a probe's feature cache), ``"computed"``, ``"given"`` (``bank``) or
    ``"pixels"``.
    ``labels``: (N,) class ids of the data set (None without a label column); ``label_names`` their names.
    """

    layer: str | None
    level: NoiseLevel | None
    indices: np.ndarray
    similarities: np.ndarray
    source: str
    pixel_indices: np.ndarray | None = None
    pixel_similarities: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    figure: Image.Image | None = field(default=None, repr=False)


def _dataset_columns(dataset, image_column: str | None) -> tuple[str, str | None]:
    from .data import detect_image_column

    image_column = detect_image_column(dataset, image_column)
    label = next((c for c in ("label", "labels", "fine_label", "coarse_label") if c in dataset.column_names), None)
    return image_column, label


def cached_bank(
    cache_dir: str, backbone: DDAEBackbone, dataset, split: str, image_column: str, layer: str, level: NoiseLevel,
    seed: int = 0, resolution: int | None = None,
) -> torch.Tensor | None:
    """(N, D) float32 pooled features of train view 0 from a probe's feature cache under ``cache_dir`` (any unit
    whose key matches this model, data set, split, column, seed, device kernels and level and holds ``layer``, with
    every row's checksum verified), or None. Read-only: nothing in the cache is changed. ``resolution``: the image
    side (default: the model's)."""
    from .probing.cache import CacheUnit, FeatureCache

    resolution = resolution or backbone.image_size
    if not os.path.isdir(cache_dir):
        return None
    probe = FeatureCache(cache_dir, backbone, [layer], [level], resolution, seed)
    wanted = probe.units(dataset, split, _train_view(), image_column)[0].key
    ignore = {"layers"}
    for name in sorted(os.listdir(cache_dir)):
        meta_path = os.path.join(cache_dir, name, "meta.json")
        if not name.startswith("train-v0-") or not os.path.isfile(meta_path):
            continue
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        key = meta.get("key", {})
        same = {k: v for k, v in key.items() if k not in ignore} == json.loads(
            json.dumps({k: v for k, v in wanted.items() if k not in ignore}))
        if not same or layer not in meta.get("layers", []) or "dtype" in meta:
            continue
        dims = [backbone.layer_info(name_).feature_dim for name_ in meta["layers"]]
        unit = CacheUnit(os.path.join(cache_dir, name), key, len(dataset), meta["layers"], dims)
        try:
            unit.attach()
        except (OSError, ValueError, EOFError):
            continue
        covered = np.zeros(unit.num_rows, dtype=bool)
        for start, stop in unit.verified_ranges():
            covered[start:stop] = True
        if covered.all():
            return unit.read()[layer].float()
    return None


def dataset_features(
    backbone: DDAEBackbone, dataset, layer: str, level: NoiseLevel, image_column: str | None = None,
    split: str = "train", seed: int = 0, cache_dir: str | None = None, batch_size: int = 16,
    progress: Progress | None = None, resolution: int | None = None,
) -> tuple[torch.Tensor, str]:
    """``((N, D) float32 pooled features, source)`` of every image of ``dataset`` with the probe's train-view-0
    noise: from a probe cache under ``cache_dir`` when one holds them (``"cache"``), else computed (``"computed"``)
    and, with ``cache_dir``, written there as a cache unit the probe and later calls reuse."""
    from .probing.cache import FeatureCache

    image_column, _ = _dataset_columns(dataset, image_column)
    resolution = resolution or backbone.image_size
    if resolution is None:
        raise UsageError("The model has no sample_size: pass resolution=<image side in pixels>.")
    if cache_dir is not None:
        found = cached_bank(cache_dir, backbone, dataset, split, image_column, layer, level, seed, resolution)
        if found is not None:
            return found, "cache"
        total = len(dataset)
        on_batch = None if progress is None else (lambda first, stop: progress(stop / total, "training features"))
        table = FeatureCache(cache_dir, backbone, [layer], [level], resolution, seed).extract(
            dataset, split, image_column, _train_view(), batch_size, on_batch=on_batch, progress=False)
        return table[layer, level].float(), "computed"
    seed_ = _train_view().noise_seed(seed)
    rows = []
    for start in range(0, len(dataset), batch_size):
        ids = list(range(start, min(start + batch_size, len(dataset))))
        pixels = images_to_tensor(dataset[ids[0]:ids[-1] + 1][image_column], resolution)
        rows.append(backbone.features(pixels, [layer], [level], seed=seed_, example_ids=ids)[layer, level].cpu())
        if progress is not None:
            progress(ids[-1] / len(dataset), "training features")
    return torch.cat(rows), "computed"


def _top_k(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    values, indices = similarity.topk(k, dim=1)
    return indices.numpy(), values.numpy()


def nearest_neighbours(
    backbone: DDAEBackbone,
    queries: ImagesLike,
    dataset,
    layer: str | None = None,
    level: NoiseLevel | None = None,
    k: int = 5,
    space: str = "features",
    pixel_baseline: bool = True,
    image_column: str | None = None,
    split: str = "train",
    seed: int = 0,
    cache_dir: str | None = None,
    batch_size: int = 16,
    query_ids: Sequence[int] | None = None,
    bank: torch.Tensor | None = None,
    figure: bool = True,
    progress: Progress | None = None,
) -> Neighbours:
    """The ``k`` images of ``dataset`` (a ``datasets.Dataset``, e.g. a training split) most similar to each query
    by cosine similarity, in ``space`` ``"features"`` (pooled ``layer`` at ``level``) or ``"pixels"``; with
    ``pixel_baseline`` (features only) the pixel-space neighbours too, for comparison.

    The data set's features come from the probe's feature cache under ``cache_dir`` when it holds them for this
    model, data set, split, seed and level (as ``ddae-probe --cache_dir`` wrote them), else they are computed (and
    stored there when ``cache_dir`` is given). Query i gets the noise the data set's row ``query_ids[i]`` gets
    (default: row 0's), so a query that is row r of the data set, passed with ``query_ids=[r]``, has exactly that
    row's features. ``bank``: the data set's (N, D) features when already at hand (from :func:`dataset_features`).
    Returns
    :class:`Neighbours` with a figure: a row per query, its feature neighbours then its pixel neighbours.
    """
    pixels = as_pixels(backbone, queries, "queries")
    query_ids = [0] * len(pixels) if query_ids is None else [int(i) for i in query_ids]
    if len(query_ids) != len(pixels):
        raise UsageError(f"{len(query_ids)} query_ids for {len(pixels)} queries: give one per query (or none).")
    if space not in SPACES:
        raise UsageError(f"Unknown space {space!r}: use one of {SPACES}.")
    if not hasattr(dataset, "column_names") or len(dataset) == 0:
        raise UsageError("dataset must be a non-empty datasets.Dataset (e.g. load_dataset(path, split='train')).")
    check_positive("k", k)
    if k > len(dataset):
        raise UsageError(f"k={k} but the data set has {len(dataset)} images: ask for at most {len(dataset)}.")
    image_column, label_column = _dataset_columns(dataset, image_column)
    layers, levels = checked_cells(backbone, layer, level)
    layer, level = layers[0], levels[0]
    if bank is not None and (not isinstance(bank, torch.Tensor) or tuple(bank.shape) != (
            len(dataset), backbone.layer_info(layer).feature_dim)):
        raise UsageError(f"bank must be the ({len(dataset)}, D) features of this data set at {layer} t={level}: "
                         "pass dataset_features(...) of the same data set, layer and level.")
    labels = names = None
    if label_column is not None:
        labels = np.asarray(dataset[label_column], dtype=np.int64)
        feature = dataset.features[label_column]
        names = list(getattr(feature, "names", None) or []) or None
    result = Neighbours(layer if space == "features" else None, level if space == "features" else None,
                        np.zeros((len(pixels), 0), np.int64), np.zeros((len(pixels), 0), np.float32),
                        "pixels", labels=labels, label_names=names)  # fmt: skip
    if space == "pixels" or pixel_baseline:
        pixel_bank = torch.cat([images_to_tensor(dataset[i:i + 256][image_column], pixels.shape[-1]).flatten(1)
                          for i in range(0, len(dataset), 256)])  # fmt: skip
        result.pixel_indices, result.pixel_similarities = _top_k(pixels.flatten(1), pixel_bank, k)
    if space == "pixels":
        result.indices, result.similarities = result.pixel_indices, result.pixel_similarities
        result.pixel_indices = result.pixel_similarities = None
    else:
        if bank is None:
            bank, result.source = dataset_features(backbone, dataset, layer, level, image_column, split, seed,
                                                   cache_dir, batch_size, progress, pixels.shape[-1])  # fmt: skip
        else:
            result.source = "given"
        noise_seed = _train_view().noise_seed(seed)
        query = backbone.features(pixels, [layer], [level], seed=noise_seed, example_ids=query_ids)[layer, level]
        result.indices, result.similarities = _top_k(query.cpu(), bank, k)
    if figure:
        result.figure = neighbours_figure(result, pixels, dataset, image_column)
    return result


def neighbours_figure(result: Neighbours, queries: torch.Tensor, dataset, image_column: str,
                      cell: float = 0.9) -> Image.Image:  # fmt: skip
    """A row per query: the query, its neighbours (similarity and class above each), then its pixel neighbours."""
    groups = [("features" if result.source != "pixels" else "pixels", result.indices, result.similarities)]
    if result.pixel_indices is not None:
        groups.append(("pixels", result.pixel_indices, result.pixel_similarities))
    k = result.indices.shape[1]
    figure, axes = grid_figure(len(queries), 1 + len(groups) * k, cell, hspace=0.3)
    shown = to_uint8(queries)
    for row in range(len(queries)):
        axes[row, 0].imshow(shown[row], interpolation="nearest")
        axes[row, 0].set_title("query", fontsize=6)
        for g, (_, indices, similarities) in enumerate(groups):
            for j in range(k):
                ax = axes[row, 1 + g * k + j]
                index = int(indices[row, j])
                image = images_to_tensor([dataset[index][image_column]], queries.shape[-1])
                ax.imshow(to_uint8(image)[0], interpolation="nearest")
                label = ""
                if result.labels is not None:
                    value = int(result.labels[index])
                    label = result.label_names[value] if result.label_names else str(value)
                ax.set_title(f"{label} {similarities[row, j]:.2f}", fontsize=6, color="C0" if g == 0 else "C3")
    title = "raw pixels" if result.layer is None else f"{result.layer} t={result.level}"
    heading = f"query, its {k} nearest by {title}" + (" (blue), then by raw pixels (red)" if len(groups) > 1 else "")
    figure.suptitle(heading, fontsize=8)
    return figure_image(figure)


__all__ = ["Neighbours", "cached_bank", "dataset_features", "nearest_neighbours", "neighbours_figure"]
