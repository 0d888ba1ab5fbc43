"""The capture core: intermediate activations of a diffusers denoiser at a noise timestep.

``DDAEBackbone`` pairs a denoiser (any family of ``families.py``: pixel or latent UNets and DiTs, Stable
Diffusion UNets, PixArt, SD3, Flux) with its noise scheduler (and, for latent models, an ``AutoencoderKL``; for
text-conditioned ones, the conditioning of a prompt, by default the empty one). ``features()`` noises clean
images at each noise level (``noise.NoiseAxis``: ``add_noise`` for DDPM, EDM's preconditioning, flow matching's
``scale_noise``), runs one forward per level with forward hooks on every requested block, stops right after the
deepest one and pools (or returns dense maps). Nothing here copies a diffusers ``forward()``: hooks work on any
version.

Noise levels are in the model's own units: diffusers timestep indices ``0 .. T - 1`` for DDPM (the
DDAE paper counts from 1, so its t=11 is our t=10), sigmas (floats) for EDM and flow matching.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin
from torch import nn

from .errors import UsageError, UsageTypeError
from .families import Conditioning, batched, family_of, sample_size
from .noise import NoiseAxis, NoiseLevel, noise_axis

Denoiser = nn.Module  # a diffusers denoiser of a supported family (see families.FAMILIES)
Pooling = str | None  # "avg", "spatial" or None
# What a forward hook does with each captured block output: "avg" pools it, a callable maps it, None keeps it.
HookPooling = str | Callable[[torch.Tensor], torch.Tensor] | None
POOLINGS = ("avg", "spatial", None)
# images per forward when extracting features: on this project's CPU a full grid ran 1.6x faster in batches of 16
# than of 64 (35.7M UNet) and 2.1x faster than of 256 (2.6M UNet); see bench/extract_study.py. GPUs want more.
EXTRACTION_BATCH_SIZE = 16
_ENSEMBLE_STREAM = 7  # derive_seed(seed, _ENSEMBLE_STREAM, k): the noise of ensemble draw k >= 1

_RANGE_TOLERANCE = 1e-3


class _StopForward(Exception):
    """Raised by the hook on the deepest requested block to end the forward early."""


@dataclass(frozen=True)
class LayerInfo:
    """One capturable block: its module path, execution index and output shape without batch.

    ``shape`` is ``(C, H, W)`` for UNet feature maps and ``(N, D)`` for DiT tokens.
    """

    name: str
    index: int
    shape: tuple[int, ...]

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature: C for maps, D for tokens."""
        return self.shape[0] if len(self.shape) == 3 else self.shape[-1]


@dataclass
class Trace:
    """What one traced forward saw.

    ``outputs``: ``{layer: (B, C, h, w) or (B, N, D)}`` for the captured layers; ``order``: the captured
    layers in the order their forwards returned; ``reached``: every module whose forward was entered
    (only with ``record_reached=True``); ``stopped_early``: whether the forward ended at ``stop_after``.
    """

    outputs: dict[str, torch.Tensor]
    order: list[str]
    reached: set[str]
    stopped_early: bool


def check_denoiser(denoiser: object) -> None:
    """Raises ``UsageTypeError`` unless ``denoiser`` is of a supported family."""
    family_of(denoiser)


def candidate_layers(denoiser: Denoiser) -> list[str]:
    """Module paths of every block whose output can be captured (registration order)."""
    return family_of(denoiser).layer_candidates(denoiser)


def denoiser_kwargs(denoiser: Denoiser, batch_size: int, device: torch.device) -> dict:
    """Extra forward arguments of an unconditional pass (DiT: the null class id)."""
    return family_of(denoiser).forward_kwargs(denoiser, batch_size, device)


