"""Data sets and augmentation: image/label column detection and crop/flip on [-1, 1] tensors.

The pixel conversion (PIL/numpy -> [-1, 1] tensors) lives with the image processor and is re-exported here.
No torchvision: PIL does the resizing, torch the augmentation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .errors import UsageError
from .image_processing_ddae import ImageLike, images_to_tensor, to_rgb_array

__all__ = ["images_to_tensor", "to_rgb_array", "random_crop_flip", "detect_image_column", "detect_label_column",
           "label_names", "ImageLike", "pixels_of", "read_labels", "default_num_workers", "detect_eval_split"]

IMAGE_COLUMN_CANDIDATES = ("img", "image", "pixel_values")
# CIFAR-100 (uoft-cs/cifar100) has both fine_label (100 classes) and coarse_label (20 superclasses): fine first.
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "class")
# Held-out splits, in the order they are preferred when none is given (Hub data sets use all four names).
EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")


def default_num_workers(device: torch.device | str) -> int:
    """Image-loading worker processes for ``device``: 0 (the main process) on CPU, where the forward needs the
    cores; ``min(8, os.cpu_count())`` on CUDA, where decoding must keep up with the accelerator."""
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def read_labels(dataset, column: str) -> np.ndarray:
    """The ``column`` of ``dataset`` (N,) as a numpy array, read in one call from its Arrow column (row
    selections included); ``UsageError`` when some rows have no label."""
    values = dataset.with_format("arrow")[column]
    if values.null_count:
        raise UsageError(f"{values.null_count} rows have no label in {column!r}: drop them or pick another split.")
    return np.array(values.to_numpy())  # a writable copy


@functools.cache
def _pixel_values() -> np.ndarray:
    """(256,) float32: what :func:`images_to_tensor` turns each uint8 value into (taken from it, so they agree)."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), (16, 16, 3))
    return images_to_tensor([np.ascontiguousarray(ramp)], 16)[0, 0].flatten().numpy()


def pixels_of(images: Sequence[ImageLike], resolution: int) -> torch.Tensor:
    """:func:`images_to_tensor` (centre crop), bit for bit, faster: RGB PIL images already ``resolution`` pixels
    square skip the PIL conversion, and all values go through one table lookup. -> (B, 3, R, R) float32."""
    rows = []  # each image's (R, R, 3) uint8 bytes
    for image in images:
        if isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (resolution, resolution):
            rows.append(image.tobytes())
        else:
            rows.append(to_rgb_array(image, resolution, True).tobytes())
    batch = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), resolution, resolution, 3)
    batch = batch.transpose(0, 3, 1, 2)  # (B, 3, R, R), a view
    return torch.from_numpy(np.take(_pixel_values(), batch))


def _pick_column(features, given: str | None, candidates: tuple[str, ...], flag: str, missing: str) -> str:
    """``given`` if it is a column, else the first of ``candidates`` present; ``UsageError`` naming ``flag``."""
    if given is None:
        given = next((c for c in candidates if c in features), None)
        if given is None:
            raise UsageError(missing)
    elif given not in features:
        raise UsageError(f"{flag} {given!r} is not a column of the data set: {list(features)}.")
    return given


def detect_image_column(dataset, image_column: str | None = None) -> str:
    """The column of ``dataset`` holding images: ``image_column`` if given, else ``img``/``image``."""
    import datasets

    features = dataset.features
    image_column = _pick_column(
        features, image_column, IMAGE_COLUMN_CANDIDATES, "--image_column",
        f"No image column found among {list(features)}: pass --image_column with the right name.",
    )
    if not isinstance(features[image_column], datasets.Image):
        raise UsageError(
            f"Column {image_column!r} holds {features[image_column]}, not images: pass --image_column with "
            f"an image column ({[c for c, f in features.items() if isinstance(f, datasets.Image)]})."
        )
    return image_column


def detect_label_column(dataset, label_column: str | None = None) -> str:
    """The integer class-label column: ``label_column`` if given, else the first of ``label``, ``labels``,
    ``fine_label``, ``coarse_label``, ``class`` that the data set has. CIFAR-100 has both ``fine_label`` (100
    classes) and ``coarse_label`` (20 superclasses): ``fine_label`` is taken; pass ``--label_column coarse_label``
    for the superclasses."""
    import datasets

    features = dataset.features
    label_column = _pick_column(
        features, label_column, LABEL_COLUMN_CANDIDATES, "--label_column",
        f"The data set has no label column among {list(features)}: probing and classification need integer "
        "class labels; pass --label_column.",
    )
    feature = features[label_column]
    is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if not isinstance(feature, datasets.ClassLabel) and not is_int:
        raise UsageError(
            f"Column {label_column!r} holds {feature}, not integer class labels: "
            "cast it to ClassLabel (dataset.class_encode_column) or pass another --label_column."
        )
    return label_column


