"""What the picture functions of :mod:`ddae_diffusers.visualize` share: checked inputs and figure drawing."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .capture import DDAEBackbone
from .errors import UsageError, UsageTypeError
from .image_processing_ddae import images_to_tensor
from .noise import NoiseLevel

Cell = tuple[str, NoiseLevel]
Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is being done)
ImagesLike = torch.Tensor | Sequence[Image.Image | np.ndarray]
SPACES = ("features", "pixels")


# ---------------------------------------------------------------------------------------------------- inputs
def as_pixels(backbone: DDAEBackbone, images: ImagesLike, name: str = "images") -> torch.Tensor:
    """PIL images / uint8 arrays (any size: resized and centre-cropped) or a (B, 3, H, W) tensor in [-1, 1] ->
    (B, 3, S, S) float32 in [-1, 1] at the model's image size S; a ``UsageError`` otherwise."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    if isinstance(images, np.ndarray):
        images = list(images)
    if isinstance(images, torch.Tensor):
        pixels = images
    else:
        images = list(images)
        size = backbone.image_size
        if size is None:
            raise UsageError("The model has no sample_size: pass images as a (B, 3, S, S) tensor in [-1, 1].")
        if not images:
            raise UsageError(f"No {name} given: pass at least one PIL image.")
        bad = [type(image).__name__ for image in images if not isinstance(image, (Image.Image, np.ndarray))]
        if bad:
            raise UsageTypeError(f"{name} must be PIL images, uint8 arrays or a (B, 3, H, W) tensor, not {bad[0]}.")
        try:
            pixels = images_to_tensor(images, size)
        except (TypeError, ValueError) as error:
            message = f"Could not read {name} as RGB images ({error}): pass PIL images or uint8 arrays."
            raise UsageError(message) from None
    return backbone.check_images(pixels).cpu()


def checked_cells(backbone: DDAEBackbone, layers, levels) -> tuple[list[str], list[NoiseLevel]]:
    """Checked layer names and noise levels; None gives the family's default layer / the default probe level."""
    layers = backbone.check_layers(backbone.default_layer() if layers is None else layers)
    levels = backbone.check_timesteps(backbone.noise_axis.default_probe_level() if levels is None else levels)
    return layers, levels


def check_positive(name: str, value: int) -> int:
    """``value`` if it is an integer >= 1, else a ``UsageError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def dense_features(backbone: DDAEBackbone, pixels: torch.Tensor, layers, levels, seed: int, ensemble: int = 1,
           upsample: bool = False) -> dict[Cell, torch.Tensor]:  # fmt: skip
    """{(layer, level): (B, C, h, w) float32 on the CPU}, every image with the noise of example id 0."""
    features = backbone.features(pixels, layers, levels, pooling="spatial", seed=seed, example_ids=[0] * len(pixels),
                                 upsample=upsample, ensemble=ensemble)  # fmt: skip
    return {key: value.cpu() for key, value in features.items()}


def short_layer(layer: str) -> str:
    """A layer name short enough for a column title: ``mid_block.resnets.1`` -> ``mid.res.1``."""
    return layer.replace("_blocks", "").replace("_block", "").replace("resnets", "res").replace("attentions", "attn")


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, for display (the inverse of images_to_tensor's scaling)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def grid_figure(rows: int, cols: int, cell: float = 1.0, hspace: float = 0.1):
    """A matplotlib ``Figure`` (no pyplot state) with a ``rows`` x ``cols`` grid of bare axes of ``cell`` inches."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(cols * cell, rows * cell * (1 + hspace) + 0.35), dpi=100)
    axes = figure.subplots(rows, cols, squeeze=False, gridspec_kw={"hspace": hspace, "wspace": 0.05})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    return figure, axes


def figure_image(figure) -> Image.Image:
    """A matplotlib figure drawn by the Agg canvas as an RGB ``PIL.Image``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.05)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
