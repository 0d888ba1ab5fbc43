"""Data loading of ``training/train_unconditional.py``: milliseconds per batch of its ``TrainImages`` loader.

Decodes, crops, flips and converts the repository's CIFAR-10 sample (or ``--dataset``) with the script's own
dataset and sampler, for several ``--dataloader_num_workers`` values, and reports the median time per batch over
``--batches`` batches (after the first, which pays for starting the workers). Compare it with a training step's
time (``bench/train_step_study.py``): loading is worth workers only where it is a visible share of the step.

    python bench/bench_dataloader.py [--dataset data/cifar10-sample] [--batch_size 32] [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import datasets
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from train_unconditional import EpochSampler, TrainImages  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/cifar10-sample")
    parser.add_argument("--image_column", default="img")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    split = datasets.load_dataset(args.dataset, split="train")
    results = {}
    for workers in args.workers:
        images = TrainImages(split, args.image_column, 32, center_crop=False, random_flip=True, seed=0)
        loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, sampler=EpochSampler(len(split), 0),
                                             num_workers=workers)
        times, start = [], time.perf_counter()
        for index, _ in enumerate(loader):
            now = time.perf_counter()
            if index > 0:
                times.append(now - start)
            start = now
            if index == args.batches:
                break
        results[f"workers={workers}"] = {"ms_per_batch": round(1000 * statistics.median(times), 2)}
        print(workers, results[f"workers={workers}"], flush=True)
    print(json.dumps({"dataset": args.dataset, "batch_size": args.batch_size, "load_average_after": os.getloadavg(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
