"""Extraction study: image x level forwards per second of a full probe grid, per option, against the current path.

The workload is what ``ddae-probe`` extracts for one batch of images with its defaults: every default layer
(``probing.default_layers``: each resnet and attention output, encoder to decoder) at the 7 default DDPM levels,
through ``DDAEBackbone.features``. Options, joined by ``+`` into one variant:

  * ``bf16``: bf16 autocast (``dtype=torch.bfloat16``; the default is fp32, the probe's default);
  * ``channels_last``: denoiser weights and images in channels-last memory format;
  * ``stack``: all levels of a batch as one forward of ``B x 7`` inputs (``levels_per_forward=7``);
  * ``bN`` (``b128``): extraction batch N instead of ``--batch_size``.

Variants are interleaved (one pass of each per round) after one warm-up batch each, and the median round is
reported. Every variant's features are compared with the fp32 baseline's (``fp32``): the largest relative L2 error
over all cells, ``|a - b| / |b|`` per cell.

    python bench/extract_study.py --images 128 --batch_size 64 --rounds 2 [--variants bf16 channels_last ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from bench_train import write_report

from ddae_diffusers import DDAEBackbone, build_denoiser
from ddae_diffusers.probing import default_layers
from ddae_diffusers.probing.engine import DEFAULT_TIMESTEPS

OPTIONS = ("bf16", "channels_last", "stack")


def parse_variant(name: str, batch_size: int) -> tuple[set[str], int]:
    """``"bf16+b128"`` -> ({"bf16"}, 128); ``"fp32"`` is the baseline (no option)."""
    options = set() if name == "fp32" else set(name.split("+"))
    batches = [o for o in options if o[:1] == "b" and o[1:].isdigit()]
    unknown = options - set(OPTIONS) - set(batches)
    if unknown or len(batches) > 1:
        raise SystemExit(f"unknown option(s) {sorted(unknown)} in {name!r}: use {', '.join(OPTIONS)} or bN (+)")
    return options - set(batches), int(batches[0][1:]) if batches else batch_size


def make_variant(base: DDAEBackbone, options: set[str], batch_size: int, images: torch.Tensor):
    """A one-argument function ``run(limit)``: the features of the first ``limit`` images, batch by batch."""
    denoiser = copy.deepcopy(base.denoiser)
    if "channels_last" in options:
        denoiser = denoiser.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    backbone = DDAEBackbone(denoiser, base.scheduler)
    layers, levels = default_layers(backbone), list(DEFAULT_TIMESTEPS)
    dtype = torch.bfloat16 if "bf16" in options else None
    per_forward = len(levels) if "stack" in options else 1

    def run(limit: int) -> dict:
        parts = []
        for start in range(0, limit, batch_size):
            batch = images[start : min(start + batch_size, limit)]
            ids = range(start, start + len(batch))
            parts.append(backbone.features(batch, layers, levels, example_ids=ids, dtype=dtype,
                                           levels_per_forward=per_forward))
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    return run


def relative_error(features: dict, reference: dict) -> float:
    """The largest ``|a - b| / |b|`` (L2 over the images) over the cells."""
    return max(float((features[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-12)) for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-cifar10-32")
    parser.add_argument("--model", default=None, help="A diffusers folder or Hub id (not --preset).")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64, help="The probe's default extraction batch.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["bf16", "channels_last", "stack", "bf16+channels_last",
                                                         "bf16+stack", "bf16+b128"], help="Besides fp32.")
    parser.add_argument("--out", default="bench/results/extract_study.json")
    args = parser.parse_args()
    load_before = list(os.getloadavg())

    torch.manual_seed(0)
    base = DDAEBackbone.from_pretrained(args.model) if args.model else DDAEBackbone(build_denoiser(args.preset))
    base.denoiser.eval()
    images = torch.rand(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    num_levels, num_layers = len(DEFAULT_TIMESTEPS), len(default_layers(base))
    names = ["fp32", *[name for name in args.variants if name != "fp32"]]
    variants = {name: make_variant(base, *parse_variant(name, args.batch_size), images) for name in names}

    first_batch_s = {}
    for name, run in variants.items():  # warm-up: oneDNN kernels, the layer catalogue
        start = time.perf_counter()
        run(min(args.batch_size, args.images))
        first_batch_s[name] = round(time.perf_counter() - start, 2)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            outputs[name] = run(args.images)
            seconds[name].append(time.perf_counter() - start)
    rate = {name: args.images * num_levels / statistics.median(s) for name, s in seconds.items()}
    results = {}
    for name in variants:
        results[name] = {
            "img_levels_per_s": round(rate[name], 2),
            "vs_fp32": round(rate[name] / rate["fp32"], 2),
            "max_rel_error_vs_fp32": relative_error(outputs[name], outputs["fp32"]),
            "first_batch_s": first_batch_s[name],
            "round_s": [round(s, 2) for s in seconds[name]],
        }
        print(name, json.dumps(results[name]), flush=True)
    source = f"--model {args.model}" if args.model else f"--preset {args.preset}"
    report = {
        "benchmark": f"DDAEBackbone.features over {num_layers} default layers x {num_levels} levels, per option",
        "command": f"python bench/extract_study.py {source} --images {args.images} --batch_size {args.batch_size} "
        f"--rounds {args.rounds} --variants {' '.join(args.variants)}",
        "params_M": round(sum(p.numel() for p in base.denoiser.parameters()) / 1e6, 2),
        "results": results,
    }
    write_report(args.out, report, load_before)


if __name__ == "__main__":
    main()
