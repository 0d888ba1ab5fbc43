"""The capture core: intermediate activations of a diffusers denoiser at a noise timestep.

``DDAEBackbone`` pairs a denoiser (``UNet2DModel`` or ``DiTTransformer2DModel``) with its
noise scheduler (and, for latent models, an ``AutoencoderKL``). ``features()`` noises
clean images with ``scheduler.add_noise`` at each timestep, runs one forward per timestep
with forward hooks on every requested block, stops right after the deepest one and
pools. Nothing here copies a diffusers ``forward()``: hooks work on any version.

Timesteps are diffusers scheduler indices ``0 .. num_train_timesteps - 1``; the DDAE
paper counts from 1, so its t=11 is our t=10.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, SchedulerMixin, UNet2DModel

from .errors import UsageError, UsageTypeError
from .loading import check_source
from .presets import DENOISER_CLASSES

Denoiser = UNet2DModel | DiTTransformer2DModel
Pooling = str | None

_UNET_LAYER = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(\.(resnets|attentions)\.\d+)?$"
)
_DIT_LAYER = re.compile(r"^transformer_blocks\.\d+$")
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


# Legacy class names that diffusers remaps on load (facebook/DiT-XL-2-256 records Transformer2DModel).
_LOADABLE_DENOISER_NAMES = (*DENOISER_CLASSES, "Transformer2DModel")


def _unsupported_denoiser(class_name: str | None) -> TypeError:
    return TypeError(f"Unsupported denoiser {class_name}: ddae_diffusers supports {', '.join(DENOISER_CLASSES)}.")


def check_denoiser(denoiser: object) -> None:
    """Raises ``TypeError`` unless ``denoiser`` is a supported diffusers class."""
    if not isinstance(denoiser, tuple(DENOISER_CLASSES.values())):
        raise _unsupported_denoiser(type(denoiser).__name__)


def candidate_layers(denoiser: Denoiser) -> list[str]:
    """Module paths of every block whose output can be captured (registration order)."""
    pattern = _DIT_LAYER if isinstance(denoiser, DiTTransformer2DModel) else _UNET_LAYER
    return [name for name, _ in denoiser.named_modules() if pattern.match(name)]


def _first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    # UNet down blocks return (hidden_states, residuals); everything else returns a tensor.
    return output[0] if isinstance(output, tuple) else output


def denoiser_kwargs(denoiser: Denoiser, batch_size: int, device: torch.device) -> dict:
    """Extra forward arguments: DiT always gets the null class id (its forward fails on ``None``)."""
    if isinstance(denoiser, DiTTransformer2DModel):
        null_class = denoiser.config.num_embeds_ada_norm
        return {"class_labels": torch.full((batch_size,), null_class, dtype=torch.long, device=device)}
    return {}


def capture_activations(
    denoiser: Denoiser,
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    layers: Sequence[str],
    stop_after: str | None = None,
) -> dict[str, torch.Tensor]:
    """Runs ``denoiser(sample, timestep)`` and returns the outputs of ``layers``.

    ``sample``: (B, C, H, W) noisy input. The forward stops right after ``stop_after``
    (a name in ``layers``) when given. Autograd is left intact, so this also serves
    fine-tuning. Returns ``{layer: (B, C, h, w) or (B, N, D)}``.
    """
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            captured[name] = _first_tensor(output)
            if name == stop_after:
                raise _StopForward

        return hook

    handles = [denoiser.get_submodule(name).register_forward_hook(make_hook(name)) for name in layers]
    timestep = torch.as_tensor(timestep, device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    try:
        denoiser(sample, timestep, **denoiser_kwargs(denoiser, sample.shape[0], sample.device))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def pool_activation(activation: torch.Tensor, pooling: Pooling = "avg") -> torch.Tensor:
    """(B, C, H, W) maps -> (B, C) by global average pooling; (B, N, D) tokens -> (B, D) by mean."""
    if pooling is None:
        return activation
    if pooling != "avg":
        raise UsageError(f"Unknown pooling {pooling!r}: use 'avg' or None.")
    return activation.mean(dim=(2, 3)) if activation.ndim == 4 else activation.mean(dim=1)


def example_noise(
    shape: Sequence[int], example_ids: Iterable[int], seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian noise of shape (B, *shape), one generator per example seeded by (seed, id).

    The noise of an example depends only on its id and the seed, never on the batch it is in.
    """
    rows = []
    for example_id in example_ids:
        state = np.random.SeedSequence([int(seed), int(example_id)]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        rows.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(rows).to(dtype)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class DDAEBackbone:
    """A diffusers denoiser with its noise scheduler (and VAE for latent models), ready to capture.

    Args:
        denoiser: a ``UNet2DModel`` (pixel DDPM) or ``DiTTransformer2DModel`` (latent or pixel).
        scheduler: the noise scheduler used for ``add_noise``; default ``DDPMScheduler()``
            (1000 steps, linear betas 1e-4..0.02, as google/ddpm-cifar10-32).
        vae: an ``AutoencoderKL`` for latent models; images are encoded to
            ``latent_dist.mean * scaling_factor`` before noising.

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
    ):
        check_denoiser(denoiser)
        if scheduler is not None and not hasattr(scheduler, "add_noise"):
            raise UsageTypeError(f"{type(scheduler).__name__} has no add_noise(); pass a DDPM-style scheduler.")
        self.denoiser = denoiser
        self.scheduler = scheduler if scheduler is not None else DDPMScheduler()
        self.vae = vae
        self._catalogue: list[LayerInfo] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, **hub_kwargs) -> DDAEBackbone:
        """Loads a diffusers pipeline folder or repo (``model_index.json`` with ``unet`` or
        ``transformer``, ``scheduler``, optional ``vae``) or a bare model folder (``config.json``
        of a supported class; the scheduler is then ``DDPMScheduler()``)."""
        import diffusers

        path_or_hub_id = check_source(os.fspath(path_or_hub_id), "model")
        model_index = read_root_json(path_or_hub_id, "model_index.json", **hub_kwargs)
        if model_index is not None:
            # Optional components saved as None (DDAEPipeline) are recorded as [null, null].
            denoiser_key = next((k for k in ("unet", "transformer") if model_index.get(k, [None])[0]), None)
            if denoiser_key is None:
                raise UsageError(
                    f"{path_or_hub_id}/model_index.json has no 'unet' or 'transformer' component."
                )

            def component(key: str):
                library, class_name = model_index[key]
                if library != "diffusers" or not hasattr(diffusers, class_name):
                    raise UsageTypeError(
                        f"Component {key!r} is {library}.{class_name}; ddae_diffusers supports "
                        f"{', '.join(DENOISER_CLASSES)} with a diffusers scheduler."
                    )
                return getattr(diffusers, class_name).from_pretrained(
                    path_or_hub_id, subfolder=key, **hub_kwargs
                )

            if model_index[denoiser_key][1] not in _LOADABLE_DENOISER_NAMES:
                raise _unsupported_denoiser(model_index[denoiser_key][1])
            denoiser = component(denoiser_key)
            scheduler = component("scheduler") if model_index.get("scheduler", [None])[0] else None
            vae = component("vae") if model_index.get("vae", [None])[0] else None
            return cls(denoiser, scheduler, vae)

        config = read_root_json(path_or_hub_id, "config.json", **hub_kwargs)
        if config is None:
            raise UsageError(
                f"{path_or_hub_id!r} holds no diffusers config: expected a pipeline folder with "
                "model_index.json or a model folder with config.json."
            )
        class_name = config.get("_class_name")
        if class_name not in _LOADABLE_DENOISER_NAMES:
            raise _unsupported_denoiser(class_name)
        return cls(getattr(diffusers, class_name).from_pretrained(path_or_hub_id, **hub_kwargs))

    def to(self, device: torch.device | str) -> DDAEBackbone:
        """Moves the denoiser (and VAE) to ``device``; returns self."""
        self.denoiser.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def image_channels(self) -> int:
        """Channels of the clean images this backbone takes (3 for RGB)."""
        return int(self.vae.config.in_channels if self.vae is not None else self.denoiser.config.in_channels)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int | None:
        """Image side in pixels the denoiser was built for (None if a UNet has no ``sample_size``)."""
        size = self.denoiser.config.sample_size
        if size is None:
            return None
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale

    # ------------------------------------------------------------------ catalogue
    @property
    def layers(self) -> list[LayerInfo]:
        """Every capturable block in execution order with its output shape (traced once)."""
        if self._catalogue is None:
            size = self.image_size or 32
            dummy = torch.zeros(1, self.image_channels, size, size, device=self.device, dtype=self.denoiser.dtype)
            names = candidate_layers(self.denoiser)
            order: list[str] = []

            def make_hook(name: str):
                def hook(module, inputs, output):
                    order.append(name)

                return hook

            handles = [self.denoiser.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
            try:
                with torch.inference_mode():
                    outputs = capture_activations(
                        self.denoiser, self._encode(dummy), 0, names, stop_after=None
                    )
            finally:
                for handle in handles:
                    handle.remove()
            self._catalogue = [
                LayerInfo(name, index, tuple(outputs[name].shape[1:])) for index, name in enumerate(order)
            ]
        return self._catalogue

    def layer_names(self) -> list[str]:
        """Capturable layer names in execution order."""
        return [info.name for info in self.layers]

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

    def check_timesteps(self, timesteps: int | Sequence[int]) -> list[int]:
        """Validates diffusers timestep indices (0..num_train_timesteps-1)."""
        timesteps = [timesteps] if isinstance(timesteps, (int, np.integer)) else list(timesteps)
        if not timesteps:
            raise UsageError("No timesteps requested: pass at least one, e.g. timesteps=[10].")
        for t in timesteps:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.num_train_timesteps:
                raise UsageError(
                    f"Timestep {t!r} is out of range: use integer diffusers indices 0..{self.num_train_timesteps - 1} "
                    "(the DDAE paper's t=11 is diffusers t=10)."
                )
        return [int(t) for t in timesteps]

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validates a (B, C, H, W) float batch in [-1, 1]; returns it on the backbone's device."""
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
        if images.shape[1] != self.image_channels:
            raise UsageError(
                f"images have {images.shape[1]} channels but the model takes {self.image_channels}: "
                "convert them (DDAEImageProcessor turns grayscale into RGB)."
            )
        height, width = images.shape[-2:]
        if self.image_size is not None and (height, width) != (self.image_size, self.image_size):
            raise UsageError(
                f"images are {height}x{width} but the model takes {self.image_size}x{self.image_size}: "
                f"resize them (DDAEImageProcessor(size={self.image_size}))."
            )
        low, high = images.min().item(), images.max().item()
        if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise UsageError(
                f"images range over [{low:.3g}, {high:.3g}] but must be in [-1, 1]: "
                "preprocess them with ddae_diffusers.DDAEImageProcessor (or images * 2 - 1 for [0, 1] inputs)."
            )
        return images.to(self.device, torch.float32)

    # ------------------------------------------------------------------ capture
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> the denoiser's clean input (latents times scaling factor for a VAE)."""
        if self.vae is None:
            return images
        latents = self.vae.encode(images).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def noisy_inputs(
        self, images: torch.Tensor, timestep: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """``scheduler.add_noise`` of clean denoiser inputs at one timestep: (B, C, h, w)."""
        t = torch.full((images.shape[0],), timestep, dtype=torch.long, device=images.device)
        return self.scheduler.add_noise(images, noise.to(images.device, images.dtype), t)

    def features(
        self,
        images: torch.Tensor,
        layers: str | Sequence[str],
        timesteps: int | Sequence[int],
        pooling: Pooling = "avg",
        seed: int = 0,
        example_ids: Sequence[int] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Pooled (or raw) activations of ``layers`` at each of ``timesteps``.

        Args:
            images: (B, C, H, W) float tensor in [-1, 1].
            layers: block names from :meth:`layer_names`.
            timesteps: diffusers indices 0..T-1 (paper t=11 is t=10).
            pooling: ``"avg"`` -> (B, C) / (B, D); ``None`` -> (B, C, h, w) / (B, N, D).
            seed, example_ids: the noise of example ``example_ids[i]`` (default ``i``) is drawn
                from (seed, id), so results do not depend on batching or sharding.
            dtype: autocast dtype, e.g. ``torch.bfloat16`` (faster on CPUs with bf16 instructions and on GPUs).

        Returns ``{(layer, t): float32 tensor}``.
        """
        layers = self.check_layers(layers)
        timesteps = self.check_timesteps(timesteps)
        if pooling not in ("avg", None):
            raise UsageError(f"Unknown pooling {pooling!r}: use 'avg' or None.")
        images = self.check_images(images)
        if example_ids is None:
            example_ids = range(images.shape[0])
        example_ids = [int(i) for i in example_ids]
        if len(example_ids) != images.shape[0]:
            raise UsageError(f"{len(example_ids)} example_ids for a batch of {images.shape[0]} images.")

        results: dict[tuple[str, int], torch.Tensor] = {}
        with torch.inference_mode(), _autocast(self.device, dtype):
            clean = self._encode(images).float()
            noise = example_noise(clean.shape[1:], example_ids, seed)
            for t in timesteps:
                noisy = self.noisy_inputs(clean, t, noise)
                captured = capture_activations(self.denoiser, noisy, t, layers, stop_after=layers[-1])
                for layer in layers:
                    results[layer, t] = pool_activation(captured[layer], pooling).float()
        return results


def read_root_json(path_or_hub_id: str, filename: str, **hub_kwargs) -> dict | None:
    """The JSON ``filename`` at the root of a folder or Hub repo, or None if it is not there."""
    if os.path.isdir(path_or_hub_id):
        path = os.path.join(path_or_hub_id, filename)
        if not os.path.isfile(path):
            return None
    elif os.path.exists(path_or_hub_id):
        raise UsageError(f"{path_or_hub_id!r} is a file: pass the folder that holds the diffusers config.")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            path = hf_hub_download(path_or_hub_id, filename, **hub_kwargs)
        except LocalEntryNotFoundError:
            raise UsageError(
                f"{path_or_hub_id!r} is not a local folder, and as a Hub repo it is neither reachable nor cached: "
                "go online (or fill the cache), or pass a local folder."
            ) from None
        except RepositoryNotFoundError:
            raise UsageError(
                f"There is no Hub repo {path_or_hub_id!r} (or it is private or gated): check the name, or log in "
                "with `hf auth login`."
            ) from None
        except EntryNotFoundError:
            return None
    with open(path) as f:
        return json.load(f)
