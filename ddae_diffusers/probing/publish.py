"""Publishing a probe run: one grid cell as a ``DDAEForImageClassification`` (:func:`classifier_from_probe`), and
that classifier on the Hub, in one commit (:func:`publish_probe`).

The uploaded repository holds the classifier (weights, config, remote code, image processor), a model card
whose ``model-index`` has the cell's test accuracy and kNN accuracy, the grid table and heatmap, and the run's
``results.json``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from huggingface_hub import CommitInfo
from torch import nn

from ..errors import UsageError
from ..noise import NoiseLevel
from .report import load_heads
from .result import HEADS_FILE, RESULTS_FILE, ProbeResult, parse_cell_key

if TYPE_CHECKING:
    from ..modeling_ddae import DDAEForImageClassification


def classifier_from_probe(
    probe_folder: str | os.PathLike,
    layer: str | None = None,
    timestep: NoiseLevel | None = None,
    model_class: type[DDAEForImageClassification] | None = None,
    **config_kwargs,
) -> DDAEForImageClassification:
    """A classifier with a trained probe head from a probe-engine output folder.

    ``results.json`` names the model, the data and the grid cells; ``heads.safetensors`` holds each cell's head
    (weight (C, D), bias (C,) and, for standardised features, mean and var (D,), which become the
    ``BatchNorm1d`` statistics). Without ``layer`` and ``timestep`` the best cell is used; with one or both, the best
    matching cell. The eval noise is the probe's: the test split, in its order and in one batch, gets exactly the
    probe's test predictions. ``model_class`` (default ``DDAEForImageClassification``) builds the model through its
    ``from_diffusers``, which gets ``config_kwargs`` (and ``dtype``).
    """
    if model_class is None:
        from ..modeling_ddae import DDAEForImageClassification as model_class

    probe_folder = os.fspath(probe_folder)
    result = ProbeResult.load(probe_folder)
    cell = result.best_cell(layer, timestep)
    head = load_heads(probe_folder).get((cell.layer, cell.timestep))
    standardize = result.normalization == "standardize"
    if head is None or (standardize and head.mean is None):
        raise UsageError(f"{HEADS_FILE} has no head for {cell.key}: the probe folder is incomplete.")
    model_path = result.model
    local = os.path.join(probe_folder, model_path)
    if not os.path.exists(model_path) and os.path.exists(local):
        model_path = local
    id2label = {int(k): v for k, v in result.id2label.items()} if result.id2label else None
    summary = {
        "protocol": f"linear probe ({result.protocol or 'probe'})",
        "dataset": result.dataset,
        "train_split": result.train_split,
        "eval_split": result.eval_split,
        "num_train": result.num_train + result.num_val if result.num_train is not None else None,
        "num_eval": result.num_eval,
        "resolution": result.resolution,
        "accuracy": cell.linear_acc,
        "accuracy_ci95": cell.linear_ci95,
        "knn_accuracy": cell.knn_acc,
        "knn_accuracy_ci95": cell.knn_ci95,
        "grid": [
            {"layer": c.layer, "timestep": c.timestep, "linear_acc": c.linear_acc, "knn_acc": c.knn_acc}
            for c in result.cells
        ],
    }
    config_kwargs.setdefault("head_norm", "batchnorm" if standardize else None)
    config_kwargs.setdefault("noise_seed", result.eval_noise_seed)  # the probe's test noise, in split order
    model = model_class.from_diffusers(
        model_path,
        layer=cell.layer,
        timestep=cell.timestep,
        num_labels=int(result.num_labels),
        id2label=id2label,
        base_model=result.model,
        training_summary=summary,
        **config_kwargs,
    )
    resolution = result.resolution
    if resolution is not None and model.config.image_size is not None and resolution != model.config.image_size:
        raise UsageError(
            f"The probe ran at resolution {resolution} but the model takes {model.config.image_size}x"
            f"{model.config.image_size} images."
        )
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
        if standardize:
            if not isinstance(model.feature_norm, nn.BatchNorm1d):
                raise UsageError("A standardised probe head needs head_norm='batchnorm'.")
            model.feature_norm.running_mean.copy_(head.mean)
            model.feature_norm.running_var.copy_(head.var)
    return model


def parse_push_cell(text: str | None) -> tuple[str | None, NoiseLevel | None]:
    """``"up_blocks.0.resnets.1@10"`` -> (layer, level); None -> (None, None), the best cell."""
    if text is None:
        return None, None
    if "@" not in text:
        raise UsageError(f"--push_cell {text!r} is not LAYER@LEVEL: e.g. --push_cell up_blocks.1.resnets.2@10.")
    try:
        return parse_cell_key(text)
    except ValueError as error:
        raise UsageError(f"--push_cell {text!r}: {error}") from None


def check_cell_in_grid(text: str | None, layers: list[str], levels: list[NoiseLevel]) -> None:
    """Refuses a ``--push_cell`` that the grid will not contain, before any feature is computed."""
    layer, level = parse_push_cell(text)
    if layer is not None and layer not in layers:
        raise UsageError(f"--push_cell layer {layer!r} is not in the grid's layers {layers}: add it to --layers.")
    if level is not None and not any(float(level) == float(other) for other in levels):
        raise UsageError(f"--push_cell level {level} is not in the grid's noise levels {levels}: add it to them.")


def publish_probe(
    probe_folder: str | os.PathLike,
    repo_id: str,
    *,
    cell: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Pushes the best cell of the probe in ``probe_folder`` (or ``cell``, ``"LAYER@LEVEL"``) to ``repo_id``
    as a classifier with its card and the run's ``results.json``, in one commit."""
    layer, level = parse_push_cell(cell)
    model = classifier_from_probe(probe_folder, layer=layer, timestep=level)
    summary = model.config.training_summary or {}
    model.config.training_summary = {
        **(model.config.training_summary or {}),
        "model_name": repo_id.split("/")[-1],
        "hub_model_id": repo_id,
        "results_file": RESULTS_FILE,
    }
    chosen = "chosen with --push_cell" if cell else "the best cell on validation"
    return model.push_to_hub(
        repo_id,
        token=token,
        private=private,
        tags=tags,
        commit_message=f"Probe of {model.config.base_model}: {model.config.feature_layer}@{model.config.timestep}",
        commit_description=f"ddae-probe grid on {summary.get('dataset')}; {chosen}.",
        extra_files=[os.path.join(os.fspath(probe_folder), RESULTS_FILE)],
    )


__all__ = ["classifier_from_probe", "publish_probe", "check_cell_in_grid", "parse_push_cell"]
