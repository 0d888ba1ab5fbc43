"""DDAE classifier configuration (transformers ``PreTrainedConfig``)."""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import SchedulerMixin
from transformers import PreTrainedConfig

from .errors import UsageError
from .families import UNCONDITIONAL
from .noise import NoiseLevel, noise_axis

BACKBONE_CLASSES = UNCONDITIONAL  # "UNet2DModel", "DiTTransformer2DModel"
NOISE_POLICIES = ("fixed", "random", "none")
OBJECTIVES = ("ddpm", "edm")
HEAD_NORMS = ("batchnorm", "layernorm", None)
HEAD_TYPES = ("linear", "noise_conditional")
VAE_CLASSES = ("AutoencoderKL",)
POOLINGS = ("avg",)
# The legacy config layout gives the scheduler as flattened fields, per objective; they load as that scheduler.
LEGACY_SCHEDULER_FIELDS = {
    "ddpm": ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"),
    "edm": ("sigma_min", "sigma_max", "sigma_data"),
}
LEGACY_SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "edm": "EDMEulerScheduler"}
LEGACY_FIELDS = ("objective", *LEGACY_SCHEDULER_FIELDS["ddpm"], *LEGACY_SCHEDULER_FIELDS["edm"])


def _plain(value: Any) -> Any:
    """A scheduler config value as JSON: arrays and tensors (``trained_betas``) and tuples become lists."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def scheduler_config_of(scheduler: SchedulerMixin) -> dict[str, Any]:
    """``scheduler`` as a ``scheduler_config``: ``{"_class_name": ..., **its arguments}``, JSON-ready."""
    arguments = {key: _plain(value) for key, value in scheduler.config.items() if not key.startswith("_")}
    return {"_class_name": type(scheduler).__name__, **arguments}


def legacy_scheduler_config(fields: dict[str, Any]) -> dict[str, Any]:
    """The ``scheduler_config`` of the flattened fields of an older config: ``objective`` (default ``"ddpm"``)
    picks ``DDPMScheduler`` (its betas) or ``EDMEulerScheduler`` (its sigma range and ``sigma_data``); the fields
    of the other objective are ignored, missing ones take the scheduler's defaults (those the old fields had)."""
    objective = fields.get("objective", "ddpm")
    if objective not in OBJECTIVES:
        raise UsageError(f"objective {objective!r} is not one of {OBJECTIVES}.")
    kept = {key: fields[key] for key in LEGACY_SCHEDULER_FIELDS[objective] if key in fields}
    return {"_class_name": LEGACY_SCHEDULER_CLASSES[objective], **kept}


def build_noise_scheduler(scheduler_config: dict[str, Any] | None) -> SchedulerMixin:
    """The diffusers scheduler a ``scheduler_config`` names (None: ``DDPMScheduler()``), on the CPU; a clear error
    unless it noises with DDPM betas or EDM preconditioning."""
    config = dict(scheduler_config) if scheduler_config is not None else {"_class_name": "DDPMScheduler"}
    name = config.get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise UsageError(
            f"scheduler_config names {name!r}, not a diffusers scheduler: give its _class_name, e.g. "
            "{'_class_name': 'DDPMScheduler', 'beta_schedule': 'linear'}."
        )
    with torch.device("cpu"):  # a scheduler holds plain tensors: not on the meta device of from_pretrained
        scheduler = scheduler_class.from_config(config)
    objective = noise_axis(scheduler).objective
    if objective not in OBJECTIVES:
        raise UsageError(
            "DDAEForImageClassification supports DDPM and EDM noise; this model is noised by "
            f"{type(scheduler).__name__} ({objective}): use DDAEBackbone.features for it."
        )
    return scheduler


