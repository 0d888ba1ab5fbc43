"""``DDAEImageProcessor``: images -> (B, 3, R, R) ``pixel_values`` in [-1, 1], without torchvision.

The pixel conversion itself (RGB, resize, crop, scale) is :func:`images_to_tensor`, the one place that
knows the normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .errors import UsageError, UsageTypeError

ImageLike = Image.Image | np.ndarray


def to_rgb_array(
    image: ImageLike, resolution: int, center_crop: bool = True, rng: np.random.Generator | None = None
) -> np.ndarray:
    """One PIL image or (H, W[, C]) uint8 array -> (resolution, resolution, 3) uint8 array.

    Grayscale and RGBA become RGB; the shorter side is resized to ``resolution``
    (bilinear), then the centre (or, with ``rng``, a random square drawn from it; with
    ``center_crop=False``, the whole image resized to a square) is kept.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UsageTypeError(f"Expected a PIL image or a uint8 numpy array, got {type(image).__name__}.")
    image = image.convert("RGB")
    width, height = image.size
    if center_crop:
        scale = resolution / min(width, height)
        new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, Image.BILINEAR)
        if rng is None:
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        else:
            left = int(rng.integers(0, image.width - resolution + 1))
            top = int(rng.integers(0, image.height - resolution + 1))
        image = image.crop((left, top, left + resolution, top + resolution))
    elif image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def images_to_tensor(images: Sequence[ImageLike], resolution: int, center_crop: bool = True) -> torch.Tensor:
    """PIL images or uint8 arrays -> (B, 3, resolution, resolution) float32 in [-1, 1]."""
    batch = np.stack([to_rgb_array(image, resolution, center_crop) for image in images])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _as_image(image) -> Image.Image | np.ndarray:
    """One PIL image, numpy array or tensor -> PIL image or (H, W[, C]) uint8 array.

    Arrays and tensors may be HWC or CHW; floats are taken to be in [0, 1].
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise UsageTypeError(
            f"DDAEImageProcessor takes PIL images, numpy arrays or torch tensors, not {type(image).__name__}."
        )
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)  # CHW -> HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise UsageError(f"Expected an (H, W), (H, W, C) or (C, H, W) image, got shape {image.shape}.")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            if image.min() < 0 or image.max() > 1:
                raise UsageError(
                    "Float images must be in [0, 1] (pass uint8 arrays for 0..255 values); "
                    f"got range [{image.min():.3g}, {image.max():.3g}]."
                )
            image = image * 255.0
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


DEFAULT_SIZE = 32
# The [-1, 1] range of diffusion models as transformers' ``(x / 255 - mean) / std`` (images_to_tensor computes it).
IMAGE_MEAN_STD = 0.5


def size_dict(size: dict[str, int] | int) -> dict[str, int]:
    """An int side or a transformers size dict -> ``{"height": S, "width": S}`` or ``{"shortest_edge": S}``."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        side = size["shortest_edge"]
    elif isinstance(size, dict) and set(size) == {"height", "width"}:
        if size["height"] != size["width"]:
            raise UsageError(
                f"size {size} is not square: DDAE models take square images; pass size={{'height': S, 'width': S}}."
            )
        side = size["height"]
    else:
        raise UsageError(f"size must be S, {{'height': S, 'width': S}} or {{'shortest_edge': S}}, got {size!r}.")
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        raise UsageError(f"size must be a positive number of pixels, got {size!r}.")
    return dict(size)


def size_side(size: dict[str, int]) -> int:
    """The output side S of a size dict from :func:`size_dict`."""
    return size["shortest_edge"] if "shortest_edge" in size else size["height"]


def _normalisation(name: str, value: Sequence[float] | float | None) -> list[float]:
    """``image_mean`` / ``image_std`` as a list of 3 floats; only the [-1, 1] normalisation (0.5) is accepted."""
    expected = [IMAGE_MEAN_STD] * 3
    if value is None:
        return expected
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if values != expected:
        raise UsageError(
            f"{name}={value!r}: DDAE models take pixels scaled to [-1, 1], i.e. {name}={IMAGE_MEAN_STD}; drop it."
        )
    return values


class DDAEImageProcessor(BaseImageProcessor):
    r"""Prepares images for a DDAE classifier: RGB conversion (grayscale and RGBA too), resize, optional
    center crop, rescale to [-1, 1].

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 32, "width": 32}`):
            Output side in pixels (the denoiser's resolution), as transformers' image processors give it:
            `{"height": S, "width": S}` or `{"shortest_edge": S}`; an int `S` reads as `{"height": S, "width": S}`.
            The output is always S x S.
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Resize the shorter side to S and keep the centre; otherwise resize the whole image to S x S.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            The mean of the normalisation ``(x / 255 - mean) / std`` that maps pixels to [-1, 1], the range
            diffusion models are trained on. Recorded for recipes that read it; other values are refused.
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            The std of that normalisation. Recorded for recipes that read it; other values are refused.

    Returns a `BatchFeature` with `pixel_values` of shape (B, 3, S, S), float32 in [-1, 1].
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        do_center_crop: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size_dict(DEFAULT_SIZE if size is None else size)
        self.do_center_crop = do_center_crop
        self.image_mean = _normalisation("image_mean", image_mean)
        self.image_std = _normalisation("image_std", image_std)

    @property
    def side(self) -> int:
        """The output side S in pixels."""
        return size_side(self.size)

    def to_dict(self) -> dict:
        # No "image_processor_type": AutoImageProcessor then resolves the class from the model's config.json
        # (model_type "ddae" locally, its auto_map with trust_remote_code=True). With the type recorded,
        # transformers' pipeline() would also look for a remote "DDAEVideoProcessor" and prompt the user.
        output = super().to_dict()
        output.pop("image_processor_type", None)
        return output

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images,
        size: dict[str, int] | int | None = None,
        do_center_crop: bool | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """images: one image, a sequence of PIL images / arrays / tensors, or a (B, ...) array or tensor;
        ``size`` (a dict or an int, as in ``__init__``) overrides the processor's for this call."""
        side = self.side if size is None else size_side(size_dict(size))
        do_center_crop = self.do_center_crop if do_center_crop is None else do_center_crop
        if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)):
            is_batch = not isinstance(images, Image.Image) and images.ndim == 4
        else:  # a list, tuple or any other sequence (e.g. a datasets Column)
            is_batch, images = True, list(images)
        batch = [_as_image(image) for image in (images if is_batch else [images])]
        if not batch:
            raise UsageError("No images given.")
        pixel_values = images_to_tensor(batch, side, do_center_crop)
        if return_tensors == "np":
            pixel_values = pixel_values.numpy()
        return BatchFeature(data={"pixel_values": pixel_values})


__all__ = ["DDAEImageProcessor"]