def _hook_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of accelerate's hook on ``module`` itself, if it has one that names one."""
    hook = getattr(module, "_hf_hook", None)  # accelerate's attribute for the hook of a module
    for single in getattr(hook, "hooks", None) or (hook,):  # a SequentialHook holds several
        device = getattr(single, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module``'s forward runs on.

    Under accelerate's hooks the weights wait on the CPU or the meta device and the hook moves them, and the inputs,
    to its ``execution_device`` for each forward: that device. ``enable_model_cpu_offload`` hooks the model itself;
    ``cpu_offload`` hooks its submodules and leaves the weights on the meta device, where the first hooked submodule
    that names a device is used (as diffusers pipelines read it). Otherwise the device of the module's first
    parameter or buffer (the CPU if it has none). Called on every forward: only the meta case walks the modules.
    """
    device = _hook_device(module)
    if device is not None:
        return device
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    if tensor is None or tensor.device.type == "meta":
        for submodule in module.modules():
            device = _hook_device(submodule)
            if device is not None:
                return device
    return tensor.device if tensor is not None else torch.device("cpu")


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: a diffusers model's ``dtype`` (its first floating weight outside the
    modules kept in float32, or the compute dtype of layerwise casting), else its first floating parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def has_forward_wrappers(denoiser: nn.Module) -> bool:
    """True if a module of ``denoiser`` had its ``forward`` replaced on the instance.

    diffusers' ``HookRegistry`` (group offload, layer skip, caches) and accelerate's hooks (CPU offload)
    do this, and their wrappers run ``post_forward`` without ``try/finally``: an exception raised
    through them (the early exit) would skip it, leaving weights on the wrong device or state stale.
    """
    return any("forward" in vars(module) for module in denoiser.modules())


def trace_forward(
    denoiser: Denoiser,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    capture: Sequence[str] = (),
    stop_after: str | None = None,
    record_reached: bool = False,
    conditioning: Conditioning | None = None,
    pooling: HookPooling = None,
) -> Trace:
    """Runs the denoiser once on ``sample`` at ``timestep`` with hooks and returns what it saw (a :class:`Trace`).

    ``sample``: (B, C, H, W) noisy input (latents unpacked: Flux's 2x2 packing is the family's business), of any
    float dtype: it enters the forward on the denoiser's execution device and in its weights' dtype.
    ``conditioning``: a text-conditioned family's prompt conditioning (batch 1 or B), cast the same way.
    ``pooling``: ``"avg"`` pools each captured output inside its hook ((B, C, h, w) -> (B, C), (B, N, D) -> (B, D)),
    a callable is applied to it there, None keeps the raw output; pooling in the hook frees each block's maps
    before the next block runs. The forward stops right after ``stop_after`` (a name in ``capture``) unless a
    module carries a forward wrapper (see :func:`has_forward_wrappers`); then it runs to the end, which gives the
    same activations. Autograd is left intact (fine-tuning uses this).
    """
    family = family_of(denoiser)
    if family.conditional and conditioning is None:
        raise UsageError(
            f"{family.name} is text-conditioned: pass its conditioning (DDAEBackbone computes the empty prompt's "
            "with the pipeline's text encoders, or takes set_prompt(...) / set_conditioning(...))."
        )
    reduce = _hook_pooling(pooling)
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    reached: set[str] = set()
    early_exit = stop_after is not None and not has_forward_wrappers(denoiser)

    def capture_hook(name: str):
        def hook(module, inputs, output):
            value = family.block_output(output)
            outputs[name] = value if reduce is None else reduce(value)
            order.append(name)
            if early_exit and name == stop_after:
                raise _StopForward

        return hook

    handles = [denoiser.get_submodule(name).register_forward_hook(capture_hook(name)) for name in capture]
    if record_reached:
        handles += [
            module.register_forward_pre_hook(lambda mod, args, name=name: reached.add(name))
            for name, module in denoiser.named_modules()
            if name
        ]
    dtype = weights_dtype(denoiser)
    sample = sample.to(execution_device(denoiser), dtype)
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    stopped = False
    if conditioning is not None:
        conditioning = batched(conditioning, sample.shape[0], sample.device, dtype)
    try:
        family.call(denoiser, sample, timestep, conditioning)
    except _StopForward:
        stopped = True
    finally:
        for handle in handles:
            handle.remove()
    return Trace(outputs, order, reached, stopped)


def capture_activations(
    denoiser: Denoiser,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    layers: Sequence[str],
    stop_after: str | None = None,
    conditioning: Conditioning | None = None,
    pooling: HookPooling = None,
) -> dict[str, torch.Tensor]:
    """The outputs of ``layers`` in one forward (see :func:`trace_forward`): ``{layer: activation}``, raw or as
    ``pooling`` made them in the hook."""
    return trace_forward(
        denoiser, sample, timestep, layers, stop_after, conditioning=conditioning, pooling=pooling
    ).outputs


def _hook_pooling(pooling: HookPooling) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function a capture hook applies to each block output (None: keep it raw)."""
    if pooling is None or callable(pooling):
        return pooling
    if pooling != "avg":
        raise UsageError(f"Unknown hook pooling {pooling!r}: use 'avg', a callable or None.")
    return lambda activation: pool_activation(activation, "avg")


def check_image_batch(images: torch.Tensor, channels: int, size: int | None, check_range: bool = True) -> torch.Tensor:
    """Validates a (B, C, H, W) float batch: ``channels`` channels, ``size`` x ``size`` (any size if None) and,
    with ``check_range`` (one device sync), values in [-1, 1]. Returns ``images`` unchanged."""
    if not isinstance(images, torch.Tensor):
        raise UsageTypeError(
            f"images must be a (B, C, H, W) float tensor in [-1, 1], not {type(images).__name__}: "
            "convert PIL or numpy images with ddae_diffusers.DDAEImageProcessor."
        )
    if not images.is_floating_point():
        raise UsageTypeError(
            f"images have dtype {images.dtype}: pass floats in [-1, 1] "
            "(DDAEImageProcessor does the conversion, or use images / 127.5 - 1)."
        )
    if images.ndim != 4 or images.shape[0] == 0:
        raise UsageError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}.")
    if images.shape[1] != channels:
        raise UsageError(
            f"images have {images.shape[1]} channels but the model takes {channels}: "
            "convert them (DDAEImageProcessor turns grayscale into RGB)."
        )
    height, width = images.shape[-2:]
    if size is not None and (height, width) != (size, size):
        raise UsageError(
            f"images are {height}x{width} but the model takes {size}x{size}: "
            f"resize them (DDAEImageProcessor(size={size}))."
        )
    if check_range:
        bad = non_finite_rows(images)
        if bad is not None:
            raise UsageError(
                f"images hold NaN or inf values (first in image {bad[0]} of the batch, {bad[1]} images in all): "
                "fix or drop them before extracting features."
            )
        low, high = images.min().item(), images.max().item()
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise UsageError(
                f"images range over [{low:.3g}, {high:.3g}] but must be in [-1, 1]: preprocess them with "
                "ddae_diffusers.DDAEImageProcessor (or images * 2 - 1 for [0, 1] inputs)."
            )
    return images


