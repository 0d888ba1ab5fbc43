"""Hub model cards (README.md): YAML metadata, ``model-index`` accuracy, how a model was made.

Every card of the project is built here: classifiers, pretrained DDAEs and ``DDAEPipeline`` folders.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .loading import is_hub_id
from .noise import EDM_SAMPLING_STEPS, NoiseLevel, noise_axis
from .probing.knn import KNN_K
from .probing.stats import format_interval, wilson_interval

PAPER_URL = "https://arxiv.org/abs/2303.09769"
HEATMAP_FILE = "probe_grid.png"
DDPM_SAMPLING_STEPS = 50  # what a card suggests for sampling a DDPM (DDIM-like budgets), not the scheduler's default

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
    knn_accuracy: float | None = None,
    library_name: str = "transformers",
    pipeline_tag: str = "image-classification",
    tags: list[str] | None = None,
    license: str = "apache-2.0",
    extra: str = "",
) -> ModelCard:
    """A card with Hub YAML (library, pipeline tag, tags incl. ddae/diffusers, datasets, base_model, license,
    ``model-index`` when ``accuracy`` is given, with ``knn_accuracy`` as a second metric) and a body listing
    ``details`` as a table.

    Local paths are kept out of ``base_model``/``datasets`` (the Hub only accepts ids) and shown in the body.
    """
    dataset_id = dataset if is_hub_id(dataset) else (os.path.basename(os.path.normpath(dataset)) if dataset else None)
    eval_results = None
    if accuracy is not None and dataset_id:
        where = dict(task_type="image-classification", dataset_type=dataset_id, dataset_name=dataset_id,
                     dataset_split=dataset_split, metric_type="accuracy")
        eval_results = [EvalResult(**where, metric_value=round(float(accuracy), 6), metric_name=metric_name)]
        if knn_accuracy is not None:
            eval_results.append(EvalResult(
                **where, metric_value=round(float(knn_accuracy), 6), metric_name=f"kNN accuracy (k={KNN_K})",
                metric_args={"k": KNN_K},
            ))
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


def _split(name: str | None, size: int | None) -> str | None:
    """``train (50,000 images)``, or the bare split name when its size is unknown."""
    return f"{name} ({size:,} images)" if name and size is not None else name


def _weights_text(parameters: dict[str, int] | None, bytes_per_value: int) -> str | None:
    """``"denoiser (truncated) 1,234,567 + VAE encoder ... = N parameters (X MB)"`` from per-part counts."""
    if not parameters:
        return None
    total = sum(parameters.values())
    parts = " + ".join(f"{name} {count:,}" for name, count in parameters.items() if count)
    return f"{parts} = {total:,} parameters ({total * bytes_per_value / 1e6:.1f} MB)"


def _with_interval(accuracy: float | None, ci: list[float] | None) -> str | None:
    """``"54.32% [53.34, 55.30] (95% Wilson interval)"``, or the accuracy alone (None when there is none)."""
    if accuracy is None:
        return None
    return format_interval(accuracy, ci) + (" (95% Wilson interval)" if ci is not None else "")


def _head_text(config) -> str:
    """The classifier head in words: linear, or noise-conditional (an MLP told the level)."""
    norm = f"{config.head_norm or 'no'} norm"
    if getattr(config, "head_type", "linear") == "noise_conditional":
        hidden = config.head_hidden_dim or config.feature_dim
        return (
            f"{norm}, noise-conditional MLP ({hidden}-d hidden layer plus an MLP of a "
            f"{config.time_embedding_dim}-d sinusoidal embedding of the level), dropout {config.classifier_dropout}, "
            f"linear -> {config.num_labels} classes; `forward(..., timestep=...)` classifies at any level"
        )
    return f"{norm}, dropout {config.classifier_dropout}, linear -> {config.num_labels} classes"


def classifier_model_card(
    config,
    save_directory: str | None = None,
    tags: list[str] | None = None,
    parameters: dict[str, int] | None = None,
    bytes_per_value: int = 4,
) -> ModelCard:
    """The card of a ``DDAEForImageClassification`` from its ``DDAEConfig`` (``base_model`` and
    ``training_summary``); writes the probe heatmap next to it when the model came from a probe grid.
    The model is named by ``training_summary["model_name"]``, else by the folder it is saved to.
    ``parameters`` counts the saved weights per part (``{"denoiser (truncated)": n, "VAE encoder": m, ...}``)."""
    summary = dict(config.training_summary or {})
    folder_name = os.path.basename(os.path.normpath(save_directory)) if save_directory else None
    name = summary.get("model_name") or folder_name or f"ddae-{config.backbone_class.lower()}-classifier"
    dataset = summary.get("dataset")
    accuracy = summary.get("accuracy")
    axis = noise_axis(config.noise_scheduler())
    level = config.timestep
    vae = getattr(config, "vae_config", None)
    details = {
        "backbone": f"diffusers `{config.backbone_class}` from `{config.base_model or 'unknown'}`",
        "latents": (
            f"`AutoencoderKL` encoder ({'frozen' if config.freeze_vae else 'trained'}; decoder dropped), "
            f"{vae.get('latent_channels')} channels, scaling factor {vae.get('scaling_factor')}"
            + (f", shift {vae['shift_factor']}" if vae.get("shift_factor") is not None else "")
        ) if vae else None,
        "weights": _weights_text(parameters, bytes_per_value),
        "feature layer": f"`{config.feature_layer}` ({config.feature_dim}-d, {config.pooling} pooling)",
        "noise level": axis.level_text(level),
        "noise": (
            f"fixed in eval: the image at batch position i gets the noise drawn from (seed {config.noise_seed}, i)"
            if config.noise_policy == "fixed" else config.noise_policy
        ),
        "head": _head_text(config),
        "image size": f"{config.image_size}x{config.image_size}, scaled to [-1, 1]",
        "protocol": summary.get("protocol"),
        "data": dataset,
        "train split": _split(summary.get("train_split"), summary.get("num_train")),
        "eval split": _split(summary.get("eval_split"), summary.get("num_eval")),
        "epochs": summary.get("epochs"),
        "optimisation": summary.get("optimisation"),
        "training time": format_duration(summary["train_runtime_s"]) if summary.get("train_runtime_s") else None,
        "accuracy": _with_interval(accuracy, summary.get("accuracy_ci95")),
        "kNN accuracy": _with_interval(summary.get("knn_accuracy"), summary.get("knn_accuracy_ci95")),
        "accuracy by noise level": ", ".join(
            f"{axis.unit}={lvl}: {100 * acc:.2f}%" for lvl, acc in (summary.get("accuracy_by_level") or {}).items()
        ) or None,
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
        extra = f"\n## Probe grid\n\n| layer | {axis.unit} | linear % | kNN % |\n|---|---|---|---|\n" + table + "\n"
        if summary.get("results_file"):
            name = summary["results_file"]
            extra += f"\nEvery setting and number of the probe run: [`{name}`]({name}).\n"
        heatmap_path = os.path.join(save_directory, HEATMAP_FILE) if save_directory is not None else None
        from .probing.heatmap import grid_heatmap

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
        title=f"DDAE image classifier: {config.backbone_class} `{config.feature_layer}` at {axis.label(level)}",
        description=(
            "A diffusion denoiser used as an image classifier (Denoising Diffusion Autoencoder): the image is "
            "noised a little (a small timestep or sigma), the denoiser runs up to the feature layer (everything "
            "after it is dropped), the activation is average-pooled and "
            + (
                "a head told the noise level classifies it, at any level.\n\n"
                if getattr(config, "head_type", "linear") == "noise_conditional"
                else "a linear head classifies it.\n\n"
            )
            + "The `.py` files beside the weights are generated: `save_pretrained` copies the ddae-diffusers "
            "modules the model needs (configuration, modeling, image processing, capture core, families, noise "
            "axis, errors) so that `trust_remote_code=True` loads it without the package. Edit the library, not them."
        ),
        details=details,
        usage=usage,
        base_model=config.base_model,
        dataset=dataset,
        dataset_split=summary.get("eval_split"),
        accuracy=accuracy,
        metric_name=f"Top-1 accuracy, {summary.get('protocol', 'classifier')}",
        knn_accuracy=summary.get("knn_accuracy"),
        tags=tags,
        license=summary.get("license", "apache-2.0"),
        extra=extra,
    )


_PRETRAINING_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A denoising diffusion autoencoder (DDAE) pretrained with
ddae-diffusers' `training/train_unconditional.py`: an unconditional
`{{ model_class }}` ({{ num_params }} parameters) trained {{ objective_text }} on {{ dataset }}. Its
intermediate activations on slightly noised images are linearly separable features
(Xiang et al., ICCV 2023, [arXiv 2303.09769](https://arxiv.org/abs/2303.09769)). The saved weights are
{{ weights }}.

## Use

```python
from ddae_diffusers import DDAEBackbone

backbone = DDAEBackbone.from_pretrained("{{ repo_or_path }}")
feats = backbone.features(pixel_values, layers=["{{ probe_layer }}"], timesteps=[{{ probe_timestep }}])
```
{% if is_unet and objective == "ddpm" %}
or sample with diffusers: `DDPMPipeline.from_pretrained("{{ repo_or_path }}")().images`.
{% else %}
or sample: `DDAEPipeline.from_pretrained("{{ repo_or_path }}")(num_inference_steps={{ sample_steps }}).images`.
{% endif %}
## Training

| | |
|---|---|
| command | `{{ command }}` |
| optimiser steps | {{ steps }} |
| images seen | {{ images_seen }} |
| wall time | {{ wall_time }} |
| batch size (total) | {{ total_batch_size }} |
| objective | {{ objective_name }} |
| mixed precision | {{ mixed_precision }} |

## Probe history

kNN (k={{ knn_k }}, cosine) and linear-probe top-1 accuracy on fixed labelled subsets
({{ probe_description }}), features of `{{ probe_layer }}` at {{ probe_level_text }}, {{ weights }}{{ interval_note }}.
{% if fd_name %}{{ fd_name }}: Frechet distance of {{ generation_description }} (lower is better).
{% endif %}{% if history %}
| step | images seen | kNN accuracy | linear-probe accuracy |{{ fd_header }}
|---:|---:|---:|---:|{{ fd_rule }}
{% for row in history %}{{ row.line }}
{% endfor %}
{% if best %}Best: step {{ best.step }} ({{ best.metric }} {{ best.value_str }}), saved in `best-probe/`.{% endif %}
{% if fd_best %}{{ fd_best }}{% endif %}
{% else %}
No probe was run.
{% endif %}"""


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1h 02m 05s"``, ``95`` -> ``"1m 35s"``, ``0.24`` -> ``"0.2 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def sampling_steps(objective: str) -> int:
    """The sampling steps a card's usage suggests: EDM's schedule length, else ``DDPM_SAMPLING_STEPS``."""
    return EDM_SAMPLING_STEPS if objective == "edm" else DDPM_SAMPLING_STEPS


