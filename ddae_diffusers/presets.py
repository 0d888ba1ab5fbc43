"""Named denoiser architectures for pretraining a DDAE (``--model_config <preset>``).

Every preset is a plain diffusers config dict; :func:`build_denoiser` turns a name or a
``config.json`` path into a randomly initialised model.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from diffusers import DiTTransformer2DModel, UNet2DModel

from .errors import UsageError
from .families import family_named

# The google/ddpm-cifar10-32 UNet (35.7M parameters, identical to DDAE's CIFAR-10 DDPM),
# with the dropout of 0.1 that the original model was trained with.
_DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": None,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
    "dropout": 0.1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "ddpm-cifar10-32": _DDPM_CIFAR10_32,
    # CPU-sized UNets with the same block pattern: attention at 16x16 only.
    "ddpm-tiny": {
        **_DDPM_CIFAR10_32,
        "block_out_channels": [32, 64, 128],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 16,
    },
    "ddpm-small": {
        **_DDPM_CIFAR10_32,
        "block_out_channels": [64, 128, 128],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
    },
    # DiT-S/2 in pixel space for 32x32 images; unconditional (one class, always the null id).
    "dit-s-2": {
        "_class_name": "DiTTransformer2DModel",
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "patch_size": 2,
        "num_layers": 12,
        "num_attention_heads": 6,
        "attention_head_dim": 64,
        "num_embeds_ada_norm": 1,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "dropout": 0.0,
    },
}

def load_model_config(name_or_path: str) -> dict[str, Any]:
    """Returns a copy of the preset ``name_or_path`` or the dict in that ``config.json`` file."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    if os.path.isdir(name_or_path):
        name_or_path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(name_or_path):
        raise UsageError(
            f"Unknown model config {name_or_path!r}: give a preset name ({', '.join(PRESETS)}) "
            "or the path of a diffusers config.json."
        )
    with open(name_or_path) as f:
        return json.load(f)


def build_denoiser(name_or_path: str | dict[str, Any]) -> UNet2DModel | DiTTransformer2DModel:
    """Builds a randomly initialised denoiser from a preset name, a config path or a config dict."""
    config = load_model_config(name_or_path) if isinstance(name_or_path, str) else dict(name_or_path)
    return family_named(config.get("_class_name", "UNet2DModel")).model_class.from_config(config)
