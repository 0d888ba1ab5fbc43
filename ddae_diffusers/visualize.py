"""Pictures of the features: PCA maps, nearest neighbours and point correspondences.

Each function checks its inputs first (a one-line ``UsageError`` naming the fix), computes with
:meth:`DDAEBackbone.features` and returns arrays together with a ``PIL.Image`` figure:

- :func:`pca_maps`: dense features of a batch of images over a grid of layers and noise levels, projected on their
  first three principal components (fitted jointly over the images of each cell) and shown as RGB;
- :func:`nearest_neighbours`: the training images closest to query images by cosine similarity of pooled features
  (read from a probe's feature cache when it holds them), with raw pixels as the baseline;
- :func:`correspondences`: for points of image A, the most similar point of image B by cosine similarity of dense
  features upsampled to the image size (DIFT's recipe), optionally averaged over several noise draws.

In :func:`pca_maps` and :func:`correspondences` every image gets the same noise draw (example id 0 of ``seed``), so
identical images give identical features; the data set of :func:`nearest_neighbours` gets the probe's own noise
(train view 0), so its feature cache and a fresh computation agree. Figures are drawn with matplotlib's Agg canvas
(no global pyplot state). The neighbours live in ``visualize_neighbours``, model loading (classifier folders, probe
folders) in ``visualize_models``, the shared input checks and figure drawing in ``visualize_common``; this module
exports them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .capture import DDAEBackbone
from .errors import UsageError
from .noise import NoiseLevel
from .visualize_common import (
    Cell,
    ImagesLike,
    Progress,
    as_pixels,
    check_positive,
    checked_cells,
    dense_features,
    figure_image,
    grid_figure,
    short_layer,
    to_uint8,
)
from .visualize_models import LoadedModel, default_picks, load_model, probe_pictures
from .visualize_neighbours import Neighbours, cached_bank, dataset_features, nearest_neighbours


# ---------------------------------------------------------------------------------------------------- PCA maps
@dataclass
class PCAMaps:
    """PCA maps of ``images`` for each (layer, level) cell.

    ``rgb[layer, level]``: (B, h, w, 3) float32 in [0, 1] at the block's native resolution; ``components[cell]``:
    (C, 3) principal axes, ``mean[cell]``: (C,), ``low``/``high[cell]``: (3,) the 1st and 99th percentiles of the
    projections over all images of the cell, so ``rgb = clip(((f - mean) @ components - low) / (high - low), 0, 1)``
    for every image with the same numbers. ``pixels``: (B, 3, S, S) the images in [-1, 1].
    """

    layers: list[str]
    levels: list[NoiseLevel]
    pixels: torch.Tensor
    rgb: dict[Cell, np.ndarray]
    components: dict[Cell, torch.Tensor]
    mean: dict[Cell, torch.Tensor]
    low: dict[Cell, torch.Tensor]
    high: dict[Cell, torch.Tensor]
    figure: Image.Image | None = None


def fit_pca(vectors: torch.Tensor, components: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) vectors -> (mean (C,), axes (C, k)): the top ``k`` eigenvectors of the covariance (float64), each
    signed so that its largest-magnitude entry is positive (the same data always gives the same colours)."""
    x = vectors.double()
    mean = x.mean(0)
    centred = x - mean
    covariance = centred.T @ centred / max(1, len(x) - 1)
    _, vectors_ = torch.linalg.eigh(covariance)  # ascending eigenvalues
    axes = vectors_[:, -components:].flip(1)
    if axes.shape[1] < components:  # fewer channels than components: pad with zero axes
        axes = torch.cat([axes, axes.new_zeros(axes.shape[0], components - axes.shape[1])], dim=1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    return mean.float(), (axes * signs).float()


def pca_maps(
    backbone: DDAEBackbone,
    images: ImagesLike,
    layers: str | Sequence[str] | None = None,
    levels: NoiseLevel | Sequence[NoiseLevel] | None = None,
    seed: int = 0,
    ensemble: int = 1,
    figure: bool = True,
    progress: Progress | None = None,
) -> PCAMaps:
    """Dense features of ``images`` at each layer and noise level as RGB: the first three principal components of
    the (B * h * w, C) feature vectors of each cell, fitted jointly over the images so colours compare across them.

    ``images``: PIL images / uint8 arrays or a (B, 3, S, S) tensor in [-1, 1]; ``layers``, ``levels``: defaults
    ``backbone.default_layer()`` and the noise axis' default probe level. Returns :class:`PCAMaps` with a figure
    (rows: images; columns: the input, then each layer at each level) unless ``figure=False``.
    """
    pixels = as_pixels(backbone, images)
    layers, levels = checked_cells(backbone, layers, levels)
    check_positive("ensemble", ensemble)
    rgb, axes_, means, lows, highs = {}, {}, {}, {}, {}
    for i, level in enumerate(levels):
        if progress is not None:
            progress(i / len(levels), f"features at level {level}")
        dense = dense_features(backbone, pixels, layers, [level], seed, ensemble)
        for layer in layers:
            maps = dense[layer, level]  # (B, C, h, w)
            vectors = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
            mean, axes = fit_pca(vectors)
            projected = (vectors - mean) @ axes
            low, high = torch.quantile(projected, torch.tensor([0.01, 0.99]), dim=0)
            scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
            cell = (layer, level)
            rgb[cell] = scaled.reshape(maps.shape[0], maps.shape[2], maps.shape[3], 3).numpy()
            axes_[cell], means[cell], lows[cell], highs[cell] = axes, mean, low, high
    result = PCAMaps(layers, levels, pixels, rgb, axes_, means, lows, highs)
    if figure:
        result.figure = pca_figure(result)
    if progress is not None:
        progress(1.0, "done")
    return result


def pca_figure(maps: PCAMaps, cell: float = 0.9) -> Image.Image:
    """One figure of :class:`PCAMaps`: a row per image, the input then a column per (layer, level)."""
    cells = [(layer, level) for layer in maps.layers for level in maps.levels]
    figure, axes = grid_figure(len(maps.pixels), 1 + len(cells), cell)
    inputs = to_uint8(maps.pixels)
    for row in range(len(maps.pixels)):
        axes[row, 0].imshow(inputs[row], interpolation="nearest")
        for col, key in enumerate(cells, start=1):
            axes[row, col].imshow(maps.rgb[key][row], interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=7)
    for col, (layer, level) in enumerate(cells, start=1):
        axes[0, col].set_title(f"{short_layer(layer)}\nt={level}", fontsize=7)
    return figure_image(figure)


# ---------------------------------------------------------------------------------------------------- correspondences
@dataclass
class Correspondences:
    """Matches of ``points_a`` (P, 2) (x, y) pixels of image A: ``points_b`` (P, 2) int64 the most similar pixel of
    image B, ``similarities`` (P,) their cosine similarity, ``maps`` (P, S, S) float32 the similarity of each
    point to every pixel of B."""

    layer: str
    level: NoiseLevel
    points_a: np.ndarray
    points_b: np.ndarray
    similarities: np.ndarray
    maps: np.ndarray
    figure: Image.Image | None = field(default=None, repr=False)


def correspondences(
    backbone: DDAEBackbone,
    image_a: Image.Image | np.ndarray | torch.Tensor,
    image_b: Image.Image | np.ndarray | torch.Tensor,
    points: Sequence[Sequence[int]] | np.ndarray,
    layer: str | None = None,
    level: NoiseLevel | None = None,
    ensemble: int = 1,
    seed: int = 0,
    figure: bool = True,
) -> Correspondences:
    """For each (x, y) pixel of ``points`` in image A (coordinates at the model's image size S), the pixel of
    image B whose dense feature (``layer`` at ``level``, bilinearly upsampled to S x S, averaged over ``ensemble``
    noise draws) has the highest cosine similarity. Both images get the same noise. Images: PIL, uint8 arrays or
    (3, S, S) / (1, 3, S, S) tensors in [-1, 1]."""
    pair = []
    for name, image in (("image_a", image_a), ("image_b", image_b)):
        if isinstance(image, torch.Tensor) and image.ndim == 3:
            image = image[None]
        pair.append(as_pixels(backbone, image if isinstance(image, torch.Tensor) else [image], name))
    pixels = torch.cat(pair)
    if len(pixels) != 2:
        raise UsageError("image_a and image_b must be one image each.")
    size = pixels.shape[-1]
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or not np.issubdtype(points.dtype, np.number):
        raise UsageError(f"points must be a (P, 2) array of (x, y) pixels, got shape {points.shape}.")
    points = points.round().astype(np.int64)
    if points.min() < 0 or points.max() >= size:
        raise UsageError(f"points must lie in the {size}x{size} image (0 <= x, y < {size}): got {points.tolist()}.")
    layers, levels = checked_cells(backbone, layer, level)
    check_positive("ensemble", ensemble)
    layer, level = layers[0], levels[0]
    dense = dense_features(backbone, pixels, [layer], [level], seed, ensemble, upsample=True)[layer, level]
    dense = F.normalize(dense, dim=1)  # (2, C, S, S)
    source = dense[0][:, points[:, 1], points[:, 0]].T  # (P, C)
    maps = torch.einsum("pc,chw->phw", source, dense[1])
    flat = maps.flatten(1).argmax(1)
    points_b = torch.stack([flat % size, flat // size], dim=1).numpy()
    similarities = maps.flatten(1).gather(1, flat[:, None])[:, 0].numpy()
    result = Correspondences(layer, level, points, points_b, similarities, maps.numpy())
    if figure:
        result.figure = correspondence_figure(result, pixels)
    return result


def correspondence_figure(result: Correspondences, pixels: torch.Tensor, cell: float = 2.4) -> Image.Image:
    """Image A with its points, image B with the matches (same colours); with one point also its similarity map."""
    from matplotlib import colormaps

    single = len(result.points_a) == 1
    figure, axes = grid_figure(1, 3 if single else 2, cell)
    shown = to_uint8(pixels)
    colours = colormaps["tab10"](np.arange(len(result.points_a)) % 10)
    for ax, image, points, title in ((axes[0, 0], shown[0], result.points_a, "A"),
                                     (axes[0, 1], shown[1], result.points_b, "B")):  # fmt: skip
        ax.imshow(image, interpolation="nearest")
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=36, marker="o", edgecolors="white", linewidths=1)
        ax.set_title(title, fontsize=8)
    if single:
        axes[0, 2].imshow(result.maps[0], cmap="viridis", interpolation="nearest")
        axes[0, 2].scatter(result.points_b[:, 0], result.points_b[:, 1], c="red", s=20, marker="x")
        axes[0, 2].set_title(f"similarity {result.similarities[0]:.3f}", fontsize=8)
    figure.suptitle(f"{result.layer} t={result.level}", fontsize=8)
    return figure_image(figure)


__all__ = [
    "Correspondences",
    "LoadedModel",
    "Neighbours",
    "PCAMaps",
    "as_pixels",
    "cached_bank",
    "correspondences",
    "dataset_features",
    "default_picks",
    "fit_pca",
    "load_model",
    "nearest_neighbours",
    "pca_maps",
    "probe_pictures",
]