@dataclass
class PretrainingSummary:
    """What a pretraining run reports, built once from the run's state: its card reads it, and so does anything
    else that reports the run (``dataclasses.asdict`` gives it as plain data, ``PretrainingSummary(**data)`` back)."""

    model_name: str
    model_class: str  # the denoiser's diffusers class, e.g. UNet2DModel
    num_params: int
    dataset: str  # the --dataset_name or --train_data_dir
    hub_dataset: str | None  # the data set's Hub id, for the card's metadata
    command: str
    steps: int
    images_seen: int
    wall_time_s: float
    total_batch_size: int
    mixed_precision: str
    objective: str  # "ddpm" or "edm"
    probe_layer: str
    probe_timestep: NoiseLevel
    probe_level_text: str  # the probe's noise level in words, from the noise axis
    probe_description: str  # the probe monitor's labelled subsets
    history: list[dict]  # the probe monitor's records: step, images_seen, knn_acc, linear_acc
    best: dict | None  # the best probe: step, metric, value
    use_ema: bool
    repo_or_path: str
    probe_eval_images: int | None = None  # the monitor's test images: each accuracy's 95% Wilson interval
    # the generation-score monitor (--fid_every_n_steps): records step, images_seen, fd, kid_mean, kid_std, metric
    generation_history: list[dict] = field(default_factory=list)
    generation_best: dict | None = None  # the lowest distance: step, metric, value
    generation_metric: str | None = None  # "FID", or "FD_<feature network>"
    generation_description: str | None = None  # samples, sampler, reference set and feature network in words


