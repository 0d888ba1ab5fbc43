"""The VAE-latent cache of latent models: encoded once per view, read back by every later pass, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_LATENT_DIT, make_tiny_dit, make_tiny_vae

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import pixels_of
from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.cache import FeatureCache, View
from ddae_diffusers.probing.loader import PlannedPixels

LAYERS = ["transformer_blocks.0", "transformer_blocks.1"]
RESOLUTION = 16  # 8x8 latents of the tiny VAE (scale factor 2)


@pytest.fixture(scope="module")
def latent_backbone():
    backbone = DDAEBackbone(make_tiny_dit(**TINY_LATENT_DIT), vae=make_tiny_vae())
    backbone.layer_names()  # the catalogue's trace (one zero image through the VAE) happens here, not in a test
    return backbone


@pytest.fixture(scope="module")
def cifar20(cifar_small):
    return cifar_small.select(range(20))


class EncoderCalls:
    """Counts the images that pass through the VAE's encoder (a forward hook)."""

    def __init__(self, vae):
        self.images = 0
        self.handle = vae.encoder.register_forward_hook(self._count)

    def _count(self, module, inputs, output):
        self.images += inputs[0].shape[0]


def _reference(backbone, dataset, view, timesteps, seed, ids):
    """The features computed straight from the images, as float16 (what the cache stores)."""
    pixels = view.pixels(dataset[ids]["img"], ids, RESOLUTION, seed)
    features = backbone.features(pixels, LAYERS, timesteps, seed=view.noise_seed(seed), example_ids=ids)
    return {key: value.half() for key, value in features.items()}


@pytest.mark.parametrize("view", [View(0, 0, False), View(0, 1, True)])
def test_latents_are_encoded_once_and_give_the_same_features(latent_backbone, cifar20, tmp_path, view):
    calls = EncoderCalls(latent_backbone.vae)
    try:
        cache = FeatureCache(str(tmp_path), latent_backbone, LAYERS, [10], RESOLUTION, seed=5)
        table = dict(cache.extract(cifar20, "train", "img", view, batch_size=8, progress=False))
        assert calls.images == len(cifar20)  # one encode per image
        expected = {}
        for first in range(0, 20, 8):  # the same batches as the cache's
            ids = list(range(first, min(first + 8, 20)))
            for key, value in _reference(latent_backbone, cifar20, view, [10], 5, ids).items():
                expected.setdefault(key, []).append(value)
        for key, parts in expected.items():
            assert torch.equal(table[key], torch.cat(parts)), key

        # a second pass over the view at other noise levels neither decodes nor encodes
        calls.images = 0
        original = PlannedPixels.__getitem__
        PlannedPixels.__getitem__ = lambda self, index: pytest.fail("the images were decoded again")
        try:
            other = dict(cache.with_timesteps([10, 50]).extract(cifar20, "train", "img", view, 8, progress=False))
        finally:
            PlannedPixels.__getitem__ = original
        assert calls.images == 0
        assert torch.equal(other[LAYERS[0], 10], table[LAYERS[0], 10])
        ids = list(range(8))
        reference = _reference(latent_backbone, cifar20, view, [50], 5, ids)
        assert torch.equal(other[LAYERS[1], 50][:8], reference[LAYERS[1], 50])
    finally:
        calls.handle.remove()


def test_latent_unit_is_keyed_by_the_vae_and_shared_across_denoisers(latent_backbone, cifar20, tmp_path):
    cache = FeatureCache(str(tmp_path), latent_backbone, LAYERS, [10], RESOLUTION, seed=5)
    view = View(0, 0, False)
    unit = cache.latent_unit(cifar20, "train", view, "img")
    assert unit.shape == (20, 4 * 8 * 8) and unit.dtype == torch.float32
    other_denoiser = DDAEBackbone(make_tiny_dit(seed=1, **TINY_LATENT_DIT), vae=latent_backbone.vae)
    other_cache = FeatureCache(str(tmp_path), other_denoiser, LAYERS, [10], RESOLUTION, seed=5)
    assert other_cache.latent_unit(cifar20, "train", view, "img").folder == unit.folder
    other_vae = DDAEBackbone(latent_backbone.denoiser, vae=make_tiny_vae(seed=1))
    assert FeatureCache(str(tmp_path), other_vae, LAYERS, [10], RESOLUTION, 5).latent_unit(
        cifar20, "train", view, "img").folder != unit.folder  # fmt: skip
    for changed in (View(0, 1, True), View(1, 0, False)):
        assert cache.latent_unit(cifar20, "train", changed, "img").folder != unit.folder
    assert FeatureCache(str(tmp_path), latent_backbone, LAYERS, [10], RESOLUTION, 5, torch.bfloat16).latent_unit(
        cifar20, "train", view, "img").folder != unit.folder  # fmt: skip