def non_finite_rows(batch: torch.Tensor) -> tuple[int, int] | None:
    """``(first row, number of rows)`` of a (B, ...) batch holding NaN or inf values, else None (one sync)."""
    finite = torch.isfinite(batch.flatten(1)).all(dim=1)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0]), int((~finite).sum())


def _check_finite_features(features: dict[tuple[str, int], torch.Tensor], example_ids: Sequence[int]) -> None:
    """A ``UsageError`` naming the first (layer, t) and example whose features are NaN or inf.

    One device sync for the whole batch when everything is finite (the usual case)."""
    if bool(torch.stack([torch.isfinite(values).all() for values in features.values()]).all()):
        return
    for (layer, t), values in features.items():
        bad = non_finite_rows(values)
        if bad is not None:
            raise UsageError(
                f"The features of {layer!r} at t={t} are NaN or inf for example {example_ids[bad[0]]} (and "
                f"{bad[1] - 1} more in this batch): the model's weights are probably not finite; check the checkpoint."
            )


def dummy_input(denoiser: nn.Module, channels: int | None = None, size: int | None = None) -> torch.Tensor:
    """A (1, C, S, S) zero batch at the denoiser's sample size (32 if it has none), on its execution device and
    in its weights' dtype."""
    side = size or sample_size(denoiser.config) or 32
    channels = channels or denoiser.config.in_channels
    return torch.zeros(1, channels, side, side, device=execution_device(denoiser), dtype=weights_dtype(denoiser))


def pool_activation(activation: torch.Tensor, pooling: Pooling = "avg") -> torch.Tensor:
    """(B, C, H, W) maps -> (B, C) by global average pooling; (B, N, D) tokens -> (B, D) by mean."""
    if pooling is None:
        return activation
    if pooling != "avg":
        raise UsageError(f"Unknown pooling {pooling!r}: use 'avg' or None.")
    return activation.mean(dim=(2, 3)) if activation.ndim == 4 else activation.mean(dim=1)


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, D) row-major tokens of an ``height x width`` grid -> (B, D, height, width) maps."""
    b, n, d = tokens.shape
    if n != height * width:
        raise UsageError(f"{n} tokens do not tile a {height}x{width} grid: this block's tokens are not image tokens.")
    return tokens.transpose(1, 2).reshape(b, d, height, width)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. ``(seed, example_id)`` or ``(seed, step, process)``: the project's one
    way to seed a random stream from its coordinates (numpy's ``SeedSequence`` mixes them)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def example_noise(
    shape: Sequence[int], example_ids: Iterable[int], seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian noise of shape (B, *shape), one generator per example seeded by (seed, id).

    The noise of an example depends only on its id and the seed, never on the batch it is in.
    """
    rows = []
    for example_id in example_ids:
        generator = torch.Generator().manual_seed(derive_seed(seed, example_id))
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows).to(dtype)


