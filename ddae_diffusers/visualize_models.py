"""A model folder or Hub id loaded for pictures: a diffusers denoiser, or a ``DDAEForImageClassification`` with its
prediction (see :mod:`ddae_diffusers.visualize`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image

from .capture import DDAEBackbone
from .errors import UsageError
from .visualize_common import ImagesLike, as_pixels


@dataclass
class LoadedModel:
    """A model folder or Hub id ready for pictures: its ``backbone`` and, for a ``DDAEForImageClassification``
    folder, the ``classifier`` (whose backbone stops at its feature layer: ``backbone.layer_names()`` lists the
    blocks it keeps)."""

    source: str
    backbone: DDAEBackbone
    classifier: object | None = None

    def predict(self, images: ImagesLike, top: int = 3) -> list[list[tuple[str, float]]]:
        """(label, probability) of the ``top`` classes of each image, best first; only for a classifier."""
        if self.classifier is None:
            raise UsageError(f"{self.source} is not a classifier: load a DDAEForImageClassification folder.")
        pixels = as_pixels(self.backbone, images)
        with torch.inference_mode():
            probabilities = self.classifier(pixels).logits.softmax(-1)
        values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
        names = self.classifier.config.id2label
        return [[(names[int(i)], float(v)) for v, i in zip(vs, ix, strict=True)] for vs, ix in zip(values, indices,
                                                                                                   strict=True)]


def load_model(source: str) -> LoadedModel:
    """A diffusers pipeline / model folder or Hub id (:meth:`DDAEBackbone.from_pretrained`) or a
    ``DDAEForImageClassification`` folder; a ``UsageError`` for anything else."""
    from .loading import check_source, read_root_json

    if not isinstance(source, str) or not source.strip():
        raise UsageError("Give a model folder or Hub id (e.g. examples/ddae-cifar10-cpu).")
    source = check_source(source.strip(), "model")
    config = read_root_json(source, "config.json")
    if config is not None and config.get("model_type") == "ddae":
        from .modeling_ddae import DDAEForImageClassification

        classifier = DDAEForImageClassification.from_pretrained(source).eval()
        backbone = DDAEBackbone(
            classifier.denoiser, classifier.noise_scheduler, classifier.vae, last_layer=classifier.feature_layer
        )
        return LoadedModel(source, backbone, classifier)
    return LoadedModel(source, DDAEBackbone.from_pretrained(source))


def default_picks(backbone: DDAEBackbone) -> list[str]:
    """Up to three layers to look at first: for a UNet the middle resnet of the encoder, the last resnet of the mid
    block and the middle resnet of the decoder (those it has); for a transformer the blocks at 1/4, 1/2 and 3/4."""
    names = backbone.layer_names()
    resnets = [name for name in names if ".resnets." in name]
    if resnets:
        down = [n for n in resnets if n.startswith("down_blocks.")]
        mid = [n for n in resnets if n.startswith("mid_block.")]
        up = [n for n in resnets if n.startswith("up_blocks.")]
        picks = [group[len(group) // 2] for group in (down, up) if group]
        if mid:
            picks.insert(1 if down else 0, mid[-1])
        return picks
    return list(dict.fromkeys(names[len(names) * i // 4] for i in (1, 2, 3)))


def probe_pictures(folder: str) -> tuple[list[tuple[Image.Image, str]], str]:
    """The heatmaps of a ``ddae-probe`` output folder as ``[(image, caption)]`` and a Markdown line on its best
    cell; a ``UsageError`` if ``folder`` is not a probe folder."""
    from .probing.result import ProbeResult

    if not isinstance(folder, str) or not os.path.isdir(folder.strip()):
        raise UsageError(f"{folder!r} is not a folder: give a ddae-probe output folder (with results.json).")
    folder = folder.strip()
    result = ProbeResult.load(folder)
    pictures = []
    for name, caption in (("heatmap.png", "linear probe accuracy"), ("knn_heatmap.png", "kNN accuracy")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with Image.open(path) as image:
                pictures.append((image.convert("RGB"), caption))
    best = result.best
    summary = (f"**{result.model}** on {result.dataset}: best cell **{best.layer} @ t={best.timestep}**, linear "
               f"{100 * best.linear_acc:.2f}%, kNN {100 * best.knn_acc:.2f}% ({result.num_eval} test images).")
    return pictures, summary


__all__ = ["LoadedModel", "default_picks", "load_model", "probe_pictures"]
