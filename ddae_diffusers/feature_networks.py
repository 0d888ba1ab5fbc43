"""Feature networks of the generation scores: uint8 images in, one feature vector per image out.

Two kinds, both ``torch.nn.Module`` s that ``torchmetrics``' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` take as their ``feature``:

- :class:`InceptionFeatures`: the standard FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, 2048 pooled
  features). It needs the package ``torch-fidelity`` and its weights (downloaded once into the torch hub cache, or a
  local file); when either is missing :func:`load_feature_network` raises one ``UsageError`` saying what to do.
- :class:`ClassifierFeatures`: any ``AutoModelForImageClassification`` (folder or Hub id). Its features are the
  input of its final classification layer (the ``nn.Linear`` whose ``out_features`` is ``num_labels``), read by a
  forward pre-hook; images go through the model's own ``AutoImageProcessor``. Scores in its space are reported as
  ``FD_<name>`` / ``KD_<name>``, never FID.

Every network carries a ``name``, a ``num_features`` and a ``fingerprint`` (a hash of its weights and preprocessing)
that keys the cached reference statistics.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from .errors import UsageError

INCEPTION_NAME = "inception-v3-compat-2048"
INCEPTION_DIMS = 2048


class FeatureNetwork(torch.nn.Module):
    """Base of the feature networks: ``forward`` maps (B, 3, H, W) uint8 images to (B, D) float32 features."""

    name: str  # e.g. "inception-v3-compat-2048" or the classifier's folder name
    num_features: int  # D; torchmetrics reads it instead of running a dummy 299x299 image
    fingerprint: str  # sha256 of the weights and the preprocessing
    fd_name: str  # how a Frechet distance in this space is reported: "FID" or "FD_<name>"
    kd_name: str  # the kernel distance: "KID" or "KD_<name>"

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0  # images run through forward, for callers that report their work

    def train(self, mode: bool = True) -> FeatureNetwork:  # a frozen network: torchmetrics calls .train()
        return super().train(False)


def _weights_fingerprint(module: torch.nn.Module, extra: str) -> str:
    """sha256 over the class name, ``extra`` and every tensor of the state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(f"{type(module).__name__}\n{extra}\n".encode())
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class InceptionFeatures(FeatureNetwork):
    """The FID Inception-v3 of torchmetrics (torch-fidelity's TensorFlow-compatible port): (B, 2048) features."""

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_DIMS)],
            feature_extractor_weights_path=weights_path,
        )
        self.name, self.num_features = INCEPTION_NAME, INCEPTION_DIMS
        self.fd_name, self.kd_name = "FID", "KID"
        self.fingerprint = _weights_fingerprint(self.inception, INCEPTION_NAME)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 2048) float32 on the CPU (resized to 299x299 inside, on the network's device)."""
        device = next(self.inception.parameters()).device
        self.images_seen += len(images)
        return self.inception(images.to(device)).float().cpu()


def _final_linear(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear:
    """The classification layer of ``model``: the last ``nn.Linear`` with ``out_features == num_labels``."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise UsageError(
            f"{type(model).__name__} has no linear layer with out_features == num_labels ({num_labels}): its "
            "penultimate features cannot be found; pass another --feature_model."
        )
    return heads[-1]


class ClassifierFeatures(FeatureNetwork):
    """Penultimate features of an image classifier: the input of its final linear layer, (B, D) float32."""

    def __init__(self, model: torch.nn.Module, processor, name: str) -> None:
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.name = name
        self.fd_name, self.kd_name = f"FD_{name}", f"KD_{name}"
        self._head = _final_linear(model, int(model.config.num_labels))
        self.num_features = int(self._head.in_features)
        self.fingerprint = _weights_fingerprint(model, processor.to_json_string())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D) float32 on the CPU: the processor's resize/normalisation, then the captured
        input of the final linear layer (on the model's device). ``UsageError`` when that input is not one vector
        per image."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"Feature networks take (B, 3, H, W) uint8 images, got {tuple(images.shape)} "
                             f"{images.dtype}.")
        arrays = list(np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy()))
        pixel_values = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        parameter = next(self.model.parameters())
        captured: list[torch.Tensor] = []
        handle = self._head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.model(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].ndim != 2 or captured[0].shape[0] != len(images):
            shapes = [tuple(t.shape) for t in captured]
            raise UsageError(
                f"{self.name}: the input of its classification layer is {shapes or 'never reached'}, not one "
                f"({len(images)}, D) vector per image: pass a classifier whose head takes pooled features."
            )
        self.images_seen += len(images)
        return captured[0].float().cpu()


def _model_name(source: str) -> str:
    """A short name of a folder or Hub id: the last path part, e.g. ``cifar10-cpu-resnet``."""
    return os.path.basename(os.path.normpath(source)) or source


def load_classifier_features(source: str) -> ClassifierFeatures:
    """:class:`ClassifierFeatures` of an ``AutoModelForImageClassification`` folder or Hub id (``UsageError`` if
    it cannot be loaded as one, with its ``AutoImageProcessor``)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .loading import check_source

    source = check_source(source, "--feature_model")
    try:
        model = AutoModelForImageClassification.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(
            f"--feature_model {source!r} could not be loaded as an image classifier with its image processor "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}): pass a folder or Hub id of an "
            "AutoModelForImageClassification with a preprocessor_config.json."
        ) from None
    return ClassifierFeatures(model, processor, _model_name(source))


