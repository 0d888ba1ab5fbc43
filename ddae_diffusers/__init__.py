"""ddae-diffusers: diffusion models as self-supervised image representation learners."""

from .capture import DDAEBackbone, LayerInfo, capture_activations, example_noise, pool_activation
from .configuration_ddae import DDAEConfig
from .image_processing_ddae import DDAEImageProcessor
from .modeling_ddae import DDAEForImageClassification
from .presets import PRESETS, build_denoiser
from .probing import ProbeConfig, run_probe


def _register_auto_classes() -> None:
    """Lets AutoConfig / AutoModelForImageClassification / AutoImageProcessor resolve model_type "ddae"."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    AutoConfig.register("ddae", DDAEConfig, exist_ok=True)
    AutoModelForImageClassification.register(DDAEConfig, DDAEForImageClassification, exist_ok=True)
    AutoImageProcessor.register(DDAEConfig, DDAEImageProcessor, exist_ok=True)


_register_auto_classes()

# Last: the pipeline imports the modules above (never this package's namespace), so no import cycle.
from .pipelines import DDAEPipeline  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DDAEBackbone",
    "DDAEConfig",
    "DDAEForImageClassification",
    "DDAEImageProcessor",
    "DDAEPipeline",
    "LayerInfo",
    "PRESETS",
    "ProbeConfig",
    "build_denoiser",
    "capture_activations",
    "example_noise",
    "pool_activation",
    "run_probe",
]