def conversion_note(image, resolution: int) -> str | None:
    """What the pixel conversion does to ``image`` (a PIL image or array) for a ``resolution`` RGB model, in
    words, or None when nothing changes: ``"64x64 L images are converted to RGB, resized to 32x32"``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    changes = []
    if image.mode != "RGB":
        changes.append(f"converted from {image.mode} to RGB")
    if image.size != (resolution, resolution):
        changes.append(f"resized (shorter side) and centre-cropped to {resolution}x{resolution}")
    if not changes:
        return None
    return f"{image.width}x{image.height} {image.mode} images are " + " and ".join(changes)


def load_split(name: str, split: str, max_samples: int | None = None, config_name: str | None = None):
    """One split of a data set (Hub id or folder), its first ``max_samples`` rows; a ``UsageError`` that names
    the cause (missing, offline, a model folder, an unknown split, empty) otherwise."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:  # missing files, offline, ...
        raise UsageError(f"Could not load split {split!r} of data set {name!r}: {error}.{_load_hint(name, error)}"
                         ) from None
    if max_samples is not None:
        if max_samples < 1:
            raise UsageError(f"--max_*_samples must be >= 1, got {max_samples}.")
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if len(dataset) == 0:
        raise UsageError(f"Split {split!r} of {name!r} is empty.")
    return dataset


def _load_hint(name: str, error: Exception) -> str:
    """What to do when data set ``name`` could not be read (``error``): a sentence with a leading space, or ""."""
    if os.path.isfile(os.path.join(name, "model_index.json")) or os.path.isfile(os.path.join(name, "config.json")):
        return " It is a model folder, not a data set: pass the model as --model and a data set as --dataset."
    if isinstance(error, ConnectionError):
        return " Offline, pass a local copy (data/cifar10-sample in this repository is CIFAR-10)."
    return ""


def detect_eval_split(name: str, config_name: str | None = None, given: str | None = None) -> str:
    """The held-out split of data set ``name`` (Hub id or folder): ``given`` if passed (not checked here:
    :func:`load_split` names a missing one), else the first of ``test``, ``validation``, ``valid``, ``val`` that
    it has; a ``UsageError`` naming ``--eval_split`` and listing its splits when it has none of them.

    A folder's split names are the ones ``datasets.load_dataset`` gives it: Parquet/Arrow files named
    ``valid-00000-of-00001.parquet`` (the Hub's layout) keep ``valid``, while a ``valid/`` or ``val/`` subfolder
    is read as ``validation``.
    """
    if given is not None:
        return given
    import datasets

    model_folder = _load_hint(name, ValueError())  # a model folder: say so before listing its "splits"
    if model_folder:
        raise UsageError(f"Could not load data set {name!r}.{model_folder}")

    try:
        splits = datasets.get_dataset_split_names(name, config_name)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise UsageError(f"Could not list the splits of data set {name!r}: {error}.{_load_hint(name, error)}"
                         ) from None
    found = next((split for split in EVAL_SPLIT_CANDIDATES if split in splits), None)
    if found is None:
        raise UsageError(
            f"Data set {name!r} has no {'/'.join(EVAL_SPLIT_CANDIDATES)} split to evaluate on: pass --eval_split "
            f"with one of its splits {list(splits)} (not the training split)."
        )
    return found


def label_names(dataset, label_column: str) -> list[str] | None:
    """Class names of a ``ClassLabel`` column, else None."""
    import datasets

    feature = dataset.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def random_crop_flip(
    pixel_values: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop after ``padding`` pixels of black (-1) on each side, and random horizontal flip.

    ``pixel_values``: (B, C, H, W) in [-1, 1]; each example draws its own offsets and flip.
    """
    batch, _, height, width = pixel_values.shape
    padded = torch.nn.functional.pad(pixel_values, (padding,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5 if flip else torch.zeros(batch, dtype=torch.bool)
    out = torch.empty_like(pixel_values)
    for i in range(batch):
        top, left = offsets[i].tolist()
        crop = padded[i, :, top : top + height, left : left + width]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out