def load_inception(weights_path: str | None = None) -> InceptionFeatures:
    """:class:`InceptionFeatures`; ``UsageError`` when ``torch-fidelity`` is missing or the weights cannot be had."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception port lives there)
    except ImportError:
        raise UsageError(
            "FID needs the Inception-v3 of the package torch-fidelity, which is not installed: install it "
            "(pip install torch-fidelity; it needs torchvision) or score in the feature space of an image "
            "classifier with --feature_model (e.g. examples/cifar10-cpu-resnet), reported as FD_<name>."
        ) from None
    if weights_path is not None and not os.path.isfile(weights_path):
        raise UsageError(f"--inception_weights {weights_path!r} is not a file.")
    try:
        return InceptionFeatures(weights_path)
    except Exception as error:  # noqa: BLE001 - urllib, hash and unpickling errors all mean "no weights here"
        raise UsageError(
            f"Could not load the FID Inception-v3 weights ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}): go online once (torch-fidelity downloads them into the torch "
            "hub cache, TORCH_HOME), pass a local copy with --inception_weights, or pass --feature_model to score "
            "with an image classifier instead."
        ) from None


def check_feature_network(network: FeatureNetwork) -> FeatureNetwork:
    """``network`` after one dummy batch of two 32x32 images: ``UsageError`` unless it returns (2, num_features)
    finite vectors, so a network that returns no vector fails before any sampling."""
    if not isinstance(network, FeatureNetwork):
        raise UsageError(f"A feature network must be a FeatureNetwork, got {type(network).__name__}.")
    seen = network.images_seen
    features = network(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    network.images_seen = seen
    if not isinstance(features, torch.Tensor) or features.shape != (2, network.num_features):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UsageError(f"{network.name} returned {shape} for 2 images, not (2, {network.num_features}) feature "
                         "vectors: pass another --feature_model.")
    if not torch.isfinite(features).all():
        raise UsageError(
            f"{network.name} returned non-finite features for a blank image: pass another --feature_model."
        )
    return network


def load_feature_network(feature_model: str | None = None, inception_weights: str | None = None) -> FeatureNetwork:
    """The feature network of a score, checked (:func:`check_feature_network`): the FID Inception when
    ``feature_model`` is None, else that image classifier (folder or Hub id)."""
    network = load_inception(inception_weights) if feature_model is None else load_classifier_features(feature_model)
    return check_feature_network(network)


__all__ = [
    "ClassifierFeatures",
    "FeatureNetwork",
    "check_feature_network",
    "INCEPTION_NAME",
    "InceptionFeatures",
    "load_classifier_features",
    "load_feature_network",
    "load_inception",
]
