"""Time of guided against unguided sampling, in one process, alternating so that drift affects both alike.

    python bench/bench_guidance.py --model examples/ddae-cifar10-cpu \\
        --head examples/ddae-cifar10-cpu-noise-conditional --batch_size 50 --steps 50 --repeats 3

Prints the seconds per image of each run and the median guided / unguided ratio (DDIM; guidance scale 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from ddae_diffusers import DDAEPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--head", required=True)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pipe = DDAEPipeline.from_pretrained(args.model, classifier=args.head)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    runs = {"unguided": {}, "guided": {"class_labels": 3, "guidance_scale": 3.0}}
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, kwargs in runs.items():
            start = time.perf_counter()
            pipe(batch_size=args.batch_size, num_inference_steps=args.steps, generator=torch.manual_seed(0),
                 output_type="pt", **kwargs)  # fmt: skip
            seconds[name].append((time.perf_counter() - start) / args.batch_size)
    for name, values in seconds.items():
        print(f"{name}: {', '.join(f'{v:.3f}' for v in values)} s / image")
    ratios = [g / u for g, u in zip(seconds["guided"], seconds["unguided"], strict=True)]
    print(f"guided / unguided: median {statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
