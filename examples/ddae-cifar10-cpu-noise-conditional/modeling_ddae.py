"""``DDAEForImageClassification``: a truncated diffusers denoiser plus a linear head, as a transformers model.

The forward noises ``pixel_values`` at the configured noise level exactly as in pretraining, with the scheduler
of ``config.scheduler_config`` (``DDPMScheduler.add_noise`` at a timestep for DDPM; ``x + sigma * eps``
preconditioned by the model's EDM scheduler for EDM), runs the denoiser through the capture core (forward hooks,
early exit right after ``feature_layer``), pools the activation and applies ``norm -> dropout -> linear``.
Modules the forward never reaches are replaced by parameter-free placeholders, so they are neither trained nor
saved. A latent denoiser carries its VAE's encoder (frozen by default; the decoder is dropped): ``pixel_values``
are encoded to latents first, as in the model's pipeline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.downsampling import KDownsample2D
from diffusers.models.embeddings import (
    GaussianFourierProjection,
    PatchEmbed,
    get_2d_sincos_pos_embed,
    get_timestep_embedding,
)
from diffusers.models.upsampling import KUpsample2D
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .capture import (
    DDAEBackbone,
    candidate_layers,
    capture_activations,
    check_denoiser,
    check_image_batch,
    dummy_input,
    encode_latents,
    example_noise,
    pool_activation,
    trace_forward,
    vae_scale_factor,
)
from .configuration_ddae import DDAEConfig, scheduler_config_of
from .errors import UsageError, UsageTypeError
from .families import UNCONDITIONAL, family_named
from .image_processing_ddae import DDAEImageProcessor
from .noise import DDPMNoise, NoiseLevel, noise_axis

try:  # absolute and guarded: a Hub copy of this file (trust_remote_code) runs without the package's helpers
    from ddae_diffusers.hub import create_hub_repo, push_folder
    from ddae_diffusers.modelcard import classifier_model_card
except ImportError:  # then save_pretrained writes no model card and push_to_hub needs the package
    create_hub_repo = push_folder = classifier_model_card = None

_PROBE_EPS = 1e-5
_PROCESSOR_REF = "image_processing_ddae.DDAEImageProcessor"
_WEIGHTS_FILE = "model.safetensors"
_FOURIER_SCALE = 16.0  # UNet2DModel's GaussianFourierProjection scale (time_embedding_type="fourier")
# Norms with running statistics: their reset_parameters writes the statistics directly, past transformers' guard.
_RUNNING_STATS_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)  # fmt: skip


class PrunedModule(nn.Module):
    """Placeholder for a backbone module the truncated forward never reaches (holds no weights)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "A pruned DDAE backbone module was called: the forward went past the feature layer. "
            "This is a bug; please report it with your diffusers version."
        )


def unreached_modules(denoiser: nn.Module, layer: str) -> list[str]:
    """Outermost modules holding weights that a forward stopping after ``layer`` never calls.

    Found by tracing one dummy forward with pre-hooks on every module.
    """
    with torch.no_grad():
        trace = trace_forward(denoiser, dummy_input(denoiser), 0, [layer], stop_after=layer, record_reached=True)
    called = trace.reached
    # A container (ModuleList) is never called itself: it is reached when one of its children is.
    reached = {".".join(name.split(".")[:i]) for name in called for i in range(1, name.count(".") + 2)}
    pruned: list[str] = []
    for name, module in denoiser.named_modules():
        if not name or name in reached or any(name.startswith(p + ".") for p in pruned):
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue  # iterated, not called: keep the container (and its length), prune its elements
        if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
            pruned.append(name)
    return pruned


