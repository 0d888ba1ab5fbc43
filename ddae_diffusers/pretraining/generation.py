"""Watching generation quality during pretraining: the Frechet and kernel distances of samples of the current
(EMA) weights to a fixed reference set, and the history of those numbers (lower is better).

Used by ``training/train_unconditional.py`` (``--fid_every_n_steps``) beside the probe monitor. Every evaluation
draws the same noise (``seed``), so changes in the score come from the weights; the reference features are computed
once (and cached on disk by :mod:`ddae_diffusers.generation_metrics`).
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..feature_networks import FeatureNetwork
from ..generation_metrics import (
    DEFAULT_KID_SUBSETS,
    GenerationScore,
    check_counts,
    compare_features,
    features_of,
    reference_features,
    resolve_kid_subset_size,
    sample_images,
)
from .checkpoints import StepHistory


class GenerationMonitor:
    """FD/KD of ``num_samples`` images of a pipeline against a reference split, in ``network``'s feature space.

    Args:
        network: the feature network (Inception or an image classifier), already loaded and checked.
        reference: the reference ``datasets.Dataset`` (its rows are the reference set).
        dataset_name, split, image_column: name the reference set (cache key and card).
        resolution: side of the samples; reference images are resized (shorter side) and centre-cropped to it.
        num_samples: images sampled per evaluation; num_inference_steps: sampling steps (None: the scheduler's).
        sampler: the sampler's name for reports (e.g. ``"DDIM"``).
        kid_subset_size: None for min(1000, both counts); cache_dir: None for no disk cache.
    """

    def __init__(
        self,
        network: FeatureNetwork,
        reference,
        *,
        dataset_name: str,
        split: str,
        image_column: str,
        resolution: int,
        num_samples: int,
        num_inference_steps: int | None,
        sampler: str,
        batch_size: int = 64,
        seed: int = 0,
        kid_subset_size: int | None = None,
        kid_subsets: int = DEFAULT_KID_SUBSETS,
        cache_dir: str | None = None,
    ) -> None:
        self.kid_subset_size = resolve_kid_subset_size(kid_subset_size, num_samples, len(reference))
        check_counts(num_samples, len(reference), self.kid_subset_size)
        if batch_size < 1:
            raise UsageError(f"--fid_batch_size must be >= 1, got {batch_size}.")
        self.network, self.reference = network, reference
        self.dataset_name, self.split, self.image_column = dataset_name, split, image_column
        self.resolution, self.num_samples, self.num_inference_steps = resolution, num_samples, num_inference_steps
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed
        self.kid_subsets, self.cache_dir = kid_subsets, cache_dir
        self._reference: torch.Tensor | None = None  # (N, D), computed or read at the first evaluation

    @property
    def metric_name(self) -> str:
        """``"FID"`` for the Inception, ``"FD_<name>"`` for a classifier."""
        return self.network.fd_name

    def description(self) -> str:
        """In words: ``1,000 samples (DDIM, 50 steps) vs 10,000 images of split 'test' of <data>, <network>``."""
        steps = "default steps" if self.num_inference_steps is None else f"{self.num_inference_steps} steps"
        return (
            f"{self.num_samples:,} samples ({self.sampler}, {steps}, seed {self.seed}) vs {len(self.reference):,} "
            f"images of split '{self.split}' of {self.dataset_name} at {self.resolution}px, features of "
            f"{self.network.name}"
        )

    def reference_features(self) -> torch.Tensor:
        """(N, D) float32 features of the reference set (computed or read from the cache once, then kept)."""
        if self._reference is None:
            self._reference, _ = reference_features(
                self.reference, self.network, self.resolution, dataset_name=self.dataset_name, split=self.split,
                image_column=self.image_column, cache_dir=self.cache_dir,
            )  # fmt: skip
        return self._reference

    def evaluate(self, pipeline) -> GenerationScore:
        """The score of ``pipeline``'s samples (a pipeline over the weights to judge, called with
        ``output_type="pt"``); the denoiser is put in eval mode for sampling and its mode restored."""
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        was_training = denoiser.training if denoiser is not None else False
        if denoiser is not None:
            denoiser.eval()
        try:
            with torch.no_grad():
                images = sample_images(pipeline, self.num_samples, batch_size=self.batch_size,
                                       num_inference_steps=self.num_inference_steps, seed=self.seed)
        finally:
            if denoiser is not None:
                denoiser.train(was_training)
        samples = features_of(self.network, images)
        reference = self.reference_features()
        if not torch.isfinite(samples).all():  # a diverging model: report it as an infinitely bad score
            return GenerationScore(
                fd=math.inf, kid_mean=None, kid_std=None, fd_name=self.network.fd_name, kd_name=self.network.kd_name,
                feature_network=self.network.name, num_samples=len(samples), num_reference=len(reference),
            )  # fmt: skip
        return compare_features(
            reference, samples, fd_name=self.network.fd_name, kd_name=self.network.kd_name,
            feature_network=self.network.name, kid_subset_size=self.kid_subset_size, kid_subsets=self.kid_subsets,
            seed=self.seed,
        )  # fmt: skip


class ScoreHistory(StepHistory):
    """Every generation score of a run and the best (lowest distance); checkpointed with
    ``accelerator.register_for_checkpointing``. Ties keep the earlier step; an infinite or NaN score never wins."""

    higher_is_better = False

    def add(self, step: int, images_seen: int, score: GenerationScore) -> bool:
        """Records one score; returns True if it is the new best."""
        record = {"step": int(step), "images_seen": int(images_seen), "fd": float(score.fd),
                  "kid_mean": score.kid_mean, "kid_std": score.kid_std, "metric": score.fd_name}
        return self.record(record, score.fd_name, record["fd"])


__all__ = ["GenerationMonitor", "ScoreHistory"]
