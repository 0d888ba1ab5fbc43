"""Generation quality: Frechet and kernel distances of a pipeline's samples to a data set, through torchmetrics.

``score_pipeline`` samples ``num_samples`` images from a pipeline (``DDAEPipeline`` or any diffusers pipeline whose
call takes ``batch_size``, ``generator``, ``num_inference_steps`` and ``output_type="pt"``), runs them and the data
set's images through a feature network (:mod:`.feature_networks`: the FID Inception-v3, or an image classifier's
penultimate features) and returns the Frechet distance of torchmetrics' ``FrechetInceptionDistance`` and the kernel
distance of its ``KernelInceptionDistance`` (mean and standard deviation over subsets).

The reference features of a data set are computed once and cached on disk, one file per data set, split, image
column, rows (a hash of their image bytes), feature network fingerprint and resolution; the next score reads them.
Every check (the feature network, the data set and its column, the numbers of samples the metrics need) runs before
any image is generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import detect_image_column, load_split
from .errors import UsageError
from .feature_networks import FeatureNetwork, check_feature_network, load_feature_network
from .image_processing_ddae import to_rgb_array
from .io_utils import atomic_path

DEFAULT_NUM_SAMPLES = 1000
DEFAULT_KID_SUBSET_SIZE = 1000  # torchmetrics' default
DEFAULT_KID_SUBSETS = 100  # torchmetrics' default
FEATURE_BATCH_SIZE = 100
CACHE_VERSION = 1


def default_cache_dir() -> str:
    """Where reference features are cached: ``$DDAE_FID_CACHE``, else ``~/.cache/ddae_diffusers/fid_reference``."""
    given = os.environ.get("DDAE_FID_CACHE")
    if given:
        return given
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ddae_diffusers", "fid_reference")


@dataclass(frozen=True)
class GenerationScore:
    """A pipeline's samples against a data set in one feature space.

    Args:
        fd: Frechet distance of the sample and reference features (FID when the network is the Inception).
        kid_mean, kid_std: the kernel (polynomial MMD) distance, mean and std over ``kid_subsets`` subsets; None when
            it was not computed.
        fd_name, kd_name: how the scores are reported: ``"FID"``/``"KID"`` for the Inception, else
            ``"FD_<name>"``/``"KD_<name>"``.
        feature_network: the feature network's name (``inception-v3-compat-2048`` or the classifier's).
        num_samples: generated images; num_reference: data set images.
        reference_from_cache: whether the reference features were read from the cache.
    """

    fd: float
    kid_mean: float | None
    kid_std: float | None
    fd_name: str
    kd_name: str
    feature_network: str
    num_samples: int
    num_reference: int
    reference_from_cache: bool = False

    def as_dict(self) -> dict:
        """The fields, plus the scores under their own names (``{"FD_x": ..., "KD_x_mean": ...}``)."""
        named = {self.fd_name: self.fd}
        if self.kid_mean is not None:
            named.update({f"{self.kd_name}_mean": self.kid_mean, f"{self.kd_name}_std": self.kid_std})
        return {**named, **asdict(self)}

    def summary(self) -> str:
        """One line: ``FD_x 12.34, KD_x 0.0123 +- 0.0011 (1,000 samples vs 10,000 images)``."""
        text = f"{self.fd_name} {self.fd:.4g}"
        if self.kid_mean is not None:
            text += f", {self.kd_name} {self.kid_mean:.4g} +- {self.kid_std:.2g}"
        return text + f" ({self.num_samples:,} samples vs {self.num_reference:,} images)"


# ---------------------------------------------------------------------------------------------- checks
def check_counts(num_samples: int, num_reference: int, kid_subset_size: int | None) -> None:
    """``UsageError`` unless both sets have the >= 2 images FID needs and at least ``kid_subset_size`` (KID)."""
    for what, count in (("num_samples", num_samples), ("reference images", num_reference)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 2:
            raise UsageError(f"The Frechet distance needs at least 2 images on each side, got {what}={count!r}.")
    if kid_subset_size is not None:
        if isinstance(kid_subset_size, bool) or not isinstance(kid_subset_size, int) or kid_subset_size < 2:
            raise UsageError(f"kid_subset_size must be an integer >= 2, got {kid_subset_size!r}.")
        if kid_subset_size > min(num_samples, num_reference):
            raise UsageError(
                f"KID draws subsets of {kid_subset_size} images from each side, but there are {num_samples} samples "
                f"and {num_reference} reference images: lower --kid_subset_size or raise the counts."
            )


def resolve_kid_subset_size(kid_subset_size: int | None, num_samples: int, num_reference: int) -> int:
    """``kid_subset_size`` if given, else torchmetrics' 1,000 capped at the smaller set."""
    if kid_subset_size is None:
        return min(DEFAULT_KID_SUBSET_SIZE, num_samples, num_reference)
    return kid_subset_size