class DDAEConfig(PreTrainedConfig):
    r"""Configuration of a [`DDAEForImageClassification`]: a diffusers denoiser truncated after one block,
    fed a slightly noised image, whose pooled activation goes through an optional norm and a linear head.

    Args:
        backbone_class (`str`, *optional*, defaults to `"UNet2DModel"`):
            The diffusers denoiser class: `"UNet2DModel"` or `"DiTTransformer2DModel"` (pixel space only).
        backbone_config (`dict`, *optional*):
            The denoiser's diffusers config (what `UNet2DModel.from_config` takes). Required to build a model.
        vae_config (`dict`, *optional*):
            Latent denoisers only: the diffusers config of the `AutoencoderKL` whose encoder maps `pixel_values`
            to the denoiser's latents (`(latent_dist.mean - shift_factor) * scaling_factor`). Its encoder weights
            are part of the model; its decoder is dropped.
        freeze_vae (`bool`, *optional*, defaults to `True`):
            Keep the VAE encoder's weights fixed (no gradients) when the model is trained.
        feature_layer (`str`, *optional*):
            The block whose output is the feature, as a diffusers module path (`"up_blocks.1.resnets.2"`,
            `"mid_block"`, `"transformer_blocks.6"`). Every module after it is dropped from the model.
        timestep (`int` or `float`, *optional*, defaults to 10):
            The noise level of the input in the model's units: for a DDPM scheduler a diffusers timestep index
            `0 .. num_train_timesteps - 1` (the DDAE paper's t=11 is t=10); for an EDM scheduler a sigma (a
            float in `[sigma_min, sigma_max]`, e.g. 0.06).
        scheduler_config (`dict`, *optional*):
            The diffusers config of the scheduler that noises the input, with its `_class_name` (what
            `DDPMScheduler.from_config` takes): a `DDPMScheduler` (`add_noise` with its betas) or an EDM scheduler
            such as `EDMEulerScheduler` (`x + sigma * eps`, preconditioned as in training). Defaults to
            `DDPMScheduler()` (1000 steps, linear betas 1e-4 to 0.02). Configs saved with the older flattened
            fields (`objective`, `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`,
            `sigma_min`, `sigma_max`, `sigma_data`) load as the scheduler they describe.
        pooling (`str`, *optional*, defaults to `"avg"`):
            `"avg"`: global average pooling of feature maps, mean over DiT tokens.
        noise_policy (`str`, *optional*, defaults to `"fixed"`):
            `"fixed"`: fresh Gaussian noise in training, and in eval noise drawn from `(noise_seed, position in
            the batch)` so predictions are deterministic; `"random"`: fresh noise always; `"none"`: no noise is
            added (the denoiser still sees `timestep`; an EDM input is still preconditioned).
        noise_seed (`int`, *optional*, defaults to 0):
            Seed of the eval noise of the `"fixed"` policy.
        head_norm (`str`, *optional*, defaults to `"batchnorm"`):
            Normalisation of the pooled feature before the head: `"batchnorm"` (BatchNorm1d without affine
            parameters, as linear probes do), `"layernorm"`, or `None`.
        classifier_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the (normalised) feature before the linear head (the noise-conditional head: before its
            output layer).
        head_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"`: one linear layer on the feature, for the input noised at `timestep`. `"noise_conditional"`:
            a two-layer MLP told the noise level, `out(SiLU(hidden(feature) + time_mlp(embed(level))))`, trained
            over all levels; `forward(..., timestep=...)` then classifies inputs at any level (default: `timestep`).
        head_hidden_dim (`int`, *optional*):
            Width of the noise-conditional head's hidden layer (default: `feature_dim`).
        time_embedding_dim (`int`, *optional*, defaults to 128):
            Width of the sinusoidal embedding of the noise level the noise-conditional head gets (the level as the
            denoiser is given it: a DDPM timestep index, EDM's `c_noise`).
        feature_dim (`int`, *optional*):
            Width of the pooled feature (set by `from_diffusers`).
        image_size (`int`, *optional*):
            Side of the square images the model takes, in pixels.
        pruned_modules (`list[str]`, *optional*):
            Backbone modules that the truncated forward never reaches; they are replaced by parameter-free
            placeholders and not saved. Computed once by `from_diffusers`.
        base_model (`str`, *optional*):
            Where the backbone came from (Hub id or folder), for the model card.
        training_summary (`dict`, *optional*):
            How the model was made (protocol, dataset, splits, epochs, accuracy, probe grid), for the model card.
        kwargs:
            `num_labels`, `id2label`, `label2id`, `problem_type` and the other `PreTrainedConfig` arguments.

    Example:

    ```python
    >>> from ddae_diffusers import DDAEConfig, DDAEForImageClassification
    >>> from ddae_diffusers.presets import PRESETS
    >>> config = DDAEConfig(backbone_config=PRESETS["ddpm-tiny"], feature_layer="up_blocks.0.resnets.1",
    ...                     timestep=10, num_labels=10)
    >>> model = DDAEForImageClassification(config)  # random backbone; use from_diffusers for a pretrained one
    ```
    """

    model_type = "ddae"

    def __init__(
        self,
        backbone_class: str = "UNet2DModel",
        backbone_config: dict[str, Any] | None = None,
        vae_config: dict[str, Any] | None = None,
        freeze_vae: bool = True,
        feature_layer: str | None = None,
        timestep: NoiseLevel = 10,
        scheduler_config: dict[str, Any] | None = None,
        pooling: str = "avg",
        noise_policy: str = "fixed",
        noise_seed: int = 0,
        head_norm: str | None = "batchnorm",
        classifier_dropout: float = 0.0,
        head_type: str = "linear",
        head_hidden_dim: int | None = None,
        time_embedding_dim: int = 128,
        feature_dim: int | None = None,
        image_size: int | None = None,
        pruned_modules: list[str] | None = None,
        base_model: str | None = None,
        training_summary: dict[str, Any] | None = None,
        **kwargs,
    ):
        legacy = {key: kwargs.pop(key) for key in LEGACY_FIELDS if key in kwargs}
        if legacy and scheduler_config is not None:
            raise UsageError(
                f"Got scheduler_config and the flattened scheduler fields {sorted(legacy)}: pass scheduler_config "
                "only (the flattened fields are its older form)."
            )
        if legacy:
            scheduler_config = legacy_scheduler_config(legacy)
        if backbone_config is not None:
            backbone_class = backbone_config.get("_class_name", backbone_class)
            backbone_config = {k: v for k, v in dict(backbone_config).items() if not k.startswith("_")}
        if vae_config is not None:
            vae_class = vae_config.get("_class_name", VAE_CLASSES[0])
            if vae_class not in VAE_CLASSES:
                raise UsageError(f"vae_config is a {vae_class}: DDAE classifiers support {VAE_CLASSES} encoders.")
            vae_config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_")}
        if backbone_class not in BACKBONE_CLASSES:
            raise UsageError(f"backbone_class {backbone_class!r} is not supported: use one of {BACKBONE_CLASSES}.")
        if noise_policy not in NOISE_POLICIES:
            raise UsageError(f"noise_policy {noise_policy!r} is not one of {NOISE_POLICIES}.")
        if head_norm not in HEAD_NORMS:
            raise UsageError(f"head_norm {head_norm!r} is not one of {HEAD_NORMS}.")
        if pooling not in POOLINGS:
            raise UsageError(f"pooling {pooling!r} is not one of {POOLINGS}.")
        if head_type not in HEAD_TYPES:
            raise UsageError(f"head_type {head_type!r} is not one of {HEAD_TYPES}.")
        for name, width in (("head_hidden_dim", head_hidden_dim), ("time_embedding_dim", time_embedding_dim)):
            if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 2):
                raise UsageError(f"{name} must be an integer >= 2, got {width!r}.")
        if not 0.0 <= classifier_dropout < 1.0:
            raise UsageError(f"classifier_dropout must be in [0, 1), got {classifier_dropout}.")
        self.backbone_class = backbone_class
        self.backbone_config = backbone_config
        self.vae_config = vae_config
        self.freeze_vae = freeze_vae
        self.feature_layer = feature_layer
        scheduler = build_noise_scheduler(scheduler_config)
        self.scheduler_config = scheduler_config_of(scheduler)
        self.timestep = noise_axis(scheduler).check_levels([timestep])[0]  # the one check of the noise level
        self.pooling = pooling
        self.noise_policy = noise_policy
        self.noise_seed = noise_seed
        self.head_norm = head_norm
        self.classifier_dropout = classifier_dropout
        self.head_type = head_type
        self.head_hidden_dim = head_hidden_dim
        self.time_embedding_dim = time_embedding_dim
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.pruned_modules = list(pruned_modules) if pruned_modules is not None else None
        self.base_model = base_model
        self.training_summary = training_summary
        super().__init__(**kwargs)

    def noise_scheduler(self) -> SchedulerMixin:
        """The scheduler that defines how the input is noised (built from ``scheduler_config``, on the CPU)."""
        return build_noise_scheduler(self.scheduler_config)

    @property
    def objective(self) -> str:
        """How the input is noised, read from ``scheduler_config``: ``"ddpm"`` or ``"edm"``."""
        return noise_axis(self.noise_scheduler()).objective


DDAEConfig.register_for_auto_class()

__all__ = ["DDAEConfig"]
