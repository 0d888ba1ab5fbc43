"""Noise-conditional classification: a head told the noise level, trained over all levels on frozen DDAE features.

The head (``head_type="noise_conditional"`` of :class:`~ddae_diffusers.DDAEConfig`) adds a sinusoidal embedding of
the level, through a two-layer MLP, to a hidden layer over the pooled feature. Training draws levels as pretraining
does (DDPM: uniform over all timesteps; EDM: EDM's log-normal sigmas, clipped to the scheduler's range), computes the
frozen denoiser's features of each (image, level) pair once, and fits the head on them. The result is a
``DDAEForImageClassification`` whose ``forward(..., timestep=...)`` classifies images at any level, and which
guides ``DDAEPipeline`` sampling toward a class.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .capture import example_noise
from .errors import UsageError
from .modeling_ddae import DDAEForImageClassification
from .noise import DDPMNoise, EDMNoise, NoiseLevel
from .probing.stats import wilson_interval

DDPM_EVAL_LEVELS = tuple(range(0, 1000, 50))  # 20 levels: the DDAE paper's t = 1, 51, ..., 951 in diffusers indices
DEFAULT_HIDDEN_DIM = 512


def noise_conditional_classifier(
    model_or_path,
    layer: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    timestep: NoiseLevel | None = None,
    head_hidden_dim: int = DEFAULT_HIDDEN_DIM,
    **config_kwargs,
) -> DDAEForImageClassification:
    """A ``DDAEForImageClassification`` with an untrained noise-conditional head on ``layer`` of a DDPM or EDM
    denoiser (what ``from_diffusers`` takes). ``timestep`` is the level ``forward`` uses when given none (default:
    the probe level); the head normalises features with LayerNorm unless ``head_norm`` says otherwise."""
    config_kwargs.setdefault("head_norm", "layernorm")
    return DDAEForImageClassification.from_diffusers(
        model_or_path,
        layer,
        timestep,
        num_labels=num_labels,
        id2label=id2label,
        head_type="noise_conditional",
        head_hidden_dim=head_hidden_dim,
        **config_kwargs,
    )


def check_noise_conditional(model: object, use: str) -> DDAEForImageClassification:
    """``model`` if it is a ``DDAEForImageClassification`` with a noise-conditional head; a ``UsageError`` naming
    how to build one otherwise (``use`` says what needed it)."""
    if not isinstance(model, DDAEForImageClassification) or model.noise_conditioning is None:
        kind = "a linear-head classifier" if isinstance(model, DDAEForImageClassification) else type(model).__name__
        raise UsageError(
            f"{use} needs a noise-conditional DDAE classifier, got {kind}: train one with "
            "training/train_noise_conditional.py (or noise_conditional_classifier + train_noise_conditional_head)."
        )
    return model


def draw_levels(model: DDAEForImageClassification, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) training levels in the model's units, as pretraining draws them (EDM: clipped to its range)."""
    axis = model.noise_axis
    levels = axis.draw_training_levels(count, torch.device("cpu"), generator=generator)
    if isinstance(axis, EDMNoise):
        low, high = axis.sigma_range
        levels = levels.clamp(low, high)
    return levels


