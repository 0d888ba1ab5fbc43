"""Alignment and uniformity (Wang and Isola): the formulas, and ``ddae-probe --alignment`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import CIFAR10_SAMPLE

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import pixels_of
from ddae_diffusers.probing.cache import PAIR_VIEW, View
from ddae_diffusers.probing.cli import main as probe_main
from ddae_diffusers.probing.geometry import alignment, uniformity


def test_formulas_on_known_configurations():
    x = torch.randn(6, 5)
    assert alignment(x, 3 * x) == pytest.approx(0, abs=1e-6)  # the same directions
    assert alignment(x, -x) == pytest.approx(4)  # opposite directions: ||2u||^2
    assert uniformity(torch.ones(4, 3)) == pytest.approx(0, abs=1e-6)  # one point: exp(0)
    assert uniformity(torch.eye(5)) == pytest.approx(-4)  # orthonormal: every squared distance is 2
    # against the definition, pair by pair
    y = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    pairs = [math.exp(-2 * float((y[i] - y[j]).pow(2).sum())) for i in range(7) for j in range(7) if i != j]
    assert uniformity(y) == pytest.approx(math.log(np.mean(pairs)), rel=1e-5)


def test_probe_measures_every_cell(tiny_unet_pipeline_dir, tmp_path):
    layers = ["mid_block.resnets.1", "up_blocks.1.resnets.1"]
    out = tmp_path / "probe"
    results = probe_main(["--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--max_train_samples", "60",
                          "--max_eval_samples", "20", "--layers", *layers, "--timesteps", "10", "400", "--epochs", "2",
                          "--lrs", "0.01", "--batch_size", "16", "--seed", "4", "--alignment", "--output_dir",
                          str(out)])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["alignment"] and "alignment" in saved["timings"]
    cells = {(c["layer"], c["timestep"]): c for c in saved["cells"]}
    for cell in cells.values():
        assert 0 <= cell["alignment"] <= 4 and cell["uniformity"] <= 0
    # an independent computation: the features of the 54 fit rows (60 minus 6 for validation) under the two noise
    # draws, straight from the backbone; the cache stores float16
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    rows = [i for i in range(60) if i not in set(_val_rows(60, 4))]
    import datasets

    images = datasets.load_dataset(CIFAR10_SAMPLE, split="train[:60]").select(rows)["img"]
    pixels = pixels_of(images, 16)
    first = backbone.features(pixels, layers, [400], seed=View(0, 0, False).noise_seed(4), example_ids=rows)
    second = backbone.features(pixels, layers, [400], seed=PAIR_VIEW.noise_seed(4), example_ids=rows)
    for layer in layers:
        a, b = first[layer, 400].half().float(), second[layer, 400].half().float()
        assert cells[layer, 400]["alignment"] == pytest.approx(alignment(a, b), rel=1e-4)
        assert cells[layer, 400]["uniformity"] == pytest.approx(uniformity(a), rel=1e-4)
    assert results.best.alignment is not None
    assert (out / "alignment_heatmap.png").is_file() and (out / "uniformity_heatmap.png").is_file()
    assert "## Alignment and uniformity" in (out / "results.md").read_text()


def _val_rows(num: int, seed: int) -> list[int]:
    """The validation rows ddae-probe holds out (a seeded permutation, a tenth)."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: max(1, round(0.1 * num))]
