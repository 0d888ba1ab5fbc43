"""Watching representation quality during pretraining: kNN and quick linear-probe accuracy of
the denoiser's features on fixed labelled subsets, and the history of those numbers.

Used by ``training/train_unconditional.py`` (``--probe_every_n_steps``) on the EMA weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import SchedulerMixin

from ..capture import EXTRACTION_BATCH_SIZE, DDAEBackbone, Denoiser
from ..data import detect_image_column, detect_label_column, images_to_tensor, read_labels
from ..errors import UsageError
from ..probing.heads import linear_probe_accuracy
from ..probing.knn import knn_accuracy
from .checkpoints import StepHistory

EVAL_SPLIT_CANDIDATES = ("test", "validation", "valid", "val")


@dataclass
class ProbeData:
    """Fixed labelled subsets, already preprocessed: images (N, 3, R, R) in [-1, 1], labels (N,),
    and ids (N,) = dataset indices (they seed each example's noise)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_ids: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    eval_ids: torch.Tensor
    description: str


def eval_split_name(dataset_dict) -> str | None:
    """The held-out split of a ``DatasetDict`` (``test``, ``validation``, ``valid`` or ``val``), if any."""
    return next((name for name in EVAL_SPLIT_CANDIDATES if name in dataset_dict), None)


def load_probe_data(
    dataset_dict,
    resolution: int,
    num_train: int,
    num_eval: int,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str = "train",
    seed: int = 0,
) -> ProbeData:
    """Draws fixed random subsets of labelled images from a ``DatasetDict``.

    The probe's training subset comes from ``train_split``; the evaluation subset from the
    ``test``/``validation`` split if there is one, else from other examples of ``train_split``.
    Images are resized and centre-cropped to ``resolution``. Raises ``ValueError`` on missing
    splits/columns or too few examples.
    """
    if train_split not in dataset_dict:
        raise UsageError(f"The probe data set has no {train_split!r} split (splits: {list(dataset_dict)}).")
    if num_train < 1 or num_eval < 1:
        raise UsageError("--probe_train_samples and --probe_eval_samples must be >= 1.")
    train = dataset_dict[train_split]
    image_column = detect_image_column(train, image_column)
    label_column = detect_label_column(train, label_column)
    rng = np.random.default_rng(seed)
    eval_name = eval_split_name(dataset_dict)
    if eval_name is not None:
        held_out = dataset_dict[eval_name]
        detect_image_column(held_out, image_column)
        detect_label_column(held_out, label_column)
        _check_size(train, num_train, train_split, "--probe_train_samples")
        _check_size(held_out, num_eval, eval_name, "--probe_eval_samples")
        train_ids = np.sort(rng.choice(len(train), num_train, replace=False))
        eval_ids = np.sort(rng.choice(len(held_out), num_eval, replace=False))
        description = f"{num_train} images of split '{train_split}', {num_eval} of split '{eval_name}'"
    else:
        held_out = train
        _check_size(train, num_train + num_eval, train_split, "--probe_train_samples + --probe_eval_samples")
        order = rng.permutation(len(train))
        train_ids, eval_ids = np.sort(order[:num_train]), np.sort(order[num_train : num_train + num_eval])
        description = f"{num_train} + {num_eval} disjoint images of split '{train_split}'"

    def subset(ds, ids):
        rows = ds.select(ids.tolist())
        images = images_to_tensor(rows[image_column], resolution, center_crop=True)
        return images, torch.from_numpy(read_labels(rows, label_column)).long(), torch.from_numpy(ids).long()

    return ProbeData(*subset(train, train_ids), *subset(held_out, eval_ids), description=description)


def _check_size(split, needed: int, name: str, flag: str) -> None:
    if len(split) < needed:
        raise UsageError(f"{flag} asks for {needed} images but split {name!r} has {len(split)}: lower it.")


class ProbeMonitor:
    """Computes kNN and linear-probe accuracy of a denoiser's pooled features on :class:`ProbeData`, on the
    denoiser's device.

    Args:
        data: the fixed subsets.
        layer, timestep: where features are taken (diffusers timestep index).
        batch_size: images per feature-extraction forward.
        dtype: autocast dtype for extraction (``torch.bfloat16`` is faster on CPUs with bf16 instructions and on GPUs).
        linear_epochs, linear_lr: the quick linear probe (0 epochs: kNN only).
        seed: noise seed; the same every time, so changes in accuracy come from the weights.
    """

    def __init__(
        self,
        data: ProbeData,
        layer: str,
        timestep: int,
        batch_size: int = EXTRACTION_BATCH_SIZE,
        dtype: torch.dtype | None = None,
        linear_epochs: int = 30,
        linear_lr: float = 3e-3,
        seed: int = 0,
    ):
        self.data = data
        self.layer = layer
        self.timestep = timestep
        self.batch_size = batch_size
        self.dtype = dtype
        self.linear_epochs = linear_epochs
        self.linear_lr = linear_lr
        self.seed = seed

    def check(self, denoiser: Denoiser, scheduler: SchedulerMixin) -> None:
        """Raises ``ValueError`` now (before training) if the layer, timestep or images do not fit."""
        backbone = DDAEBackbone(denoiser, scheduler)
        backbone.check_layers([self.layer])
        backbone.check_timesteps([self.timestep])
        backbone.check_images(self.data.train_images[:1])

    def features(self, backbone: DDAEBackbone, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) images -> (N, D) float32 pooled features on the backbone's device, ``batch_size`` at a
        time."""
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(backbone.device)
            out = backbone.features(
                batch, [self.layer], [self.timestep], seed=self.seed,
                example_ids=ids[start : start + self.batch_size], dtype=self.dtype,
            )
            chunks.append(out[self.layer, self.timestep])
        return torch.cat(chunks)

    def evaluate(self, denoiser: Denoiser, scheduler: SchedulerMixin) -> dict[str, float]:
        """``{"knn_acc": float, "linear_acc": float}`` (accuracies in [0, 1]; no ``linear_acc`` when
        ``linear_epochs`` is 0) for the denoiser's current weights. Leaves its train/eval mode as found."""
        was_training = denoiser.training
        denoiser.eval()
        try:
            backbone = DDAEBackbone(denoiser, scheduler)
            train_x = self.features(backbone, self.data.train_images, self.data.train_ids)
            eval_x = self.features(backbone, self.data.eval_images, self.data.eval_ids)
        finally:
            denoiser.train(was_training)
        train_y, eval_y = self.data.train_labels, self.data.eval_labels
        metrics = {"knn_acc": knn_accuracy(train_x, train_y, eval_x, eval_y)}
        if self.linear_epochs > 0:
            metrics["linear_acc"] = linear_probe_accuracy(
                train_x, train_y, eval_x, eval_y, epochs=self.linear_epochs, lr=self.linear_lr, seed=self.seed
            )
        return metrics


class ProbeHistory(StepHistory):
    """Every probe result of a run and the best one; checkpointed with ``accelerator.register_for_checkpointing``.

    The best is chosen by ``linear_acc`` when present, else ``knn_acc``; ties keep the earlier step.
    """

    @staticmethod
    def score(record: dict) -> tuple[str, float]:
        metric = "linear_acc" if record.get("linear_acc") is not None else "knn_acc"
        return metric, float(record[metric])

    def add(self, step: int, images_seen: int, metrics: dict[str, float]) -> bool:
        """Records one result; returns True if it is the new best."""
        record = {"step": int(step), "images_seen": int(images_seen), **{k: float(v) for k, v in metrics.items()}}
        return self.record(record, *self.score(record))