def vae_scale_factor(vae: AutoencoderKL | None) -> int:
    """Pixels per latent pixel of a VAE (1 without one): 8 for Stable Diffusion's and DiT's."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


class _LatentMean(nn.Module):
    """``vae.encode(images).latent_dist.mean`` as a forward, so the encoder can run on other weights."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _latent_mean(self.vae, images)


_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def _encode_in_float32(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The latent mean of a half-precision VAE computed with float32 copies of its encoder weights (the VAE
    itself is not changed; gradients still reach its weights)."""
    weights = {  # weights an offload hook keeps on the meta device stay there: the hook loads them in float32
        f"vae.{name}": tensor.to(None if tensor.is_meta else images.device, torch.float32)
        for name, tensor in [*vae.named_parameters(), *vae.named_buffers()]
        if tensor.is_floating_point() and not name.startswith(_DECODER_PREFIXES)
    }
    return torch.func.functional_call(_LatentMean(vae), weights, (images,))


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, c, H/f, W/f) latents as the denoiser was trained on them:
    ``(latent_dist.mean - shift_factor) * scaling_factor`` (no shift when the VAE config has none).

    ``images`` may be of any float dtype: they enter the VAE on its execution device and in its weights' dtype. A
    VAE whose config sets ``force_upcast`` (SDXL's, SD3's, Flux's) overflows in float16: it encodes with autocast
    disabled, from float32 pixels, and with float16 weights computes in float32 as diffusers pipelines do (on
    float32 copies of its encoder weights). The latents come back in the dtype the VAE computed in.
    """
    device = execution_device(vae)
    dtype = weights_dtype(vae)
    if vae.config.get("force_upcast", False):
        with torch.autocast(device.type, enabled=False):
            images = images.to(device, torch.float32 if dtype == torch.float16 else dtype)
            latents = _encode_in_float32(vae, images) if dtype == torch.float16 else _latent_mean(vae, images)
    else:
        latents = _latent_mean(vae, images.to(device, dtype))
    shift = vae.config.get("shift_factor")
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def _latent_mean(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mean


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; no autocast for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _tiled(conditioning: Conditioning | None, batch_size: int, copies: int) -> Conditioning | None:
    """Conditioning for ``copies`` stacked copies of a batch: per-example tensors (leading dim ``batch_size`` > 1;
    Flux's ``txt_ids`` have none) are repeated; batch-1 ones are left to :func:`batched`."""
    if conditioning is None or copies == 1 or batch_size == 1:
        return conditioning
    return {
        key: torch.cat([value] * copies) if key != "txt_ids" and value.shape[:1] == (batch_size,) else value
        for key, value in conditioning.items()
    }


class DDAEBackbone:
    """A diffusers denoiser with its noise scheduler (and VAE for latent models), ready to capture.

    Args:
        denoiser: a denoiser of a supported family: ``UNet2DModel`` (pixel DDPM), ``DiTTransformer2DModel`` (latent
            or pixel), ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x/XL), ``PixArtTransformer2DModel``,
            ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``.
        scheduler: the noise scheduler that defines the noise levels: a DDPM-style one (``add_noise``; default
            ``DDPMScheduler()``, 1000 steps, linear betas 1e-4..0.02, as google/ddpm-cifar10-32) or an EDM one
            (``EDMEulerScheduler``: levels are sigmas, inputs preconditioned as in training).
        vae: an ``AutoencoderKL`` for latent models; images are encoded by :func:`encode_latents`
            (``latent_dist.mean``, shifted and scaled as in diffusers pipelines) before noising.
        text_components: text-conditioned models: the pipeline's ``text_encoder``/``tokenizer`` (and ``_2``, ``_3``)
            by component name. The empty prompt's conditioning is computed from them once, on first use, with the
            diffusers pipeline's own ``encode_prompt``; :meth:`set_prompt` encodes another prompt.
        conditioning: text-conditioned models: precomputed conditioning instead (see :meth:`set_conditioning`).
        prompt_pipeline: the diffusers pipeline class whose ``encode_prompt`` is used (default: the family's, e.g.
            ``StableDiffusionXLPipeline`` for an SDXL UNet); loaders pass the ``_class_name`` of ``model_index.json``.
        last_layer: a denoiser truncated after this block (a classifier's, whose later modules are pruned): the
            catalogue lists the blocks up to it, and it is the default layer.

    Example::

        backbone = DDAEBackbone.from_pretrained("google/ddpm-cifar10-32")
        feats = backbone.features(pixel_values, layers=["up_blocks.1.resnets.2"], timesteps=[10])
        feats["up_blocks.1.resnets.2", 10].shape  # (B, 256)
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: SchedulerMixin | None = None,
        vae: AutoencoderKL | None = None,
        text_components: dict[str, object] | None = None,
        conditioning: Conditioning | None = None,
        prompt_pipeline: str | None = None,
        last_layer: str | None = None,
    ):
        check_denoiser(denoiser)
        self.family = family_of(denoiser)
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self.noise_axis: NoiseAxis = noise_axis(self.scheduler)
        self.denoiser = denoiser
        self.vae = vae
        self.text_components = {k: v for k, v in (text_components or {}).items() if v is not None}
        self.prompt_pipeline = prompt_pipeline
        self._prompt_pipe = None
        self._conditioning: Conditioning | None = None
        if conditioning is not None:
            self.set_conditioning(conditioning)
        self._catalogue: list[LayerInfo] | None = None
        self.last_layer = last_layer
        if last_layer is not None and last_layer not in candidate_layers(denoiser):
            raise UsageError(f"last_layer {last_layer!r} is not a block of this {self.family.name}.")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype: torch.dtype | None = None, **hub_kwargs) -> DDAEBackbone:
        """Loads a diffusers pipeline folder or repo (``model_index.json`` with ``unet`` or
        ``transformer``, ``scheduler``, optional ``vae``) or a bare model folder (``config.json``
        of a supported class; the scheduler is then ``DDPMScheduler()``).

        ``dtype`` (e.g. ``torch.bfloat16``; the older name ``torch_dtype`` also works) loads the denoiser, VAE and
        text encoders in that dtype instead of float32; other keyword arguments go to the Hub download."""
        try:  # absolute and guarded: a classifier's Hub copy of this file carries no loader (see modeling_ddae)
            from ddae_diffusers.loading import inspect_source, load_components, resolve_dtype
        except ImportError as error:
            raise ImportError("DDAEBackbone.from_pretrained needs the package: pip install ddae-diffusers") from error
        dtype = resolve_dtype(dtype, hub_kwargs.pop("torch_dtype", None))
        source = inspect_source(path_or_hub_id, **hub_kwargs)
        components = load_components(source, dtype=dtype, **hub_kwargs)
        return cls(
            components["denoiser"],
            components["scheduler"],
            components["vae"],
            text_components=components["text"],
            prompt_pipeline=source.pipeline_class,
        )

    def to(self, device: torch.device | str) -> DDAEBackbone:
        """Moves the denoiser, VAE and conditioning to ``device``; returns self.

        The text encoders move too while no conditioning exists (the first forward encodes the empty prompt with
        them). Once it does, they stay where they are: the cached conditioning tensors move instead (T5-XXL in
        float32 is about 19 GB), and a later :meth:`set_prompt` encodes on the encoders' device."""
        modules = [self.denoiser, self.vae]
        if self._conditioning is None:
            modules += list(self.text_components.values())
        for module in modules:
            if isinstance(module, nn.Module):
                module.to(device)
        if self._conditioning is not None:
            self._conditioning = {k: v.to(device) for k, v in self._conditioning.items()}
        return self

    # ------------------------------------------------------------------ conditioning (text-conditioned families)
    @property
    def conditioning(self) -> Conditioning | None:
        """The conditioning every forward gets: None for unconditional families; else the prompt's (batch 1),
        by default the empty prompt's, computed once on first use."""
        if self.family.conditional and self._conditioning is None:
            self._conditioning = self.encode_prompt("")
        return self._conditioning

    def encode_prompt(self, prompt: str) -> Conditioning:
        """The conditioning of ``prompt`` from the diffusers pipeline's own ``encode_prompt``, run on the text
        encoders this backbone holds (no classifier-free guidance: one conditional embedding).

        The encoders run on their execution device, in their own dtype (that of ``from_pretrained(dtype=...)``);
        the conditioning comes back on the backbone's :attr:`device`, and each forward casts it to the denoiser's
        dtype."""
        if not self.family.conditional:
            raise UsageError(f"{self.family.name} is not text-conditioned: it takes no prompt.")
        if not isinstance(prompt, str):
            raise UsageTypeError(f"prompt must be a string, got {type(prompt).__name__}.")
        pipe = self._prompt_encoder()
        encoders = [module for module in self.text_components.values() if isinstance(module, nn.Module)]
        device = execution_device(encoders[0]) if encoders else self.device
        with torch.inference_mode():
            encoded = self.family.text.encode(pipe, prompt, device, self.image_size or 0, self.denoiser)
        return {key: value.detach().to(self.device) for key, value in encoded.items()}

    def set_prompt(self, prompt: str) -> DDAEBackbone:
        """Conditions every following forward on ``prompt`` (instead of the empty prompt); returns self."""
        self._conditioning = self.encode_prompt(prompt)
        return self

    def set_conditioning(self, conditioning: Conditioning) -> DDAEBackbone:
        """Conditions every following forward on precomputed embeddings (batch 1, or the batch size), e.g.
        ``{"encoder_hidden_states": (1, 77, 768)}`` for SD 1.x; the keys each family needs are in
        ``backbone.family.text.required``. Returns self."""
        if not self.family.conditional:
            raise UsageError(f"{self.family.name} is not text-conditioned: it takes no conditioning.")
        missing = [key for key in self.family.text.required if key not in conditioning]
        if missing:
            raise UsageError(
                f"The conditioning of a {self.family.name} needs {missing}; it has {sorted(conditioning)}."
            )
        if not all(isinstance(value, torch.Tensor) for value in conditioning.values()):
            raise UsageTypeError("Conditioning values must be tensors (the outputs of the pipeline's encode_prompt).")
        self._conditioning = {key: value.detach().to(self.device) for key, value in conditioning.items()}
        return self

    def _prompt_encoder(self):
        """The diffusers pipeline (built once from this backbone's components) whose ``encode_prompt`` is used."""
        if self._prompt_pipe is None:
            import inspect

            import diffusers

            if not self.text_components:
                raise UsageError(
                    f"This {self.family.name} has no text encoders: load it from its pipeline folder or Hub id "
                    "(with text_encoder/ and tokenizer/), or pass precomputed embeddings with set_conditioning(...)."
                )
            name = self.prompt_pipeline or self.family.text.pipeline_class(self.denoiser)
            pipeline_class = getattr(diffusers, name)
            given = {
                **self.text_components,
                self.family.component: self.denoiser,
                "vae": self.vae,
                # a copy (only encode_prompt runs): settings the pipelines would flag as deprecated are set as they ask
                "scheduler": type(self.scheduler).from_config(self.scheduler.config, **{
                    key: value for key, value in (("clip_sample", False), ("steps_offset", 1))
                    if key in self.scheduler.config
                }),
                "requires_safety_checker": False,
            }
            parameters = inspect.signature(pipeline_class.__init__).parameters
            kwargs = {
                key: given.get(key)
                for key, parameter in parameters.items()
                if key != "self" and (key in given or parameter.default is inspect.Parameter.empty)
            }
            self._prompt_pipe = pipeline_class(**kwargs)
        return self._prompt_pipe

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        """The device the denoiser's forward runs on: under CPU offload (accelerate's hooks) the hooks'
        execution device, not the CPU the weights wait on. Inputs, noise and autocast go there."""
        return execution_device(self.denoiser)

    @property
    def num_train_timesteps(self) -> int:
        """The scheduler's training timesteps (the DDPM axis 0..T-1)."""
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def objective(self) -> str:
        """``"ddpm"`` or ``"edm"``: how this model's inputs are noised (see :mod:`ddae_diffusers.noise`)."""
        return self.noise_axis.objective

    @property
    def image_channels(self) -> int:
        """Channels of the clean images this backbone takes (3 for RGB)."""
        return int(self.vae.config.in_channels if self.vae is not None else self.denoiser.config.in_channels)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        return vae_scale_factor(self.vae)

    @property
    def image_size(self) -> int | None:
        """Image side in pixels the denoiser was built for (None if a UNet has no ``sample_size``)."""
        size = sample_size(self.denoiser.config)
        return None if size is None else size * self.vae_scale

    # ------------------------------------------------------------------ catalogue
    @property
    def layers(self) -> list[LayerInfo]:
        """Every capturable block in execution order with its output shape (traced once)."""
        return self._layer_catalogue()

    def _layer_catalogue(self, dtype: torch.dtype | None = None) -> list[LayerInfo]:
        """The catalogue, traced on first use with one zero image on the backbone's current :attr:`device`, under
        autocast to ``dtype`` when given (the dtype :meth:`features` was asked for)."""
        if self._catalogue is None:
            size = self.image_size or 32
            pixels = torch.zeros(1, self.image_channels, size, size, device=self.device)
            conditioning = self.conditioning
            with torch.inference_mode(), autocast_to(self.device, dtype):
                trace = trace_forward(
                    self.denoiser,
                    self._encode(pixels),
                    0,
                    candidate_layers(self.denoiser),
                    stop_after=self.last_layer,
                    conditioning=conditioning,
                )
            self._catalogue = [
                LayerInfo(name, index, tuple(trace.outputs[name].shape[1:])) for index, name in enumerate(trace.order)
            ]
        return self._catalogue

    def layer_names(self) -> list[str]:
        """Capturable layer names in execution order."""
        return [info.name for info in self.layers]

    def default_layer(self) -> str:
        """A good single feature layer of this family: the middle of the UNet decoder (``up_blocks.1.resnets.2``
        for the 35.7M DDPM and SD 1.x/2.x), the middle transformer block, Flux's last double-stream block; for a
        truncated denoiser its ``last_layer``."""
        return self.last_layer or self.family.default_layer(self.denoiser)

    def layer_info(self, name: str) -> LayerInfo:
        return {info.name: info for info in self.layers}[self.check_layers([name])[0]]

    def check_layers(self, layers: str | Sequence[str]) -> list[str]:
        """Validates layer names; returns them deduplicated, in execution order."""
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise UsageError("No layers requested: pass at least one name from backbone.layer_names().")
        index = {info.name: info.index for info in self.layers}
        for name in layers:
            if name not in index:
                close = difflib.get_close_matches(name, index, n=5, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise UsageError(
                    f"Unknown layer {name!r} for {type(self.denoiser).__name__}.{hint} "
                    "See backbone.layer_names() for all of them."
                )
        return sorted(set(layers), key=index.__getitem__)

    def check_timesteps(self, timesteps: NoiseLevel | Sequence[NoiseLevel]) -> list[NoiseLevel]:
        """Validates noise levels in the model's units: DDPM timestep indices (ints) or EDM sigmas (floats)."""
        return self.noise_axis.check_levels(timesteps)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validates a (B, C, H, W) float batch in [-1, 1]; returns it on the backbone's device."""
        images = check_image_batch(images, self.image_channels, self.image_size)
        return images.to(self.device, torch.float32)

    # ------------------------------------------------------------------ capture
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 pixels -> the denoiser's clean input (latents times scaling factor for a VAE), float32
        on the backbone's device."""
        if self.vae is None:
            return images
        return encode_latents(self.vae, images).to(self.device, torch.float32)

    def encode(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, C, H, W) float pixels in [-1, 1] -> the denoiser's clean input, float32 on the backbone's device: the
        (B, c, H/f, W/f) latents times the scaling factor of a latent model, the pixels themselves otherwise.

        The VAE runs under autocast to ``dtype`` as in :meth:`features`, so ``features(latents=encode(x, dtype),
        dtype=dtype)`` is ``features(x, dtype=dtype)`` bit for bit: encoded latents can be stored and reused."""
        images = self.check_images(images)
        with torch.inference_mode(), autocast_to(self.device, dtype):
            return self._encode(images)

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Validates a (B, c, h, w) float batch of :meth:`encode` outputs; returns it float32 on the device."""
        channels = int(self.vae.config.latent_channels) if self.vae is not None else self.image_channels
        size = sample_size(self.denoiser.config)
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim != 4:
            raise UsageTypeError("latents must be a (B, c, h, w) float tensor: the output of backbone.encode(images).")
        if latents.shape[0] == 0 or latents.shape[1] != channels or (
            size is not None and tuple(latents.shape[-2:]) != (size, size)
        ):
            expected = f"(B, {channels}, {size}, {size})" if size is not None else f"(B, {channels}, h, w)"
            raise UsageError(
                f"latents have shape {tuple(latents.shape)}, the model takes {expected}: pass backbone.encode(images)."
            )
        return latents.to(self.device, torch.float32)

    def features(
        self,
        images: torch.Tensor | None,
        layers: str | Sequence[str],
        timesteps: NoiseLevel | Sequence[NoiseLevel],
        pooling: Pooling = "avg",
        seed: int = 0,
        example_ids: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        upsample: bool = False,
        ensemble: int = 1,
        levels_per_forward: int = 1,
        latents: torch.Tensor | None = None,
    ) -> dict[tuple[str, NoiseLevel], torch.Tensor]:
        """Pooled, dense or raw activations of ``layers`` at each noise level of ``timesteps``.

        Args:
            images: (B, C, H, W) float tensor in [-1, 1]; None when ``latents`` are given.
            layers: block names from :meth:`layer_names`.
            timesteps: noise levels in the model's units: DDPM diffusers indices 0..T-1 (paper t=11 is t=10),
                EDM or flow-matching sigmas (floats, e.g. 0.06).
            pooling: ``"avg"`` -> (B, C) / (B, D); ``"spatial"`` -> (B, C, h, w) maps at the block's native
                resolution (transformer tokens reshaped to their latent grid); ``None`` -> the raw output,
                (B, C, h, w) or (B, N, D).
            seed, example_ids: the noise of example ``example_ids[i]`` (default ``i``) is drawn
                from (seed, id), so results do not depend on batching or sharding.
            dtype: autocast dtype, e.g. ``torch.bfloat16`` (faster on CPUs with bf16 instructions and on GPUs); on
                the backbone's execution device. Noise is added in float32 whatever the weights' dtype; the noisy
                input is cast to the denoiser's dtype for its forward.
            upsample: with ``pooling="spatial"``, resize the maps bilinearly to the image size (H, W).
            ensemble: average the features of this many noise draws per image (DIFT's ensemble); draw 0 is the
                usual noise, draw k >= 1 comes from ``(derive_seed(seed, 7, k), id)``: deterministic per seed and
                independent of the batch size.
            levels_per_forward: run this many noise levels of the batch as one forward of ``B x k`` inputs (the
                same features; whether it is faster depends on the model and hardware, see docs/benchmarks.md).
            latents: instead of ``images``, their :meth:`encode` (B, c, h, w) under the same ``dtype``: the same
                features without running the VAE again.

        Returns ``{(layer, t): float32 tensor}``.
        """
        self._layer_catalogue(dtype)
        layers = self.check_layers(layers)
        timesteps = self.check_timesteps(timesteps)
        if pooling not in POOLINGS:
            raise UsageError(f"Unknown pooling {pooling!r}: use one of {POOLINGS}.")
        if upsample and pooling != "spatial":
            raise UsageError("upsample=True resizes dense maps: pass pooling='spatial' with it.")
        if not isinstance(ensemble, int) or ensemble < 1:
            raise UsageError(f"ensemble must be an integer >= 1 (noise draws per image), got {ensemble!r}.")
        if not isinstance(levels_per_forward, int) or levels_per_forward < 1:
            raise UsageError(f"levels_per_forward must be an integer >= 1, got {levels_per_forward!r}.")
        if (images is None) == (latents is None):
            raise UsageError("Pass either images or latents (their backbone.encode), not both or neither.")
        if latents is None:
            images = self.check_images(images)
            batch, image_hw = images.shape[0], tuple(images.shape[-2:])
        else:
            latents = self.check_latents(latents)
            batch, image_hw = latents.shape[0], tuple(side * self.vae_scale for side in latents.shape[-2:])
        if example_ids is None:
            example_ids = range(batch)
        example_ids = [int(i) for i in example_ids]
        if len(example_ids) != batch:
            raise UsageError(f"{len(example_ids)} example_ids for a batch of {batch} images.")

        conditioning = self.conditioning
        hook_pooling = "avg" if pooling == "avg" else None  # pooled in the hook: no layer's raw maps are kept
        results: dict[tuple[str, NoiseLevel], torch.Tensor] = {}
        with torch.inference_mode(), autocast_to(self.device, dtype):
            clean = self._encode(images) if latents is None else latents
            for draw in range(ensemble):
                draw_seed = seed if draw == 0 else derive_seed(seed, _ENSEMBLE_STREAM, draw)
                noise = example_noise(clean.shape[1:], example_ids, draw_seed)
                for start in range(0, len(timesteps), levels_per_forward):
                    group = timesteps[start : start + levels_per_forward]
                    inputs = [self.noise_axis.network_inputs(clean, noise, t) for t in group]
                    captured = capture_activations(
                        self.denoiser,
                        torch.cat([x for x, _ in inputs]),
                        torch.cat([s for _, s in inputs]),
                        layers,
                        stop_after=layers[-1],
                        conditioning=_tiled(conditioning, len(clean), len(group)),
                        pooling=hook_pooling,
                    )
                    for layer in layers:
                        for t, activation in zip(group, captured[layer].split(len(clean)), strict=True):
                            value = self._shape(activation, pooling, clean.shape[-2:], image_hw, upsample)
                            results[layer, t] = value if draw == 0 else results[layer, t] + value
        if ensemble > 1:
            results = {key: value / ensemble for key, value in results.items()}
        _check_finite_features(results, example_ids)
        return results

    def _shape(
        self,
        activation: torch.Tensor,
        pooling: Pooling,
        latent_hw: Sequence[int],
        image_hw: Sequence[int],
        upsample: bool,
    ) -> torch.Tensor:
        """One block's output in the requested form, float32 (see :meth:`features`): ``"avg"`` outputs come
        already pooled from the capture hook."""
        if pooling != "spatial":
            return activation.float()
        if activation.ndim == 3:
            activation = tokens_to_map(activation, *self.family.token_grid(self.denoiser, *latent_hw))
        activation = activation.float()
        if upsample:
            activation = F.interpolate(activation, size=tuple(image_hw), mode="bilinear", align_corners=False)
        return activation
