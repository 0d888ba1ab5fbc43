"""ddae-diffusers: diffusion models as self-supervised image representation learners."""

from .capture import DDAEBackbone, LayerInfo, capture_activations, example_noise, pool_activation
from .presets import PRESETS, build_denoiser

__version__ = "0.1.0"

__all__ = [
    "DDAEBackbone",
    "LayerInfo",
    "PRESETS",
    "build_denoiser",
    "capture_activations",
    "example_noise",
    "pool_activation",
]
