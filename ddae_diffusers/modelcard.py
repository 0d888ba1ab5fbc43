"""Hub model cards (README.md) for DDAE classifiers: YAML metadata, ``model-index`` accuracy, how it was made."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .loading import is_hub_id

PAPER_URL = "https://arxiv.org/abs/2303.09769"
HEATMAP_FILE = "probe_grid.png"

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

## How it was made

{{ details }}

## Usage

```python
{{ usage }}
```
{{ extra }}
## Reference

Xiang et al., *Denoising Diffusion Autoencoders are Unified Self-supervised Learners*, ICCV 2023
([arXiv 2303.09769]({{ paper_url }})). Built with ddae-diffusers on diffusers and transformers.
"""


def make_model_card(
    *,
    model_name: str,
    title: str,
    description: str,
    details: dict[str, Any],
    usage: str,
    base_model: str | None = None,
    dataset: str | None = None,
    dataset_split: str | None = None,
    accuracy: float | None = None,
    metric_name: str = "Top-1 accuracy",
    library_name: str = "transformers",
    pipeline_tag: str = "image-classification",
    tags: list[str] | None = None,
    license: str = "apache-2.0",
    extra: str = "",
) -> ModelCard:
    """A card with Hub YAML (library, pipeline tag, tags incl. ddae/diffusers, datasets, base_model, license,
    ``model-index`` when ``accuracy`` is given) and a body listing ``details`` as a table.

    Local paths are kept out of ``base_model``/``datasets`` (the Hub only accepts ids) and shown in the body.
    """
    dataset_id = dataset if is_hub_id(dataset) else (os.path.basename(os.path.normpath(dataset)) if dataset else None)
    eval_results = None
    if accuracy is not None and dataset_id:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                dataset_split=dataset_split,
                metric_type="accuracy",
                metric_value=round(float(accuracy), 6),
                metric_name=metric_name,
            )
        ]
    all_tags = ["ddae", "diffusers", "image-classification", "self-supervised-learning"]
    all_tags += [tag for tag in tags or [] if tag not in all_tags]
    card_data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        tags=all_tags,
        license=license,
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in details.items() if value is not None)
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=title,
        description=description,
        details="| | |\n|---|---|\n" + rows,
        usage=usage.strip(),
        extra=extra,
        paper_url=PAPER_URL,
    )