def test_a_damaged_latent_file_is_encoded_again(latent_backbone, cifar20, tmp_path):
    view = View(0, 0, False)
    cache = FeatureCache(str(tmp_path), latent_backbone, LAYERS, [10], RESOLUTION, seed=2)
    first = dict(cache.extract(cifar20, "train", "img", view, batch_size=8, progress=False))
    unit = cache.latent_unit(cifar20, "train", view, "img")
    with open(os.path.join(unit.folder, "features.npy"), "r+b") as f:  # flip bytes of the first rows
        f.seek(200)
        f.write(b"\x7f" * 64)
    calls = EncoderCalls(latent_backbone.vae)
    try:
        again = dict(cache.with_timesteps([25]).extract(cifar20, "train", "img", view, 8, progress=False))
    finally:
        calls.handle.remove()
    assert 0 < calls.images < len(cifar20)  # only the damaged range
    fresh = FeatureCache(str(tmp_path / "fresh"), latent_backbone, LAYERS, [25], RESOLUTION, seed=2)
    expected = dict(fresh.extract(cifar20, "train", "img", view, batch_size=8, progress=False))
    assert all(torch.equal(again[key], expected[key]) for key in expected)
    assert first[LAYERS[0], 10].isfinite().all()


def test_features_from_latents_match_features_from_images(latent_backbone, cifar20):
    pixels = pixels_of(cifar20[:4]["img"], RESOLUTION)
    latents = latent_backbone.encode(pixels)
    assert latents.shape == (4, 4, 8, 8) and latents.dtype == torch.float32
    direct = latent_backbone.features(pixels, LAYERS, [10], seed=1, pooling="spatial", upsample=True)
    reused = latent_backbone.features(None, LAYERS, [10], seed=1, latents=latents, pooling="spatial", upsample=True)
    assert all(torch.equal(direct[key], reused[key]) for key in direct)
    assert direct[LAYERS[0], 10].shape[-2:] == (RESOLUTION, RESOLUTION)
    with pytest.raises(UsageError, match="either images or latents"):
        latent_backbone.features(pixels, LAYERS, [10], latents=latents)
    with pytest.raises(UsageError, match="backbone.encode"):
        latent_backbone.features(None, LAYERS, [10], latents=pixels)
    assert np.isfinite(latents.numpy()).all()


TWO_RANKS = """
import sys

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from conftest import CIFAR10_SAMPLE, TINY_LATENT_DIT, make_tiny_dit, make_tiny_vae

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.probing.cache import FeatureCache, View

accelerator = Accelerator()
backbone = DDAEBackbone(make_tiny_dit(**TINY_LATENT_DIT), vae=make_tiny_vae())
dataset = datasets.load_dataset(CIFAR10_SAMPLE, split="train[:20]")
cache = FeatureCache(sys.argv[1], backbone, ["transformer_blocks.0", "transformer_blocks.1"], [10], 16, seed=5)
table = cache.extract(dataset, "train", "img", View(0, 1, True), batch_size=4, accelerator=accelerator,
                      progress=False)
if accelerator.is_main_process:
    np.save(sys.argv[1] + "/rows.npy", table.read(np.arange(20))["transformer_blocks.1", 10].numpy())
accelerator.end_training()
"""


def test_two_processes_share_the_encoding_and_give_the_same_features(latent_backbone, cifar20, tmp_path, monkeypatch):
    from device_harness import launch_two_processes

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    folder = tmp_path / "cache"
    folder.mkdir()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    done = launch_two_processes(str(script), str(folder), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = FeatureCache(str(tmp_path / "single"), latent_backbone, LAYERS, [10], RESOLUTION, seed=5)
    expected = single.extract(cifar20, "train", "img", View(0, 1, True), batch_size=4, progress=False)
    assert np.array_equal(np.load(folder / "rows.npy"), expected.read(np.arange(20))[LAYERS[1], 10].numpy())
    assert sum(name.startswith("latents-train-v1-") for name in os.listdir(folder)) == 1