@torch.no_grad()
def noisy_features(
    model: DDAEForImageClassification,
    pixel_values: torch.Tensor,
    levels: torch.Tensor,
    seed: int = 0,
    batch_size: int = 256,
    example_ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) float32 of ``pixel_values`` (N, 3, H, W) in [-1, 1] noised at ``levels`` (N,), and
    the (N,) timesteps the denoiser was given; row i's noise is drawn from ``(seed, example_ids[i])`` (default:
    its row number). On the CPU, whatever the model's device."""
    if pixel_values.shape[0] != levels.shape[0]:
        raise UsageError(f"Got {pixel_values.shape[0]} images but {levels.shape[0]} levels: pass one per image.")
    ids = list(range(pixel_values.shape[0])) if example_ids is None else list(example_ids)
    was_training = model.training
    model.eval()
    features, timesteps = [], []
    try:
        for start in range(0, pixel_values.shape[0], batch_size):
            batch = model.check_pixel_values(pixel_values[start : start + batch_size].to(model.device)).float()
            clean = model.encode(batch)
            noise = example_noise(clean.shape[1:], ids[start : start + batch_size], seed).to(clean.device)
            level = model.check_timestep(levels[start : start + batch_size].to(clean.device), batch.shape[0])
            noisy, network_timestep = model.noisy_input(clean, noise, level)
            _, pooled = model.pooled_features(noisy, network_timestep)
            features.append(pooled.float().cpu())
            timesteps.append(network_timestep.cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(timesteps)


@dataclass
class NoiseConditionalFit:
    """How a noise-conditional head was trained: rows (images x levels per image), epochs, the last epoch's mean
    loss and training accuracy."""

    rows: int
    levels_per_image: int
    epochs: int
    learning_rate: float
    final_loss: float
    train_accuracy: float


def train_noise_conditional_head(
    model: DDAEForImageClassification,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    levels_per_image: int = 4,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    feature_batch_size: int = 256,
) -> NoiseConditionalFit:
    """Trains the head of ``model`` (frozen denoiser) on ``pixel_values`` (N, 3, H, W) in [-1, 1] with ``labels``
    (N,): each image at ``levels_per_image`` levels drawn as pretraining draws them, its features computed once;
    AdamW with a cosine schedule, cross-entropy. Leaves the model in eval mode."""
    check_noise_conditional(model, "train_noise_conditional_head")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (pixel_values.shape[0],):
        raise UsageError(f"Got {pixel_values.shape[0]} images but labels of shape {tuple(labels.shape)}.")
    if labels.min() < 0 or labels.max() >= model.config.num_labels:
        raise UsageError(f"labels must be class ids in 0..{model.config.num_labels - 1}: check the label column.")
    for name, value in (("levels_per_image", levels_per_image), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise UsageError(f"learning_rate must be a positive number, got {learning_rate!r}.")

    generator = torch.Generator().manual_seed(seed)
    rows = pixel_values.shape[0] * levels_per_image
    image_index = torch.arange(pixel_values.shape[0]).repeat_interleave(levels_per_image)
    levels = draw_levels(model, rows, generator)
    features, timesteps = noisy_features(
        model, pixel_values[image_index], levels, seed, feature_batch_size, example_ids=range(rows)
    )
    targets = labels[image_index]

    model.requires_grad_(False)
    head = [model.feature_norm, model.noise_conditioning, model.classifier]
    parameters = [p for module in head for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * math.ceil(rows / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    device, dtype = model.classifier.weight.device, model.classifier.weight.dtype
    model.eval()
    for module in head:
        module.train()
    loss_sum = correct = 0.0
    for _ in range(epochs):
        order = torch.randperm(rows, generator=generator)
        loss_sum = correct = 0.0
        for start in range(0, rows, batch_size):
            index = order[start : start + batch_size]
            x = features[index].to(device, dtype)
            y = targets[index].to(device)
            logits = model.head(x, timesteps[index].to(device))
            loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * index.numel()
            correct += float((logits.argmax(-1) == y).sum())
    model.eval()
    if not math.isfinite(loss_sum):
        raise UsageError(f"Training the head diverged (loss {loss_sum}): lower learning_rate (got {learning_rate}).")
    return NoiseConditionalFit(rows, levels_per_image, epochs, learning_rate, loss_sum / rows, correct / rows)


@torch.no_grad()
def accuracy_by_level(
    model: DDAEForImageClassification,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    levels: Sequence[NoiseLevel] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> list[dict]:
    """Test accuracy of ``model`` on ``pixel_values`` (N, 3, H, W) with ``labels`` (N,) at each noise level
    (default: the 20 DDPM levels 0, 50, ..., 950, or the 18 EDM sampling sigmas), the noise of image i drawn from
    ``(seed, i)`` at every level. -> ``[{"level", "ve_sigma", "accuracy", "ci95", "correct"}]``."""
    axis = model.noise_axis
    if levels is None:
        if isinstance(axis, DDPMNoise):
            levels = [t for t in DDPM_EVAL_LEVELS if t < axis.num_train_timesteps]
        else:
            levels = [axis.sigma_at_index(i) for i in range(1, 19)]
    levels = axis.check_levels(levels)
    labels = torch.as_tensor(labels, dtype=torch.long)
    rows = []
    for level in levels:
        per_image = torch.full((pixel_values.shape[0],), level)
        features, timesteps = noisy_features(model, pixel_values, per_image, seed, batch_size)
        predictions = []
        for start in range(0, features.shape[0], batch_size):
            device = model.classifier.weight.device
            x = features[start : start + batch_size].to(device, model.classifier.weight.dtype)
            predictions.append(model.head(x, timesteps[start : start + batch_size].to(device)).argmax(-1).cpu())
        correct = torch.cat(predictions) == labels
        hits = int(correct.sum())
        rows.append(
            {
                "level": level,
                "ve_sigma": axis.ve_sigma(level),
                "accuracy": hits / len(correct),
                "ci95": list(wilson_interval(hits, len(correct))),
                "correct": correct.numpy().astype(np.bool_),
            }
        )
    return rows


def plot_accuracy_by_level(curves: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against the variance-exploding sigma of each level (log axis), one line with its 95% band per
    ``curves`` entry (label -> rows of :func:`accuracy_by_level`), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io_utils import atomic_path

    figure, axes = plt.subplots(figsize=(6, 3.6))
    for label, rows in curves.items():
        sigma = [max(row["ve_sigma"], 1e-3) for row in rows]
        accuracy = [100 * row["accuracy"] for row in rows]
        axes.plot(sigma, accuracy, marker="o", markersize=3, label=label)
        axes.fill_between(sigma, [100 * r["ci95"][0] for r in rows], [100 * r["ci95"][1] for r in rows], alpha=0.2)
    axes.set_xscale("log")
    axes.set_xlabel("noise level (variance-exploding sigma)")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
