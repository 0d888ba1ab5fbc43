"""Benchmark: the paper's online probe protocol vs. the feature cache with K=1 and K=2 views.

Same model, data, layers (every decoder resnet/attention output) and timesteps for all three;
each run starts from an empty cache and its wall time covers extraction, head training, kNN
and the report. Writes ``bench/results/probe.json`` and the heatmaps of each run.

    python bench/bench_probe.py                       # 5,000 train / 1,000 test, ddpm-small
    python bench/bench_probe.py --num_train 1000 --num_eval 500 --model ddpm-tiny   # scaled down
    python bench/bench_probe.py --model examples/ddae-cifar10-cpu --output bench/results/probe_trained.json

Heatmaps go beside the JSON: ``<output stem>_<run>_heatmap.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddae_diffusers import DDAEBackbone, build_denoiser  # noqa: E402
from ddae_diffusers.presets import PRESETS  # noqa: E402
from ddae_diffusers.probing.engine import ProbeConfig, default_layers, run_probe  # noqa: E402


def load_backbone(model: str, seed: int) -> tuple[DDAEBackbone, str]:
    """A preset name -> randomly initialised (seeded) UNet; a folder or Hub id -> its weights."""
    if model in PRESETS:
        torch.manual_seed(seed)
        return DDAEBackbone(build_denoiser(model).eval()), f"{model} (random init, seed {seed})"
    return DDAEBackbone.from_pretrained(model), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ddpm-small", help="Preset (random init) or pipeline folder.")
    parser.add_argument("--dataset", default="uoft-cs/cifar10",
                        help="CIFAR-10 in Hub layout: the Hub id or a local copy (the recorded runs read one); "
                             "data/cifar10-sample (exactly 5,000 / 1,000) runs offline but gives other numbers.")
    parser.add_argument("--num_train", type=int, default=5000)
    parser.add_argument("--num_eval", type=int, default=1000)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=["cached-k1", "cached-k2", "cached-k1-paper", "online"],
                        help="cached-k1-paper: the paper's head recipe on the cache of cached-k1 (reused, so its "
                        "time is head training only): separates the effect of caching from that of the head.")
    parser.add_argument("--output", default=os.path.join(REPO, "bench", "results", "probe.json"))
    args = parser.parse_args()

    backbone, model_name = load_backbone(args.model, args.seed)
    layers = [name for name in default_layers(backbone) if name.startswith("up_blocks")]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    runs = {}
    shared_cache = tempfile.mkdtemp(prefix="bench-probe-cache-")
    for run in args.runs:
        out = tempfile.mkdtemp(prefix=f"bench-probe-{run}-")
        reuse = run in ("cached-k1", "cached-k1-paper")
        config = ProbeConfig(
            model=model_name, dataset=args.dataset, output_dir=out, max_train_samples=args.num_train,
            max_eval_samples=args.num_eval, layers=layers, timesteps=args.timesteps, batch_size=args.batch_size,
            protocol="online" if run == "online" else "cached",
            train_views=2 if run == "cached-k2" else 1, dtype=args.dtype, seed=args.seed,
            recipe="paper" if run == "cached-k1-paper" else "converge",
            cache_dir=shared_cache if reuse else None,
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        results = run_probe(config, backbone=backbone, progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        best = results["best"]
        runs[run] = {
            "wall_s": round(seconds, 1),
            "cpu_s": round(cpu_seconds, 1),
            "cache_reused": run == "cached-k1-paper",
            "stages": results["timings"],
            "best_cell": f"{best['layer']}@{best['timestep']}",
            "best_linear_acc": best["linear_acc"],
            "best_knn_acc": best["knn_acc"],
            "best_val_acc": best["val_acc"],
            "max_linear_acc_over_cells": max(c["linear_acc"] for c in results["cells"]),
            "recipe": results["recipe"],
            "normalization": results["normalization"],
            "lrs": results["lrs"],
            "epochs": results["epochs"],
            "cells": [{k: c[k] for k in ("layer", "timestep", "linear_acc", "knn_acc", "val_acc", "lr")}
                      for c in results["cells"]],
        }
        for name in ("heatmap.png", "knn_heatmap.png"):
            shutil.copy(os.path.join(out, name), f"{os.path.splitext(args.output)[0]}_{run}_{name}")
        shutil.rmtree(out, ignore_errors=True)
        print(f"{run}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU, best {runs[run]['best_cell']} "
              f"linear {100 * best['linear_acc']:.2f}%", flush=True)

    summary = {}
    if "online" in runs:
        for run in runs:
            if run != "online":
                summary[run] = {
                    "speedup_vs_online": round(runs["online"]["wall_s"] / runs[run]["wall_s"], 2),
                    "cpu_speedup_vs_online": round(runs["online"]["cpu_s"] / runs[run]["cpu_s"], 2),
                    "best_acc_minus_online_points": round(
                        100 * (runs[run]["best_linear_acc"] - runs["online"]["best_linear_acc"]), 2
                    ),
                }
    report = {
        "benchmark": "probe: online (paper protocol) vs feature cache",
        "command": "python bench/bench_probe.py " + " ".join(sys.argv[1:]),
        "model": model_name,
        "num_train": args.num_train,
        "num_eval": args.num_eval,
        "layers": layers,
        "timesteps": args.timesteps,
        "dtype": args.dtype,
        "extraction_batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "target": "cache >= 8x faster than online, best-cell accuracy within 1.5 points",
        "runs": runs,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(shared_cache, ignore_errors=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