def grid_heatmap(
    cells: list[dict],
    path: str,
    metric: str = "linear_acc",
    title: str | None = None,
    marked: tuple[str, int] | None = None,
    layers: list[str] | None = None,
) -> bool:
    """Writes a layers x timesteps heatmap of ``metric`` (annotated in %) as a PNG at ``path``.

    ``layers`` fixes the row order (default: first appearance in ``cells``); ``marked`` (layer, t) is
    outlined. Returns False, writing nothing, when no cell has ``metric``.
    """
    cells = [c for c in cells if c.get(metric) is not None]
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = layers or list(dict.fromkeys(c["layer"] for c in cells))
    steps = sorted({int(c["timestep"]) for c in cells})
    grid = np.full((len(layers), len(steps)), np.nan)
    for c in cells:
        grid[layers.index(c["layer"]), steps.index(int(c["timestep"]))] = 100 * c[metric]
    fig, ax = plt.subplots(figsize=(1.1 * len(steps) + 3.5, 0.38 * len(layers) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(steps)), [str(t) for t in steps])
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("timestep (diffusers index; paper t = index + 1)")
    if title:
        ax.set_title(title, fontsize=10)
    middle = np.nanmean(grid)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            color = "black" if value > middle else "white"
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color=color)
    if marked is not None:
        row, col = layers.index(marked[0]), steps.index(int(marked[1]))
        ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    fig.colorbar(image, ax=ax, label=f"{metric} (%)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return True


def _seconds(value: float | None) -> str | None:
    if not value:
        return None
    return f"{value:.0f} s ({value / 60:.0f} min)" if value >= 60 else f"{value:.1f} s"


def _split(name: str | None, size: int | None) -> str | None:
    """``train (50,000 images)``, or the bare split name when its size is unknown."""
    return f"{name} ({size:,} images)" if name and size is not None else name


def classifier_model_card(config, save_directory: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The card of a ``DDAEForImageClassification`` from its ``DDAEConfig`` (``base_model`` and
    ``training_summary``); writes the probe heatmap next to it when the model came from a probe grid.
    The model is named by ``training_summary["model_name"]``, else by the folder it is saved to."""
    summary = dict(config.training_summary or {})
    folder_name = os.path.basename(os.path.normpath(save_directory)) if save_directory else None
    name = summary.get("model_name") or folder_name or f"ddae-{config.backbone_class.lower()}-classifier"
    dataset = summary.get("dataset")
    accuracy = summary.get("accuracy")
    details = {
        "backbone": f"diffusers `{config.backbone_class}` from `{config.base_model or 'unknown'}`",
        "feature layer": f"`{config.feature_layer}` ({config.feature_dim}-d, {config.pooling} pooling)",
        "timestep": f"{config.timestep} (diffusers index; t={config.timestep + 1} in the DDAE paper)",
        "noise": f"{config.noise_policy} (seed {config.noise_seed})",
        "head": f"{config.head_norm or 'no'} norm, dropout {config.classifier_dropout}, linear -> "
        f"{config.num_labels} classes",
        "image size": f"{config.image_size}x{config.image_size}, scaled to [-1, 1]",
        "protocol": summary.get("protocol"),
        "data": dataset,
        "train split": _split(summary.get("train_split"), summary.get("num_train")),
        "eval split": _split(summary.get("eval_split"), summary.get("num_eval")),
        "epochs": summary.get("epochs"),
        "optimisation": summary.get("optimisation"),
        "training time": _seconds(summary.get("train_runtime_s")),
        "accuracy": f"{100 * accuracy:.2f}%" if accuracy is not None else None,
        "kNN accuracy": f"{100 * summary['knn_accuracy']:.2f}%" if summary.get("knn_accuracy") is not None else None,
    }
    extra = ""
    grid = summary.get("grid") or []
    if grid:
        table = "\n".join(
            f"| `{c['layer']}` | {c['timestep']} | "
            + (f"{100 * c['linear_acc']:.2f}" if c.get("linear_acc") is not None else "-")
            + " | "
            + (f"{100 * c['knn_acc']:.2f}" if c.get("knn_acc") is not None else "-")
            + " |"
            for c in grid
        )
        extra = "\n## Probe grid\n\n| layer | t | linear % | kNN % |\n|---|---|---|---|\n" + table + "\n"
        heatmap_path = os.path.join(save_directory, HEATMAP_FILE) if save_directory is not None else None
        if heatmap_path is not None and len(grid) > 1 and grid_heatmap(grid, heatmap_path):
            extra += f"\n![layer x timestep probe accuracy]({HEATMAP_FILE})\n"
    repo = summary.get("hub_model_id") or "<this-repo-or-folder>"
    usage = f"""
from transformers import pipeline

# Hub copy: add trust_remote_code=True when ddae_diffusers is not installed
classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)
classifier("image.png")  # [{{'label': ..., 'score': ...}}, ...]

# or, with ddae_diffusers installed:
import ddae_diffusers  # registers DDAEConfig / DDAEForImageClassification / DDAEImageProcessor
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{repo}")
processor = AutoImageProcessor.from_pretrained("{repo}")
"""
    return make_model_card(
        model_name=name,
        title=f"DDAE image classifier: {config.backbone_class} `{config.feature_layer}` at t={config.timestep}",
        description=(
            "A diffusion denoiser used as an image classifier (Denoising Diffusion Autoencoder): the image is "
            "noised at a small timestep, the denoiser runs up to the feature layer (everything after it is "
            "dropped), the activation is average-pooled and a linear head classifies it."
        ),
        details=details,
        usage=usage,
        base_model=config.base_model,
        dataset=dataset,
        dataset_split=summary.get("eval_split"),
        accuracy=accuracy,
        metric_name=f"Top-1 accuracy, {summary.get('protocol', 'classifier')}",
        tags=tags,
        license=summary.get("license", "apache-2.0"),
        extra=extra,
    )


__all__ = ["classifier_model_card", "grid_heatmap", "make_model_card"]