def _history_rows(summary: PretrainingSummary, fmt) -> list[dict]:
    """One row per step that has a probe or a generation score (or both), in step order, with formatted cells."""
    by_step: dict[int, dict] = {}
    for record in summary.history:
        by_step.setdefault(record["step"], {"step": record["step"], "images_seen": record["images_seen"]}).update(
            knn_acc_str=fmt(record.get("knn_acc")), linear_acc_str=fmt(record.get("linear_acc"))
        )
    for record in summary.generation_history:
        row = by_step.setdefault(record["step"], {"step": record["step"], "images_seen": record["images_seen"]})
        row["fd_str"] = f"{record['fd']:.4g}"
    rows = [{"knn_acc_str": "-", "linear_acc_str": "-", "fd_str": "-", **by_step[step]} for step in sorted(by_step)]
    for row in rows:
        cells = [row["step"], row["images_seen"], row["knn_acc_str"], row["linear_acc_str"]]
        cells += [row["fd_str"]] if summary.generation_history else []
        row["line"] = "| " + " | ".join(map(str, cells)) + " |"
    return rows


def pretraining_model_card(summary: PretrainingSummary) -> ModelCard:
    """A huggingface_hub ``ModelCard`` (library ``diffusers``) for a pretrained DDAE (DDPM or EDM objective)."""
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["ddae", "diffusers", "unconditional-image-generation", "self-supervised-learning"],
        pipeline_tag="unconditional-image-generation",
        datasets=[summary.hub_dataset] if summary.hub_dataset else None,
    )
    def fmt(value: float | None) -> str:
        if value is None:
            return "-"
        n = summary.probe_eval_images
        if not n:
            return f"{value:.4f}"
        low, high = wilson_interval(round(value * n), n)
        return f"{value:.4f} [{low:.4f}, {high:.4f}]"

    rows = _history_rows(summary, fmt)
    best = {**summary.best, "value_str": fmt(summary.best["value"])} if summary.best else None
    fd_best = summary.generation_best
    fd_name = summary.generation_metric if summary.generation_history else None
    edm = summary.objective == "edm"
    return ModelCard.from_template(
        card_data,
        template_str=_PRETRAINING_TEMPLATE,
        **{**asdict(summary), "num_params": f"{summary.num_params / 1e6:.1f}M", "history": rows, "best": best,
           "fd_best": f"Lowest {fd_best['metric']}: step {fd_best['step']} ({fd_best['value']:.4g}), saved in "
           "`best-fid/`." if fd_best else None,
           "fd_name": fd_name, "fd_header": f" {fd_name} |" if fd_name else "", "fd_rule": "---:|" if fd_name else ""},
        wall_time=format_duration(summary.wall_time_s),
        weights="the EMA weights" if summary.use_ema else "the trained weights (no EMA)",
        is_unet=summary.model_class == "UNet2DModel",
        objective_text="with EDM's objective (Karras et al. 2022)" if edm else "as a DDPM",
        objective_name="EDM (Karras et al. 2022): preconditioning, log-normal sigmas, loss weighting"
        if edm else "DDPM (discrete timesteps)",
        sample_steps=sampling_steps(summary.objective),
        knn_k=KNN_K,
        interval_note=f"; in brackets, each accuracy's 95% Wilson interval over the {summary.probe_eval_images} test "
        "images" if summary.probe_eval_images else "",
    )


