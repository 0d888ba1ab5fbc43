"""Feature-extraction throughput on the google/ddpm-cifar10-32 architecture (random weights).

Compares, at batch 64 and t=10, images/s of
  * a plain full diffusers forward ``unet(x_t, t)``,
  * ``DDAEBackbone.features`` capturing ``up_blocks.1.resnets.2`` (the paper's out_6; early exit),
  * ``DDAEBackbone.features`` capturing every decoder block at once,
each in fp32 and under bf16 autocast. Repetitions are interleaved so machine noise hits all
variants alike; the median per variant is reported.

    python bench/bench_extract.py [--batch_size 64] [--repeats 3] [--out bench/results/extract.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from ddae_diffusers import DDAEBackbone, build_denoiser
from ddae_diffusers.io_utils import atomic_path

PAPER_LAYER = "up_blocks.1.resnets.2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timestep", type=int, default=10)
    parser.add_argument("--out", default="bench/results/extract.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = DDAEBackbone(build_denoiser("ddpm-cifar10-32").eval())
    decoder_layers = [name for name in backbone.layer_names() if name.startswith("up_blocks.")]
    images = torch.rand(args.batch_size, 3, 32, 32) * 2 - 1
    t = torch.full((args.batch_size,), args.timestep)

    def full_forward(dtype):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            backbone.denoiser(backbone.scheduler.add_noise(images, torch.randn_like(images), t), t)

    variants = {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        variants[f"full_forward/{tag}"] = lambda d=dtype: full_forward(d)
        variants[f"capture_out6/{tag}"] = lambda d=dtype: backbone.features(
            images, [PAPER_LAYER], [args.timestep], dtype=d
        )
        variants[f"capture_all_decoder/{tag}"] = lambda d=dtype: backbone.features(
            images, decoder_layers, [args.timestep], dtype=d
        )

    for run in variants.values():  # warm-up (oneDNN kernels, catalogue trace)
        run()
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)

    throughput = {name: args.batch_size / statistics.median(s) for name, s in seconds.items()}
    base = throughput["full_forward/fp32"]
    results = {
        "model": "ddpm-cifar10-32 architecture (35.7M params, random weights)",
        "batch_size": args.batch_size,
        "timestep": args.timestep,
        "repeats": args.repeats,
        "decoder_layers": decoder_layers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "images_per_s": {k: round(v, 2) for k, v in throughput.items()},
        "ratio_vs_full_fp32": {k: round(v / base, 2) for k, v in throughput.items()},
        "ratios": {
            "out6_early_exit_vs_full_fp32": round(throughput["capture_out6/fp32"] / base, 2),
            "out6_early_exit_vs_full_bf16": round(
                throughput["capture_out6/bf16"] / throughput["full_forward/bf16"], 2
            ),
            "bf16_vs_fp32_full": round(throughput["full_forward/bf16"] / base, 2),
            "bf16_vs_fp32_out6": round(throughput["capture_out6/bf16"] / throughput["capture_out6/fp32"], 2),
        },
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
