"""Checks the shape of the cost model (docs/scaling.md) by running the real ``ddae-probe`` on a synthetic data set
of up to 500,000 tiny images: extraction and head time should grow linearly with the rows, peak RSS should stay
flat, and the kNN over a bank that size should finish blockwise.

    python bench/scaling_sim.py --rows 125000 250000 500000 --output bench/results/scaling_sim.json

The data set (``--work_dir``/data: Parquet shards, 8x8 RGB PNG images, ``--classes`` classes whose mean colour
differs) and a tiny random UNet (two blocks) are built once; each size is one ``ddae-probe`` process under
``/usr/bin/time -v`` (one layer, one noise level, the default heads; the tiny UNet runs about 44,000 images/s
on this CPU, so the data path, heads and kNN are what is measured), whose wall time, CPU time and peak RSS are
recorded with the probe's own stage timings (``timings`` of results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

SIZE = 8
LAYER = "down_blocks.1.resnets.0"  # 32 wide; the forward stops there


def build_dataset(folder: str, train_rows: int, eval_rows: int, classes: int, seed: int = 0) -> None:
    """Parquet shards of ``train``/``test`` (columns ``image``, ``label``) in ``folder/data``."""
    import datasets
    from PIL import Image

    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(classes, 3))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=classes)})
    for split, rows in (("train", train_rows), ("test", eval_rows)):
        for shard, start in enumerate(range(0, rows, 50_000)):
            count = min(50_000, rows - start)
            labels = rng.integers(0, classes, size=count)
            pixels = colours[labels][:, None, None, :] + rng.normal(0, 24, size=(count, SIZE, SIZE, 3))
            images = [Image.fromarray(image) for image in np.clip(pixels, 0, 255).astype(np.uint8)]
            part = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
            part.to_parquet(os.path.join(folder, "data", f"{split}-{shard:05d}.parquet"))


def build_model(folder: str) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)


def time_v(output: str) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MiB) from the output of ``/usr/bin/time -v``."""
    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", output).group(1).strip()

    clock = [float(part) for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    wall = sum(value * 60**power for power, value in enumerate(reversed(clock)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(int(field(
        "Maximum resident set size (kbytes)")) / 1024, 1)}  # fmt: skip


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[125_000, 250_000, 500_000])
    parser.add_argument("--eval_rows", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--logistic_cells", type=int, default=0,
                        help="ddae-probe's --logistic_cells (default 0 here: full-batch logistic regression on a CPU "
                             "takes minutes per 100,000 rows at 100 classes and would hide the other stages)")
    parser.add_argument("--work_dir", default="/tmp/ddae-scaling-sim")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never wait on the Hub
    parser.add_argument("--output", default="bench/results/scaling_sim.json")
    args = parser.parse_args()

    data, model = os.path.join(args.work_dir, "data"), os.path.join(args.work_dir, "model")
    if not os.path.isdir(data):
        start = time.perf_counter()
        build_dataset(data, max(args.rows), args.eval_rows, args.classes)
        print(f"data set built in {time.perf_counter() - start:.0f} s", flush=True)
    if not os.path.isdir(model):
        build_model(model)
    runs = []
    for rows in sorted(args.rows):
        out = os.path.join(args.work_dir, f"probe-{rows}")
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "ddae_diffusers.probing.cli", "--model", model,
                   "--dataset", data, "--max_train_samples", str(rows), "--layers", LAYER, "--timesteps", "10",
                   "--batch_size", str(args.batch_size), "--logistic_cells", str(args.logistic_cells),
                   "--output_dir", out]  # fmt: skip
        load = os.getloadavg()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        results = json.load(open(os.path.join(out, "results.json")))
        run = {"train_rows": rows, "eval_rows": args.eval_rows, "load_average_before": load,
               **time_v(done.stderr), "timings": results["timings"],
               "cache_bytes": folder_bytes(os.path.join(out, "feature_cache")),
               "linear_acc": results["best"]["linear_acc"], "knn_acc": results["best"]["knn_acc"],
               "lrs_tried": len(results["best"]["lrs"] or results["lrs"])}  # fmt: skip
        runs.append(run)
        print(json.dumps(run), flush=True)
    record = {"command": " ".join(["python", *sys.argv]), "cpu_count": os.cpu_count(), "layer": LAYER,
              "logistic_cells": args.logistic_cells,
              "lrs": len(results["lrs"]),
              "image_size": SIZE, "classes": args.classes, "batch_size": args.batch_size, "runs": runs}  # fmt: skip
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