_PIPELINE_DESCRIPTION = (
    "A diffusers pipeline of ddae-diffusers: an unconditional diffusion denoiser that generates images and, "
    "fed a slightly noised image, gives linearly separable features from its intermediate blocks (Denoising "
    "Diffusion Autoencoders)."
)
_PIPELINE_USAGE = """
import torch
from ddae_diffusers import DDAEPipeline

pipe = DDAEPipeline.from_pretrained("{repo}")
images = pipe(batch_size=4, num_inference_steps={steps}, generator=torch.manual_seed(0)).images
features = pipe.extract_features(images, layers=["{layer}"], timesteps=[{level}])  # {{(layer, level): (4, C)}}
"""


def _noise_text(axis) -> str:
    """How a card states the noise levels of a model: DDPM timesteps or the EDM sigma range."""
    if axis.objective == "edm":
        low, high = axis.sigma_range
        return f"EDM noise levels: sigma in [{low:g}, {high:g}], sigma_data {axis.scheduler.config.sigma_data:g}"
    return f"DDPM noise levels: {axis.num_train_timesteps} training timesteps"


def pipeline_model_card(pipe, repo_id: str | None = None) -> ModelCard:
    """The card of a ``DDAEPipeline`` (YAML metadata, components, usage; the classifier's accuracy if any)."""
    denoiser, backbone = pipe.denoiser, pipe.backbone
    names = backbone.layer_names()
    details = {
        "denoiser": f"`{type(denoiser).__name__}`, {sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f}M "
        f"parameters, {backbone.image_size or 'any'}px images, {len(names)} capturable blocks",
        "scheduler": f"`{type(pipe.scheduler).__name__}`, {_noise_text(backbone.noise_axis)}",
    }
    if pipe.vae is not None:
        details["vae"] = f"`AutoencoderKL`, scaling factor {pipe.vae.config.scaling_factor}"
    summary, accuracy = {}, None
    if pipe.classifier is not None:
        config = pipe.classifier.config
        summary = dict(config.training_summary or {})
        accuracy = summary.get("accuracy")
        labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
        details["classifier"] = (
            f"`DDAEForImageClassification` on `{config.feature_layer}` at "
            f"{backbone.noise_axis.label(config.timestep)}, "
            f"{len(labels)} labels ({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})"
        )
    layer = pipe.classifier.config.feature_layer if pipe.classifier is not None else backbone.default_layer()
    axis = backbone.noise_axis
    level = pipe.classifier.config.timestep if pipe.classifier is not None else axis.default_probe_level()
    usage = _PIPELINE_USAGE.format(repo=repo_id or "path/to/this/folder", layer=layer, level=level,
                                   steps=sampling_steps(backbone.objective))
    if pipe.classifier is not None:
        usage += 'pipe.classify(images).labels  # ["...", ...]\n'
    return make_model_card(
        model_name=(repo_id or "ddae-pipeline").split("/")[-1],
        title=f"DDAE pipeline: {type(denoiser).__name__}" + (" + classifier" if pipe.classifier else ""),
        description=_PIPELINE_DESCRIPTION,
        details=details,
        usage=usage,
        base_model=pipe.config.get("_name_or_path"),
        dataset=summary.get("dataset"),
        dataset_split=summary.get("eval_split"),
        accuracy=accuracy,
        library_name="diffusers",
        pipeline_tag="image-classification" if pipe.classifier is not None else "unconditional-image-generation",
        tags=["image-feature-extraction", "unconditional-image-generation", type(denoiser).__name__],
    )


__all__ = [
    "PretrainingSummary", "classifier_model_card", "format_duration", "make_model_card", "pipeline_model_card",
    "pretraining_model_card", "sampling_steps",
]
