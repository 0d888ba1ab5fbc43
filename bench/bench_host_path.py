"""The probe's host data path alone: images/s that ``ddae-probe``'s extraction delivers to a zero-cost denoiser.

``DDAEBackbone.features`` is replaced in this process by a stand-in that returns zeros of the right widths at once,
so what is timed is everything around the denoiser: reading and decoding images, converting them, noise, moving
batches, the cache writes and their checksums. ``ddae-probe`` itself runs (its ``main``) on a fresh cache, one
process, two layers and the model's default noise levels (7 for DDPM); images/s is the number of train and test
images over the wall time of the two extraction stages in ``results.json``.

Data sets: ``--cifar``, a folder in the layout of ``uoft-cs/cifar10`` (32x32 PNG in Parquet; the shipped reference
model), and a synthetic set of ``--jpeg_images`` 256x256 JPEGs (smooth random colour fields, quality 90, written
once as an ``imagefolder`` with a ``label`` per class folder) probed with a tiny 256-pixel UNet's layer widths.

    python bench/bench_host_path.py --cifar ../shared/data/cifar10 --batch_sizes 16 256 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.probing.cli import build_parser
from ddae_diffusers.probing.cli import main as probe_main

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "examples" / "ddae-cifar10-cpu"


def zero_features(self, images, layers, timesteps, pooling="avg", **kwargs):
    """The stand-in for ``DDAEBackbone.features``: ``{(layer, t): zeros (B, D)}``, no forward."""
    layers, timesteps = self.check_layers(layers), self.check_timesteps(timesteps)
    widths = {layer: self.layer_info(layer).feature_dim for layer in layers}
    device = images.device  # the batch is where the model computes
    return {(layer, t): torch.zeros(images.shape[0], widths[layer], device=device)
            for layer in layers for t in timesteps}  # fmt: skip


def write_jpeg_set(folder: Path, count: int, classes: int = 10, side: int = 256, seed: int = 0) -> Path:
    """``count`` smooth random 256x256 JPEGs in ``folder/{train,test}/<class>/``, 5/6 of them for training."""
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    for index in range(count):
        split = "test" if index % 6 == 5 else "train"
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)  # upsampled: a JPEG-friendly photo-like field
        image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        target = folder / split / f"class{index % classes}"
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{index:06d}.jpg", quality=90)
    (folder / "done").write_text("")
    return folder


def tiny_256_model(folder: Path) -> Path:
    """A tiny pixel UNet for 256x256 images, saved as a model folder (random weights: only its widths matter)."""
    from diffusers import UNet2DModel

    if not (folder / "config.json").exists():
        UNet2DModel(sample_size=256, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                    norm_num_groups=8).save_pretrained(folder)  # fmt: skip
    return folder


def takes_workers() -> bool:
    """Whether this version of ``ddae-probe`` has a loader-workers flag."""
    return "--num_workers" in build_parser().format_help()


def run(model: Path, dataset: Path, batch_size: int, workers: int, limit: int | None, work: Path) -> dict:
    """One ``ddae-probe`` run on a fresh cache; its extraction images/s and stage timings."""
    out = Path(tempfile.mkdtemp(dir=work))
    layers = DDAEBackbone.from_pretrained(str(model)).layer_names()[:2]
    argv = ["--model", str(model), "--dataset", str(dataset), "--output_dir", str(out), "--layers", *layers,
            "--batch_size", str(batch_size), "--epochs", "1", "--lrs", "0.01"]  # fmt: skip
    if limit is not None:
        argv += ["--max_train_samples", str(limit), "--max_eval_samples", str(max(limit // 5, 10))]
    if workers and takes_workers():
        argv += ["--num_workers", str(workers)]
    elif workers:
        return {"skipped": "ddae-probe has no --num_workers"}
    start = time.perf_counter()
    results = probe_main(argv)
    wall = time.perf_counter() - start
    laps = results["timings"]
    seconds = laps["extract_train"]["wall_s"] + laps["extract_eval"]["wall_s"]
    images = results["num_train"] + results["num_val"] + results["num_eval"]
    return {"images": images, "levels": len(results["timesteps"]), "layers": layers,
            "extract_s": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "run_wall_s": round(wall, 2), "timings": laps}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=None, help="A folder with the uoft-cs/cifar10 layout.")
    parser.add_argument("--jpeg_images", type=int, default=6000, help="Synthetic 256x256 JPEGs (0: skip).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "bench_host_path"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "host_path.json"))
    args = parser.parse_args()

    DDAEBackbone.features = zero_features  # the zero-cost denoiser: only the host path is left to time
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sets = {}
    if args.cifar:
        sets["cifar10_png_32"] = (REFERENCE, Path(args.cifar))
    if args.jpeg_images:
        sets["synthetic_jpeg_256"] = (tiny_256_model(work / "unet256"), write_jpeg_set(work / "jpeg256",
                                                                                        args.jpeg_images))
    load_before = os.getloadavg()
    rows = []
    for name, (model, dataset) in sets.items():
        for batch_size in args.batch_sizes:
            for workers in args.workers:
                row = {"data": name, "batch_size": batch_size, "workers": workers,
                       **run(model, dataset, batch_size, workers, args.max_train_samples, work)}  # fmt: skip
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
    report = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "results": rows}  # fmt: skip
    Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
