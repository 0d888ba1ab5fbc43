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

# EDM's CIFAR-10 DDPM++ (Karras et al. 2022; the DDAE paper's best model, 55.7M parameters in EDM) as closely
# as UNet2DModel expresses it: 128 x (2, 2, 2) channels, 4 blocks per level (5 in the decoder), one-head attention
# at 16x16, resnet up/down-sampling (2x2 average pool / nearest, the [1, 1] filter), dropout 0.13, positional noise
# embedding with EDM's frequencies (flip_sin_to_cos, freq_shift 1) and a 512-wide embedding MLP, GroupNorm eps 1e-6.
# Differences, all of UNet2DModel's making: conv_in goes straight to 256 channels (EDM: 128, then a block to 256),
# so the sinusoidal embedding has 256 channels (EDM: 128); resampling blocks have no 1x1 conv on the skip path;
# residual sums are scaled by 1/sqrt(2) in the mid block only (EDM: in every block); initialisation is PyTorch's
# default (EDM: Xavier-uniform, zero-initialised last convs). 57,183,491 parameters.
_DDPMPP_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [256, 256, 256],
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"],
    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "layers_per_block": 4,
    "attention_head_dim": None,
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 1,
    "time_embedding_type": "positional",
    "time_embedding_dim": 512,
    "mid_block_scale_factor": 2**0.5,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "dropout": 0.13,
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
    "ddpmpp-cifar10": _DDPMPP_CIFAR10,
    # The DDPM++ layout at CPU size (widths and depth of ddpm-tiny): trains as DDPM or EDM.
    "ddpmpp-tiny": {
        **_DDPMPP_CIFAR10,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "time_embedding_dim": 128,
        "norm_num_groups": 16,
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