def prune_modules(denoiser: nn.Module, names: list[str]) -> None:
    """Replaces each named module by a ``PrunedModule`` in place (ModuleList lengths are kept)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
        setattr(parent, child, PrunedModule())


class NoiseConditioning(nn.Module):
    """The hidden layer of a noise-conditional head: ``SiLU(hidden(feature) + time_mlp(embed(timestep)))``.

    ``forward(features (B, D), timestep (B,)) -> (B, H)``; ``timestep`` is the level as the denoiser is given it (a
    DDPM index, EDM's ``c_noise``), embedded as diffusers embeds timesteps (sinusoidal, ``time_embedding_dim``)."""

    def __init__(self, feature_dim: int, hidden_dim: int, time_embedding_dim: int):
        super().__init__()
        self.time_embedding_dim = time_embedding_dim
        self.hidden = nn.Linear(feature_dim, hidden_dim)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.act = nn.SiLU()

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        embedding = get_timestep_embedding(
            timestep.float(), self.time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        return self.act(self.hidden(features) + self.time_mlp(embedding.to(features.dtype)))


class DDAEPreTrainedModel(PreTrainedModel):
    """Base class: config, weight init (every module: a checkpoint's missing keys get defined values), input name."""

    config_class = DDAEConfig
    base_model_prefix = "denoiser"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # The loss is a per-batch mean: the Trainer must not rescale it by a token count (it would multiply it by
    # the number of processes).
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        """Initialises the parameters and buffers ``module`` holds itself (not its children's), as transformers asks of
        every model: at construction, and on loading for the keys a checkpoint lacks and for the buffers it does not
        save. transformers' ``initialize_weights`` guards the ``torch.nn.init`` functions, so what was loaded stays.

        The head is a new probe head (normal(0, 0.01) weights, zero bias); norms with running statistics start at
        mean 0, variance 1; DiT's sin-cos position table and the K-sampling kernels are recomputed; every other module
        gets diffusers' default, its own ``reset_parameters()``. Without one, a norm gets ones and zeros and any
        other tensor zeros: defined and finite, never uninitialised memory."""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not own:
            return
        if module is getattr(self, "classifier", None):
            init.normal_(module.weight, mean=0.0, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, _RUNNING_STATS_NORMS):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, PatchEmbed):
            # DiT's fixed sin-cos position table (N = grid^2 patches): not saved, so recomputed after loading.
            grid = int(module.pos_embed.shape[1] ** 0.5)
            table = get_2d_sincos_pos_embed(
                module.proj.out_channels,
                grid,
                base_size=module.base_size,
                interpolation_scale=module.interpolation_scale,
                output_type="pt",
            )
            init.copy_(module.pos_embed, table.float().unsqueeze(0))
        elif isinstance(module, (KDownsample2D, KUpsample2D)):
            init.copy_(module.kernel, type(module)(module.pad_mode).kernel)
        elif isinstance(module, GaussianFourierProjection):
            init.normal_(module.weight, std=_FOURIER_SCALE)  # random frequencies, as UNet2DModel draws them
        elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
            weight = torch.randn_like(module.weight)  # reset_parameters would zero the padding row of a loaded table
            weight[module.padding_idx] = 0
            init.copy_(module.weight, weight)
        elif callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        else:
            for name, tensor in own:
                if name == "weight" and "Norm" in type(module).__name__:
                    init.ones_(tensor)
                else:
                    init.zeros_(tensor)


class DDAEForImageClassification(DDAEPreTrainedModel):
    """A diffusion denoiser as an image classifier (DDAE, Xiang et al. 2023).

    ``forward(pixel_values (B, 3, H, W) in [-1, 1], labels=None, timestep=None) -> ImageClassifierOutput`` with
    ``logits`` (B, num_labels) and, with ``output_hidden_states=True``, ``hidden_states = (activation,)``:
    the raw feature-layer output (B, C, h, w) or (B, N, D). The head is linear, or with
    ``head_type="noise_conditional"`` an MLP told the noise level, so that ``timestep`` (one level or one per
    image) classifies images at any level; :meth:`logits_of_noisy` classifies a sampler's noisy samples.

    Build one with :meth:`from_diffusers` (any ``UNet2DModel`` / pixel ``DiTTransformer2DModel``) or
    :meth:`from_probe` (a probe-engine result folder), fine-tune it with the ``Trainer``, save it with
    ``save_pretrained`` (also writes ``preprocessor_config.json`` and a model card) and load it back with
    ``AutoModelForImageClassification``.
    """

    def __init__(self, config: DDAEConfig):
        super().__init__(config)
        if config.backbone_config is None or config.feature_layer is None:
            raise UsageError(
                "DDAEConfig needs backbone_config and feature_layer: build the model with "
                "DDAEForImageClassification.from_diffusers(model_or_path, layer=..., timestep=...)."
            )
        denoiser = family_named(config.backbone_class).model_class.from_config(config.backbone_config)
        vae = None
        if config.vae_config is not None:
            vae = AutoencoderKL.from_config(config.vae_config)
            prune_modules(vae, vae_decoder_modules(vae))
            if config.freeze_vae:
                vae.requires_grad_(False)
        check_input_channels(denoiser, vae)
        layers = candidate_layers(denoiser)
        if config.feature_layer not in layers:
            raise UsageError(
                f"feature_layer {config.feature_layer!r} is not a block of this {config.backbone_class}: "
                f"use one of DDAEBackbone(denoiser).layer_names() (e.g. {layers[len(layers) // 2]!r})."
            )
        if config.pruned_modules is None:
            config.pruned_modules = unreached_modules(denoiser, config.feature_layer)
        prune_modules(denoiser, config.pruned_modules)
        if config.feature_dim is None:
            with torch.no_grad():
                act = capture_activations(
                    denoiser, dummy_input(denoiser), 0, [config.feature_layer], config.feature_layer
                )[config.feature_layer]
            config.feature_dim = int(act.shape[1] if act.ndim == 4 else act.shape[-1])
        if config.image_size is None:
            config.image_size = int(dummy_input(denoiser).shape[-1]) * vae_scale_factor(vae)

        self.vae = vae
        self.denoiser = denoiser
        self.noise_scheduler = config.noise_scheduler()  # on the CPU, also under from_pretrained's meta device
        self.noise_axis = noise_axis(self.noise_scheduler)
        dim = config.feature_dim
        if config.head_norm == "batchnorm":
            self.feature_norm = nn.BatchNorm1d(dim, affine=False, eps=_PROBE_EPS)
        elif config.head_norm == "layernorm":
            self.feature_norm = nn.LayerNorm(dim)
        else:
            self.feature_norm = nn.Identity()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.noise_conditioning = None
        if config.head_type == "noise_conditional":
            hidden = config.head_hidden_dim or dim
            self.noise_conditioning = NoiseConditioning(dim, hidden, config.time_embedding_dim)
            dim = hidden
        self.classifier = nn.Linear(dim, config.num_labels)
        self.post_init()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_diffusers(
        cls,
        model_or_path: Any,
        layer: str,
        timestep: NoiseLevel | None = None,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        **config_kwargs,
    ) -> DDAEForImageClassification:
        """A classifier on a pretrained diffusers denoiser (new, untrained head; eval mode).

        Args:
            model_or_path: a ``UNet2DModel`` / ``DiTTransformer2DModel``, a ``DDAEBackbone``, or a folder or
                Hub id that ``DDAEBackbone.from_pretrained`` loads (pipeline or bare model). A latent model
                (e.g. the facebook/DiT-XL-2-256 layout) brings its ``vae``: its encoder becomes part of the
                classifier.
            layer: feature block, one of ``DDAEBackbone.layer_names()``.
            timestep: noise level in the model's units: a DDPM timestep index (paper t=11 is 10, the default) or an
                EDM sigma (default: index 4 of the 18-step schedule, about 0.06). The model's scheduler decides.
            num_labels, id2label, label2id: the classes (``num_labels`` defaults to ``len(id2label)``).
            config_kwargs: other :class:`DDAEConfig` arguments (``head_norm``, ``noise_policy``, ...), and ``dtype``
                (or its older name ``torch_dtype``): the classifier's weights' dtype (default: the denoiser's).
        """
        dtype = _dtype_argument(config_kwargs)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UsageTypeError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}.")
        base_model = config_kwargs.pop("base_model", None)
        if isinstance(model_or_path, DDAEBackbone):
            backbone = model_or_path
        elif isinstance(model_or_path, (str, os.PathLike)):
            base_model = base_model or os.fspath(model_or_path)
            backbone = DDAEBackbone.from_pretrained(os.fspath(model_or_path), dtype=dtype)
        else:
            check_denoiser(model_or_path)
            backbone = DDAEBackbone(model_or_path)
        denoiser, vae = backbone.denoiser, backbone.vae
        if backbone.family.conditional:
            raise UsageError(
                f"DDAEForImageClassification supports unconditional denoisers ({', '.join(UNCONDITIONAL)}); a "
                f"{backbone.family.name} is text-conditioned: use DDAEBackbone.features or ddae-probe for it."
            )
        check_input_channels(denoiser, vae)
        layer = backbone.check_layers([layer])[0]
        axis = backbone.noise_axis
        if timestep is None:
            timestep = axis.default_probe_level()
        # The scheduler that noises the input: a DDPMScheduler with the backbone's betas (whatever sampler it has),
        # or its EDM scheduler; DDAEConfig refuses other noise and checks the level.
        noise_scheduler = axis.noiser if isinstance(axis, DDPMNoise) else axis.scheduler
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            num_labels = num_labels or len(id2label)
            if len(id2label) != num_labels:
                raise UsageError(f"id2label has {len(id2label)} classes but num_labels is {num_labels}.")
        if num_labels is None:
            raise UsageError("Pass num_labels (or id2label) to build the classification head.")
        extra = {"id2label": id2label, "label2id": label2id or {v: k for k, v in id2label.items()}} if id2label else {}
        config = DDAEConfig(
            backbone_config=dict(denoiser.config),
            backbone_class=type(denoiser).__name__,
            vae_config=dict(vae.config) if vae is not None else None,
            feature_layer=layer,
            timestep=timestep,
            scheduler_config=scheduler_config_of(noise_scheduler),
            feature_dim=backbone.layer_info(layer).feature_dim,
            image_size=backbone.image_size,
            pruned_modules=unreached_modules(denoiser, layer),
            base_model=base_model or denoiser.config.get("_name_or_path") or None,
            num_labels=num_labels,
            **extra,
            **config_kwargs,
        )
        model = cls(config)
        load_unpruned(model.denoiser, denoiser, config.pruned_modules)
        if vae is not None:
            load_unpruned(model.vae, vae, vae_decoder_modules(vae))
        model.to(denoiser.device, denoiser.dtype).eval()
        _check_truncation(denoiser, model.denoiser, layer)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_probe(
        cls,
        probe_folder: str | os.PathLike,
        layer: str | None = None,
        timestep: NoiseLevel | None = None,
        **config_kwargs,
    ) -> DDAEForImageClassification:
        """A classifier with a trained probe head from a probe-engine output folder (``results.json`` and
        ``heads.safetensors``): the best cell, or the best matching ``layer`` / ``timestep``. See
        ``ddae_diffusers.probing.publish.classifier_from_probe``; ``config_kwargs`` (and ``dtype``) go to
        :meth:`from_diffusers`."""
        try:  # absolute and guarded: a Hub copy of this file (trust_remote_code) carries no probe code
            from ddae_diffusers.probing.publish import classifier_from_probe
        except ImportError as error:
            raise ImportError("from_probe needs the package: pip install ddae-diffusers") from error
        return classifier_from_probe(probe_folder, layer, timestep, model_class=cls, **config_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, then the VAE frozen again when ``config.freeze_vae`` (loading
        replaces the parameters, and with them the ``requires_grad=False`` set at construction).

        ``dtype`` (or its older name ``torch_dtype``) loads the weights in that dtype. Weights the checkpoint lacks
        are initialised as at construction, and transformers' load report lists them. A truncated or corrupt
        ``model.safetensors`` is a one-line ``UsageError`` naming it."""
        from safetensors import SafetensorError

        dtype = _dtype_argument(kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            path = os.fspath(pretrained_model_name_or_path)
            weights = os.path.join(path, kwargs.get("subfolder") or "", _WEIGHTS_FILE)
            named = weights if os.path.isfile(weights) else f"a {_WEIGHTS_FILE} file of it"
            raise UsageError(
                f"Cannot load the classifier {path!r}: {named} is truncated or corrupt "
                f"({' '.join(str(error).split())}): save or download it again."
            ) from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.vae is not None and model.config.freeze_vae:
            model.vae.requires_grad_(False)
        return loaded

    def train(self, mode: bool = True) -> DDAEForImageClassification:
        """Like ``nn.Module.train``, but a fully frozen backbone stays in eval mode (no dropout): a linear
        probe through the Trainer then sees the same features as the probe engine."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.denoiser.parameters()):
            self.denoiser.eval()
        if self.vae is not None and self.config.freeze_vae:
            self.vae.eval()
        return self

    # ------------------------------------------------------------------ forward
    @property
    def feature_layer(self) -> str:
        return self.config.feature_layer

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        return vae_scale_factor(self.vae)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Validates a (B, 3, H, W) float batch at the model's resolution; outside training also its range
        [-1, 1] (a device sync, so training steps skip it: the image processor's output is in range)."""
        return check_image_batch(pixel_values, 3, self.config.image_size, check_range=not self.training)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> the denoiser's clean input in float32: the pixels themselves, or for a latent
        model the VAE latents (B, c, H/f, W/f) (the VAE runs in its own dtype; no gradient through a frozen VAE)."""
        if self.vae is None:
            return pixel_values.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_vae):
            return encode_latents(self.vae, pixel_values).float()

    def check_timestep(self, timestep: NoiseLevel | torch.Tensor | None, batch_size: int) -> NoiseLevel | torch.Tensor:
        """The noise level of a forward: ``config.timestep`` for None, else one level or a (B,) tensor of levels in
        the model's units (DDPM indices, EDM sigmas), checked (``UsageError`` naming the fix)."""
        if timestep is None:
            return self.config.timestep
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 0:
            timestep = timestep.item()
        if not isinstance(timestep, torch.Tensor):
            return self.noise_axis.check_levels([timestep])[0]
        if timestep.shape != (batch_size,):
            raise UsageError(
                f"timestep has shape {tuple(timestep.shape)} for {batch_size} images: pass one level or one per image."
            )
        self.noise_axis.check_levels(timestep.unique().tolist())
        return timestep

    def noisy_input(
        self,
        clean: torch.Tensor,
        noise: torch.Tensor | None = None,
        timestep: NoiseLevel | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's input under the configured noise policy, as in pretraining, from its clean input
        (B, C, h, w) (pixels, or latents from :meth:`encode`), and its (B,) timestep (DDPM: ``add_noise(x_0, eps,
        t)`` and t; EDM: ``c_in (x_0 + sigma eps)`` and ``c_noise``), at ``timestep`` (a checked level or (B,)
        levels; default ``config.timestep``).

        The ``"fixed"`` policy's eval noise of the example at batch position i is ``example_noise`` of
        ``(noise_seed, i)``: a probe's test split in its order, in one batch, gets the probe's own noise. Noise is
        drawn and added in float32 (half precision would round it away at low levels); the forward casts the
        result to the denoiser's dtype."""
        clean = clean.float()
        policy = self.config.noise_policy
        if policy == "none":
            noise = None
        elif noise is None:
            if policy == "fixed" and not self.training:
                noise = example_noise(clean.shape[1:], range(clean.shape[0]), self.config.noise_seed)
            else:
                noise = torch.randn_like(clean)
        level = self.config.timestep if timestep is None else timestep
        return self.noise_axis.network_inputs(clean, noise, level)

    def pooled_features(
        self, noisy: torch.Tensor, network_timestep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature layer's raw activation (B, C, h, w) or (B, N, D) and its pooled (B, D) feature, for the
        denoiser's input ``noisy`` and its (B,) ``network_timestep`` (see :meth:`noisy_input`)."""
        layer = self.config.feature_layer
        activation = capture_activations(self.denoiser, noisy, network_timestep, [layer], stop_after=layer)[layer]
        return activation, pool_activation(activation, self.config.pooling)

    def head(self, features: torch.Tensor, network_timestep: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B, num_labels) logits: norm, the noise conditioning (noise-conditional heads,
        told the (B,) ``network_timestep``), dropout, linear."""
        hidden = self.feature_norm(features.to(self.classifier.weight.dtype))
        if self.noise_conditioning is not None:
            hidden = self.noise_conditioning(hidden, network_timestep.to(hidden.device))
        return self.classifier(self.dropout(hidden))

    def logits_of_noisy(self, sample: torch.Tensor, timestep: NoiseLevel | torch.Tensor) -> torch.Tensor:
        """(B, num_labels) logits of a sample that is already noised, as a sampler holds it: (B, C, h, w) in the
        denoiser's space (pixels, or latents) at ``timestep`` (one level or (B,) levels in the model's units).
        Differentiable in ``sample`` (classifier guidance)."""
        levels = self.check_timestep(timestep, sample.shape[0])
        if not isinstance(levels, torch.Tensor):
            levels = torch.full((sample.shape[0],), levels, device=sample.device)
        noisy, network_timestep = self.noise_axis.noisy_network_inputs(sample.float(), levels)
        _, features = self.pooled_features(noisy, network_timestep)
        return self.head(features, network_timestep)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        timestep: NoiseLevel | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """pixel_values (B, 3, H, W) in [-1, 1]; labels (B,) class ids (or floats for regression /
        multi-label); noise: optional eps overriding the noise policy, shaped like the denoiser's input
        ((B, 3, H, W), or the latents (B, c, H/f, W/f) of a latent model); timestep: the noise level, one or (B,) in
        the model's units (default ``config.timestep``; a linear head was trained at that level only). Pixels,
        latents and noise stay float32 until the noisy input enters the denoiser in its weights' dtype."""
        pixel_values = self.check_pixel_values(pixel_values).float()
        levels = self.check_timestep(timestep, pixel_values.shape[0])
        noisy, network_timestep = self.noisy_input(self.encode(pixel_values), noise, levels)
        activation, features = self.pooled_features(noisy, network_timestep)
        logits = self.head(features, network_timestep)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = (activation,) if output_hidden_states else None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    # ------------------------------------------------------------------ saving
    def parameter_counts(self) -> dict[str, int]:
        """Saved parameters per part: the truncated denoiser, the VAE encoder (latent models), the head."""
        head = [self.classifier] + ([self.noise_conditioning] if self.noise_conditioning is not None else [])
        parts = {"denoiser (truncated)": [self.denoiser], "VAE encoder": [self.vae], "head": head}
        return {
            name: sum(p.numel() for module in modules for p in module.parameters())
            for name, modules in parts.items()
            if modules[0] is not None
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus a model card (README.md) and, if the folder has none,
        a ``preprocessor_config.json`` for this resolution, so the folder works with ``pipeline()``."""
        tags = kwargs.pop("tags", None)
        # Remote code for AutoImageProcessor is declared in config.json, not in preprocessor_config.json: there
        # transformers' pipeline() would also look for a remote "DDAEVideoProcessor" and prompt the user.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoImageProcessor": _PROCESSOR_REF}
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            if not os.path.isfile(os.path.join(save_directory, "preprocessor_config.json")):
                DDAEImageProcessor(size=self.config.image_size).save_pretrained(save_directory)
            if classifier_model_card is not None:
                card = classifier_model_card(
                    self.config,
                    save_directory,
                    tags=tags,
                    parameters=self.parameter_counts(),
                    bytes_per_value=self.classifier.weight.element_size(),
                )
                card.save(os.path.join(save_directory, "README.md"))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        extra_files: list[str | os.PathLike] | None = None,
    ):
        """Uploads weights, config, remote code, image processor and the model card in one commit, with
        ``extra_files`` (e.g. a probe's ``results.json``) copied beside them.

        Overrides transformers' ``push_to_hub``, which would replace our model card with a generic one."""
        if push_folder is None:
            raise ImportError("push_to_hub needs the package: pip install ddae-diffusers")
        repo_id = create_hub_repo(repo_id, token=token, private=private)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, repo_id.split("/")[-1])  # the card names the model after its folder
            self.save_pretrained(folder, max_shard_size=max_shard_size, tags=tags)
            for path in extra_files or []:
                shutil.copy(path, os.path.join(folder, os.path.basename(path)))
            return push_folder(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message or "Upload DDAEForImageClassification",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def vae_decoder_modules(vae: AutoencoderKL) -> list[str]:
    """The VAE modules a classifier never runs (decoder side): pruned, so neither trained nor saved."""
    return [name for name in ("decoder", "post_quant_conv") if isinstance(getattr(vae, name, None), nn.Module)]


def check_input_channels(denoiser: nn.Module, vae: AutoencoderKL | None) -> None:
    """The denoiser must take RGB pixels, or the latents of ``vae``; a clear error otherwise."""
    channels = int(denoiser.config.in_channels)
    if vae is None and channels != 3:
        raise UsageError(
            f"The {type(denoiser).__name__} takes {channels}-channel inputs, a latent model without its VAE: build "
            "the classifier from the pipeline folder or Hub id (with its vae/), or pass DDAEBackbone(denoiser, "
            "scheduler, vae)."
        )
    if vae is not None and channels != int(vae.config.latent_channels):
        raise UsageError(
            f"The VAE gives {vae.config.latent_channels}-channel latents but the {type(denoiser).__name__} takes "
            f"{channels} channels: they are not one model's components."
        )


def load_unpruned(target: nn.Module, source: nn.Module, pruned: list[str]) -> None:
    """Copies ``source``'s weights into ``target``, a copy of it with the ``pruned`` modules replaced."""
    prefixes = tuple(name + "." for name in pruned)
    state = {key: value for key, value in source.state_dict().items() if not key.startswith(prefixes)}
    target.load_state_dict(state, strict=True)


def _dtype_argument(kwargs: dict[str, Any]) -> Any:
    """Pops ``dtype`` and its older name ``torch_dtype`` from ``kwargs``: the one given, or None."""
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise UsageError(
            f"Got dtype={dtype} and torch_dtype={torch_dtype}: pass only dtype (torch_dtype is its old name)."
        )
    return dtype if dtype is not None else torch_dtype


def _check_truncation(full: nn.Module, truncated: nn.Module, layer: str) -> None:
    """Asserts the truncated denoiser gives the same feature as the full one on a dummy input."""
    like = dummy_input(full)
    x = torch.randn(like.shape, generator=torch.Generator().manual_seed(0)).to(like)
    was_training = full.training
    full.eval()
    try:
        with torch.no_grad():
            expected = capture_activations(full, x, 1, [layer], stop_after=layer)[layer]
            got = capture_activations(truncated, x, 1, [layer], stop_after=layer)[layer]
    finally:
        full.train(was_training)
    if not torch.allclose(expected, got, atol=1e-5, rtol=1e-4):
        raise RuntimeError(f"Truncating the backbone after {layer!r} changed its output: please report this bug.")


DDAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["DDAEForImageClassification", "DDAEPreTrainedModel", "NoiseConditioning", "unreached_modules"]
