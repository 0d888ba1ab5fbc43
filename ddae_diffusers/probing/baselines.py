"""Baselines for the probe grid: the same denoiser at random initialisation, and raw pixels.

Both answer "what did diffusion pretraining add?" under the grid's exact protocol: same
images, splits, views, validation rows and head recipe.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..capture import DDAEBackbone
from .cache import View


def random_init(backbone: DDAEBackbone, seed: int) -> DDAEBackbone:
    """The same architecture (config, scheduler, VAE, text encoders) with freshly initialised denoiser weights.

    Initialisation is diffusers' own (``from_config``) under ``torch.manual_seed(seed)``.
    """
    denoiser = backbone.denoiser
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(denoiser).from_config(denoiser.config)
    fresh.to(denoiser.device)
    if fresh.dtype != denoiser.dtype:
        fresh.to(dtype=denoiser.dtype)
    return DDAEBackbone(fresh, backbone.scheduler, backbone.vae, text_components=backbone.text_components,
                        prompt_pipeline=backbone.prompt_pipeline)


def pixel_features(
    dataset,
    image_column: str,
    view: View,
    resolution: int,
    seed: int,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Flattened pixels of one view of a split: (N, 3 * R * R) in [-1, 1], crops/flips as in the grid (filled in
    place: memory holds one copy)."""
    pixels = torch.empty(len(dataset), 3 * resolution * resolution)
    for start in tqdm(range(0, len(dataset), batch_size), desc="raw pixels", disable=not progress):
        stop = min(start + batch_size, len(dataset))
        images = dataset[start:stop][image_column]
        pixels[start:stop] = view.pixels(images, range(start, stop), resolution, seed).flatten(1)
    return pixels


__all__ = ["random_init", "pixel_features"]