# ---------------------------------------------------------------------------------------------- features
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] (a pipeline's ``output_type="pt"``) -> uint8, rounded as PIL outputs are."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def features_of(network: FeatureNetwork, images: torch.Tensor, batch_size: int = FEATURE_BATCH_SIZE) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, D) float32 features, ``batch_size`` images at a time."""
    return torch.cat([network(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def _dataset_images(dataset, column: str, start: int, stop: int, resolution: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``column`` -> (B, 3, R, R) uint8 (RGB, shorter side resized, centre crop)."""
    batch = [to_rgb_array(image, resolution, True) for image in dataset[start:stop][column]]
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def _rows_digest(dataset, column: str) -> str:
    """sha256 of the image bytes (or paths) of every row of ``column``, in order: which images these are."""
    digest = hashlib.sha256()
    column_values = dataset.with_format("arrow")[column]
    chunks = getattr(column_values, "chunks", [column_values])
    for chunk in chunks:
        if hasattr(chunk, "field"):  # an Image column: struct<bytes, path>
            for data, path in zip(chunk.field("bytes").to_pylist(), chunk.field("path").to_pylist(), strict=True):
                digest.update(data if data is not None else f"path:{path}".encode())
                digest.update(b"\0")
        else:
            digest.update(repr(chunk.to_pylist()).encode())
    return digest.hexdigest()


def reference_key(
    dataset_name: str, split: str, column: str, rows_digest: str, network: FeatureNetwork, resolution: int
) -> dict:
    """What identifies cached reference features (stored beside them, compared on read)."""
    return {
        "version": CACHE_VERSION,
        "dataset": dataset_name,
        "split": split,
        "image_column": column,
        "rows_sha256": rows_digest,
        "feature_network": network.name,
        "feature_fingerprint": network.fingerprint,
        "resolution": int(resolution),
    }


def _cache_path(cache_dir: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    name = f"{os.path.basename(key['dataset'])}-{key['split']}"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return os.path.join(cache_dir, f"{stem}-{key['feature_network']}-{key['resolution']}px-{digest}.safetensors")


def reference_features(
    dataset,
    network: FeatureNetwork,
    resolution: int,
    *,
    dataset_name: str,
    split: str,
    image_column: str,
    cache_dir: str | None = None,
    batch_size: int = FEATURE_BATCH_SIZE,
) -> tuple[torch.Tensor, bool]:
    """(N, D) float32 features of every row of ``dataset`` at ``resolution``, and whether they came from the cache.

    With ``cache_dir`` (None: no cache), they are read from there when a file of the same key exists, else computed
    and written atomically."""
    from safetensors.torch import load_file, save_file

    path = key = None
    if cache_dir is not None:
        rows = _rows_digest(dataset, image_column)
        key = reference_key(dataset_name, split, image_column, rows, network, resolution)
        path = _cache_path(cache_dir, key)
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("key", "{}"))
            if stored == key:
                features = load_file(path)["features"]
                if features.shape == (len(dataset), network.num_features):
                    return features, True
    features = torch.cat([
        features_of(network, _dataset_images(dataset, image_column, i, min(i + batch_size, len(dataset)), resolution),
                    batch_size)
        for i in range(0, len(dataset), batch_size)
    ])  # fmt: skip
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})
    return features, False


# ---------------------------------------------------------------------------------------------- the metrics
class _Precomputed(torch.nn.Module):
    """The identity with a ``num_features``: lets torchmetrics' metrics take features computed (or cached) once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def compare_features(
    reference: torch.Tensor,
    samples: torch.Tensor,
    *,
    fd_name: str = "FD",
    kd_name: str = "KD",
    feature_network: str = "",
    kid: bool = True,
    kid_subset_size: int | None = None,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    seed: int = 0,
    reference_from_cache: bool = False,
) -> GenerationScore:
    """Frechet and kernel distances of (N, D) ``reference`` and (M, D) ``samples`` features, by torchmetrics'
    ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` (its subsets drawn with ``seed``)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        shapes = f"{tuple(reference.shape)} and {tuple(samples.shape)}"
        raise UsageError(f"Features must be (N, D) and (M, D) with the same D, got {shapes}.")
    subset = resolve_kid_subset_size(kid_subset_size, len(samples), len(reference)) if kid else None
    check_counts(len(samples), len(reference), subset)
    identity = _Precomputed(reference.shape[1])
    # both feature sets are here: no gathering across processes (under accelerate only the main process scores,
    # and a collective it started alone would wait for the others forever)
    local = {"sync_on_compute": False}
    fid = FrechetInceptionDistance(feature=identity, reset_real_features=False, **local)
    fid.update(reference, real=True)
    fid.update(samples, real=False)
    fd = float(fid.compute())
    kid_mean = kid_std = None
    if kid:
        with warnings.catch_warnings():  # the features are held anyway: they are the function's arguments
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer")
            metric = KernelInceptionDistance(feature=identity, subsets=kid_subsets, subset_size=subset, **local)
        metric.update(reference, real=True)
        metric.update(samples, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
        kid_mean, kid_std = float(mean), float(std)
    return GenerationScore(
        fd=fd, kid_mean=kid_mean, kid_std=kid_std, fd_name=fd_name, kd_name=kd_name, feature_network=feature_network,
        num_samples=len(samples), num_reference=len(reference), reference_from_cache=reference_from_cache,
    )  # fmt: skip


def compare_images(
    reference: torch.Tensor, samples: torch.Tensor, network: FeatureNetwork, **kwargs
) -> GenerationScore:
    """:func:`compare_features` of two (N, 3, H, W) uint8 image sets in ``network``'s feature space."""
    return compare_features(
        features_of(network, reference), features_of(network, samples),
        fd_name=network.fd_name, kd_name=network.kd_name, feature_network=network.name, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- pipelines
def sample_images(
    pipeline: Callable,
    num_samples: int,
    *,
    batch_size: int = 64,
    num_inference_steps: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(num_samples, 3, H, W) uint8 images of ``pipeline`` (called with ``output_type="pt"``), drawn with one
    generator seeded by ``seed``, ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    batches, done = [], 0
    while done < num_samples:
        size = min(batch_size, num_samples - done)
        images = pipeline(batch_size=size, generator=generator, output_type="pt", **kwargs).images
        batches.append(to_uint8(images))
        done += size
        if progress is not None:
            progress(done, num_samples)
    return torch.cat(batches)


def pipeline_resolution(pipeline) -> int:
    """The side of a pipeline's samples: its denoiser's ``sample_size`` (times the VAE's scale for latent models)."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise UsageError("Cannot tell the pipeline's sample resolution (no unet/transformer sample_size): pass "
                         "resolution=.")
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        size *= 2 ** (len(vae.config.block_out_channels) - 1)
    return size


def prepare_reference(
    dataset_or_name,
    *,
    split: str = "test",
    image_column: str | None = None,
    num_reference: int | None = None,
    config_name: str | None = None,
):
    """(dataset, its name, image column) of a ``datasets.Dataset`` or a Hub id / folder, its first ``num_reference``
    rows; ``UsageError`` when it cannot be loaded or has no such column."""
    if isinstance(dataset_or_name, str):
        name = os.path.abspath(dataset_or_name) if os.path.isdir(dataset_or_name) else dataset_or_name
        dataset = load_split(dataset_or_name, split, num_reference, config_name)
    else:
        dataset = dataset_or_name
        name = getattr(dataset.info, "dataset_name", None) or getattr(dataset.info, "builder_name", None) or "dataset"
        if num_reference is not None:
            if num_reference < 1:
                raise UsageError(f"num_reference must be >= 1, got {num_reference}.")
            dataset = dataset.select(range(min(num_reference, len(dataset))))
    column = detect_image_column(dataset, image_column)
    return dataset, name, column


def score_pipeline(
    pipeline,
    dataset_or_name,
    *,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    feature: FeatureNetwork | str | None = None,
    inception_weights: str | None = None,
    split: str = "test",
    image_column: str | None = None,
    num_reference: int | None = None,
    config_name: str | None = None,
    num_inference_steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    kid: bool = True,
    kid_subset_size: int | None = None,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    resolution: int | None = None,
    cache_dir: str | None | bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> GenerationScore:
    """FID/KID (or FD/KD in a classifier's feature space) of ``num_samples`` images of ``pipeline`` against a data set.

    Args:
        pipeline: a ``DDAEPipeline`` (or a diffusers pipeline with the same call) to sample from.
        dataset_or_name: a ``datasets.Dataset``, or a Hub id / folder loaded with ``split`` (and ``config_name``).
        feature: None for the FID Inception-v3 (needs torch-fidelity and its weights, or ``inception_weights``), a
            folder / Hub id of an ``AutoModelForImageClassification``, or a loaded :class:`FeatureNetwork`.
        num_reference: the first rows of the split to compare with (default: all).
        num_inference_steps: sampling steps (default: the pipeline's).
        kid: also compute the kernel distance, on subsets of ``kid_subset_size`` (default min(1000, both counts)).
        resolution: side of the reference images (default: the pipeline's sample size).
        cache_dir: where reference features are cached; True for :func:`default_cache_dir`, None/False for none.

    Everything is checked (feature network, data set, column, counts) before the first sample is drawn.
    """
    if isinstance(feature, torch.nn.Module):
        network = check_feature_network(feature)
    else:
        network = load_feature_network(feature, inception_weights)
    dataset, name, column = prepare_reference(
        dataset_or_name, split=split, image_column=image_column, num_reference=num_reference, config_name=config_name
    )
    subset = resolve_kid_subset_size(kid_subset_size, num_samples, len(dataset)) if kid else None
    check_counts(num_samples, len(dataset), subset)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
    resolution = pipeline_resolution(pipeline) if resolution is None else resolution
    if cache_dir is True:
        cache_dir = default_cache_dir()
    reference, cached = reference_features(
        dataset, network, resolution, dataset_name=name, split=split, image_column=column,
        cache_dir=cache_dir or None,
    )  # fmt: skip
    images = sample_images(
        pipeline, num_samples, batch_size=batch_size, num_inference_steps=num_inference_steps, seed=seed,
        progress=progress,
    )  # fmt: skip
    samples = features_of(network, images)
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(dim=1).sum())
        raise UsageError(f"{bad} of {len(samples)} samples have non-finite features: the pipeline generates NaNs.")
    return compare_features(
        reference, samples, fd_name=network.fd_name, kd_name=network.kd_name, feature_network=network.name, kid=kid,
        kid_subset_size=subset, kid_subsets=kid_subsets, seed=seed, reference_from_cache=cached,
    )  # fmt: skip


__all__ = [
    "GenerationScore",
    "check_counts",
    "compare_features",
    "compare_images",
    "default_cache_dir",
    "features_of",
    "pipeline_resolution",
    "prepare_reference",
    "reference_features",
    "sample_images",
    "score_pipeline",
    "to_uint8",
]
