"""Denoiser families: one small description per kind of diffusers denoiser.

A family says how to recognise the model (its class, and legacy names diffusers remaps on load), which of
its modules are layers and which extra forward arguments it needs (how inputs are noised depends on the
scheduler, not the family: see ``noise.py``). The
capture core, the loaders, the classifier and the pipeline ask the family; supporting a new kind of
denoiser is one new entry in ``FAMILIES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn

from .errors import UsageTypeError

ForwardKwargs = Callable[[nn.Module, int, torch.device], dict]


def _no_kwargs(denoiser: nn.Module, batch_size: int, device: torch.device) -> dict:
    return {}


def _null_class_labels(denoiser: nn.Module, batch_size: int, device: torch.device) -> dict:
    """DiT's forward fails on ``class_labels=None``: an unconditional pass uses the null id."""
    null_class = denoiser.config.num_embeds_ada_norm
    return {"class_labels": torch.full((batch_size,), null_class, dtype=torch.long, device=device)}


def _middle_of_unet_decoder(denoiser: nn.Module) -> str:
    """The last resnet of the up-block before the middle resolution (``up_blocks.1.resnets.2``, the paper's
    ``out_6``, for the 35.7M DDPM)."""
    index = max(len(denoiser.up_blocks) // 2 - 1, 0)
    return f"up_blocks.{index}.resnets.{len(denoiser.up_blocks[index].resnets) - 1}"


def _middle_dit_block(denoiser: nn.Module) -> str:
    """Block ``num_layers // 2 - 1`` (13 of 28, as the paper's DiT-XL/2)."""
    return f"transformer_blocks.{max(denoiser.config.num_layers // 2 - 1, 0)}"


@dataclass(frozen=True)
class DenoiserFamily:
    """What the library needs to know about one diffusers denoiser class."""

    model_class: type[nn.Module]
    layer_pattern: re.Pattern[str]  # full module paths that count as layers
    default_layer: Callable[[nn.Module], str]  # a good single feature layer (middle of the decoder)
    component: str = "unet"  # its name in a pipeline's model_index.json
    forward_kwargs: ForwardKwargs = _no_kwargs  # extra arguments of an unconditional forward
    aliases: tuple[str, ...] = field(default=())  # legacy ``_class_name`` values loaded as this class

    @property
    def name(self) -> str:
        return self.model_class.__name__

    def layer_candidates(self, denoiser: nn.Module) -> list[str]:
        """Module paths of every block whose output can be captured (registration order)."""
        return [name for name, _ in denoiser.named_modules() if self.layer_pattern.match(name)]


UNET_2D = DenoiserFamily(
    UNet2DModel,
    re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(\.(resnets|attentions)\.\d+)?$"),
    _middle_of_unet_decoder,
)
DIT = DenoiserFamily(
    DiTTransformer2DModel,
    re.compile(r"^transformer_blocks\.\d+$"),
    _middle_dit_block,
    component="transformer",
    forward_kwargs=_null_class_labels,
    aliases=("Transformer2DModel",),  # facebook/DiT-XL-2-256 records the legacy name
)
FAMILIES: dict[str, DenoiserFamily] = {family.name: family for family in (UNET_2D, DIT)}
DENOISER_CLASSES: dict[str, type[nn.Module]] = {name: family.model_class for name, family in FAMILIES.items()}
SUPPORTED = ", ".join(FAMILIES)
DENOISER_COMPONENTS = tuple(dict.fromkeys(family.component for family in FAMILIES.values()))  # unet, transformer


def unsupported(class_name: str | None) -> UsageTypeError:
    return UsageTypeError(f"Unsupported denoiser {class_name}: ddae_diffusers supports {SUPPORTED}.")


def family_named(class_name: str | None) -> DenoiserFamily:
    """The family of a ``_class_name`` from a diffusers config (legacy aliases included)."""
    for family in FAMILIES.values():
        if class_name == family.name or class_name in family.aliases:
            return family
    raise unsupported(class_name)


def family_of(denoiser: object) -> DenoiserFamily:
    """The family of a denoiser instance; ``UsageTypeError`` naming the supported classes otherwise."""
    for family in FAMILIES.values():
        if isinstance(denoiser, family.model_class):
            return family
    raise unsupported(type(denoiser).__name__)


def sample_size(config) -> int | None:
    """The side of a config's ``sample_size`` (an int, a pair, or None)."""
    size = config.get("sample_size") if isinstance(config, dict) else getattr(config, "sample_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (list, tuple)) else size)
