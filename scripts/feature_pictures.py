"""The figures of docs/visualize.md, from the shipped reference model and the embedded CIFAR-10 sample (offline).

    python scripts/feature_pictures.py [--model examples/ddae-cifar10-cpu] [--output_dir docs/images]

Writes ``visualize-pca-maps.png`` (PCA maps of five test images across encoder, bottleneck and decoder at
t = 0, 10, 100 and 400), ``visualize-neighbours.png`` (the nearest training images of the same five images at the
probe's best cell against raw pixels, among the sample's 5,000 training images) and
``visualize-correspondence.png`` (points of one horse matched in another). The training features take about 1.5
minutes on two CPU cores; ``--cache_dir`` keeps them for the next
run (and reads a ``ddae-probe --cache_dir`` folder that holds them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddae_diffusers.data import load_split  # noqa: E402
from ddae_diffusers.errors import run_command  # noqa: E402
from ddae_diffusers.visualize import (  # noqa: E402
    correspondences,
    default_picks,
    load_model,
    nearest_neighbours,
    pca_maps,
)

SAMPLE = str(ROOT / "data" / "cifar10-sample")
QUERIES = 5  # the first test images of the sample
LEVELS = [0, 10, 100, 400]
BEST_CELL = ("mid_block.resnets.1", 0)  # examples/ddae-cifar10-cpu-probe/results.md: best on validation
HORSES = (2, 3)  # two horse test images of the sample (rows of the test split)
CORRESPONDENCE_CELL = ("up_blocks.1.resnets.1", 10)


def save(image, path: Path) -> None:
    image = image.quantize(colors=256, method=0)  # median cut: a third of the bytes, no visible change at this size
    image.save(path, optimize=True)
    print(f"wrote {path} ({image.width}x{image.height}, {os.path.getsize(path) // 1024} KiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "examples" / "ddae-cifar10-cpu"))
    parser.add_argument("--output_dir", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--cache_dir", default=None, help="feature cache folder for the training features")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    backbone = load_model(args.model).backbone
    test = load_split(SAMPLE, "test", QUERIES)
    train = load_split(SAMPLE, "train")
    queries = list(test["img"])
    names = test.features["label"].names
    print("queries:", [names[label] for label in test["label"]])

    start = time.perf_counter()
    layers = default_picks(backbone)  # encoder, bottleneck, decoder
    maps = pca_maps(backbone, queries, layers, LEVELS)
    save(maps.figure, output / "visualize-pca-maps.png")
    print(f"PCA maps of {layers} at t={LEVELS}: {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    layer, level = BEST_CELL
    near = nearest_neighbours(backbone, queries, train, layer, level, k=5, cache_dir=args.cache_dir,
                              progress=lambda done, what: print(f"\r{what} {100 * done:.0f}%", end="", flush=True))
    print()
    save(near.figure, output / "visualize-neighbours.png")
    labels = near.labels
    for i, query in enumerate(test["label"]):
        same = [int(labels[j] == query) for j in near.indices[i]]
        same_pixels = [int(labels[j] == query) for j in near.pixel_indices[i]]
        print(f"{names[query]:>10}: same class among 5 neighbours: features {sum(same)}, pixels {sum(same_pixels)}")
    print(f"neighbours ({near.source} features): {time.perf_counter() - start:.1f} s")

    a, b = (load_split(SAMPLE, "test", max(HORSES) + 1)[i]["img"] for i in HORSES)
    points = [[x, y] for y in (8, 16, 24) for x in (8, 16, 24)]
    result = correspondences(backbone, a, b, points, *CORRESPONDENCE_CELL, ensemble=4)
    save(result.figure, output / "visualize-correspondence.png")


if __name__ == "__main__":
    run_command("feature_pictures.py", main)
