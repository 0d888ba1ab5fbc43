"""DDAE classifier configuration (transformers ``PreTrainedConfig``)."""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler, EDMEulerScheduler, SchedulerMixin
from transformers import PreTrainedConfig

from .errors import UsageError
from .families import UNCONDITIONAL
from .noise import noise_axis

BACKBONE_CLASSES = UNCONDITIONAL  # "UNet2DModel", "DiTTransformer2DModel"
NOISE_POLICIES = ("fixed", "random", "none")
OBJECTIVES = ("ddpm", "edm")
HEAD_NORMS = ("batchnorm", "layernorm", None)
VAE_CLASSES = ("AutoencoderKL",)
POOLINGS = ("avg",)


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
            The noise level of the input in the model's units: for `objective="ddpm"` a diffusers timestep index
            `0 .. num_train_timesteps - 1` (the DDAE paper's t=11 is t=10); for `objective="edm"` a sigma (a
            float in `[sigma_min, sigma_max]`, e.g. 0.06).
        objective (`str`, *optional*, defaults to `"ddpm"`):
            How the denoiser was trained, hence how its input is noised: `"ddpm"` (`DDPMScheduler.add_noise`) or
            `"edm"` (`x + sigma * eps`, preconditioned by an `EDMEulerScheduler` as in training).
        sigma_min (`float`, *optional*, defaults to 0.002), sigma_max (`float`, *optional*, defaults to 80.0),
        sigma_data (`float`, *optional*, defaults to 0.5):
            The EDM scheduler's sigma range and data standard deviation (`objective="edm"` only).
        num_train_timesteps (`int`, *optional*, defaults to 1000):
            Noise schedule length (rebuilds the `DDPMScheduler` whose `add_noise` noises the input).
        beta_start (`float`, *optional*, defaults to 1e-4):
            First beta of the noise schedule.
        beta_end (`float`, *optional*, defaults to 0.02):
            Last beta of the noise schedule.
        beta_schedule (`str`, *optional*, defaults to `"linear"`):
            `DDPMScheduler` beta schedule (`"linear"`, `"scaled_linear"`, `"squaredcos_cap_v2"`, ...).
        trained_betas (`list[float]`, *optional*):
            Explicit betas, overriding the three settings above.
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
            Dropout on the (normalised) feature before the linear head.
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
        timestep: int | float = 10,
        objective: str = "ddpm",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        pooling: str = "avg",
        noise_policy: str = "fixed",
        noise_seed: int = 0,
        head_norm: str | None = "batchnorm",
        classifier_dropout: float = 0.0,
        feature_dim: int | None = None,
        image_size: int | None = None,
        pruned_modules: list[str] | None = None,
        base_model: str | None = None,
        training_summary: dict[str, Any] | None = None,
        **kwargs,
    ):
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
        if objective not in OBJECTIVES:
            raise UsageError(f"objective {objective!r} is not one of {OBJECTIVES}.")
        if not 0.0 <= classifier_dropout < 1.0:
            raise UsageError(f"classifier_dropout must be in [0, 1), got {classifier_dropout}.")
        self.backbone_class = backbone_class
        self.backbone_config = backbone_config
        self.vae_config = vae_config
        self.freeze_vae = freeze_vae
        self.feature_layer = feature_layer
        self.timestep = timestep
        self.objective = objective
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.beta_schedule = beta_schedule
        self.trained_betas = list(trained_betas) if trained_betas is not None else None
        self.pooling = pooling
        self.noise_policy = noise_policy
        self.noise_seed = noise_seed
        self.head_norm = head_norm
        self.classifier_dropout = classifier_dropout
        self.feature_dim = feature_dim
        self.image_size = image_size
        self.pruned_modules = list(pruned_modules) if pruned_modules is not None else None
        self.base_model = base_model
        self.training_summary = training_summary
        super().__init__(**kwargs)
        self.timestep = noise_axis(self.noise_scheduler()).check_levels([timestep])[0]

    def noise_scheduler(self) -> SchedulerMixin:
        """The scheduler that defines how the input is noised: ``DDPMScheduler`` or ``EDMEulerScheduler``."""
        if self.objective == "edm":
            return EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)
        return DDPMScheduler(**self.scheduler_kwargs())

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Arguments of the ``DDPMScheduler`` that noises the input."""
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            trained_betas=self.trained_betas,
        )


DDAEConfig.register_for_auto_class()

__all__ = ["DDAEConfig"]
