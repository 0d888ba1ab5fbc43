"""Pretraining throughput: the training script's step vs. a plain fp32 PyTorch loop.

For each preset (random weights, 32x32 inputs, same batch), images/s of
  * ``plain_fp32``: the diffusers example's default loop -- noise, ``unet(x_t, t)``, MSE, backward,
    grad-norm clip, AdamW step, all in fp32;
  * ``script_bf16``: ``ddae_diffusers.pretraining.training_step.train_step`` -- the function
    ``training/train_unconditional.py`` calls -- under ``Accelerator(mixed_precision="bf16")``, with the
    script's EMA update (``--use_ema``) and its NaN check included.
Steps are interleaved (one of each per round) so machine noise hits both alike; the median per
variant is reported after one warm-up step each.

    python bench/bench_train.py [--presets ddpm-small ddpm-cifar10-32] [--batch_size 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ddae_diffusers import build_denoiser
from ddae_diffusers.io_utils import atomic_path
from ddae_diffusers.pretraining.training_step import train_step


def plain_step(model, optimizer, scheduler, images, generator) -> torch.Tensor:
    """One fp32 step as diffusers' unconditional example does it without mixed precision or EMA; returns the loss."""
    noise = torch.randn(images.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator)
    loss = F.mse_loss(model(scheduler.add_noise(images, noise, t), t).sample, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def bench_preset(name: str, batch_size: int, steps: int, accelerator: Accelerator) -> dict:
    torch.manual_seed(0)
    plain_model = build_denoiser(name).train()
    script_model = copy.deepcopy(plain_model)
    scheduler = DDPMScheduler()
    images = torch.rand(batch_size, 3, 32, 32) * 2 - 1

    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    script_opt = torch.optim.AdamW(script_model.parameters(), lr=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(script_opt, lambda _: 1.0)
    ema = EMAModel(script_model.parameters(), use_ema_warmup=True, power=0.75)
    script_model, script_opt, lr_sched = accelerator.prepare(script_model, script_opt, lr_sched)
    generator = torch.Generator().manual_seed(0)

    variants = {
        "plain_fp32": lambda: plain_step(plain_model, plain_opt, scheduler, images, generator),
        "script_bf16": lambda: train_step(
            accelerator, script_model, script_opt, lr_sched, scheduler, images, generator, ema=ema
        ),
    }
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(steps):
        for key, run in variants.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    result = {
        "params_M": round(sum(p.numel() for p in plain_model.parameters()) / 1e6, 2),
        "batch_size": batch_size,
        "timed_steps": steps,
    }
    for key, values in times.items():
        result[f"{key}_img_per_s"] = round(batch_size / statistics.median(values), 2)
        result[f"{key}_step_s"] = [round(v, 3) for v in values]
    result["speedup"] = round(result["script_bf16_img_per_s"] / result["plain_fp32_img_per_s"], 2)
    return result


def cpu_description() -> dict:
    """CPU model and the bf16 matrix instructions it has (AMX makes bf16 autocast pay off on CPU)."""
    info = {"model": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line)
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        info["bf16_flags"] = sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16"))
    except (OSError, StopIteration):
        pass
    return info


def write_report(path: str, report: dict, load_before: list[float]) -> None:
    """Writes ``report`` as JSON (to a temporary name, then renamed) with the run's setting: torch, threads,
    device, and the load averages before the run started and after it ended."""
    report = {
        **report,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_description(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["ddpm-small", "ddpm-cifar10-32"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args()
    load_before = list(os.getloadavg())

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    results = {}
    for name in args.presets:
        results[name] = bench_preset(name, args.batch_size, args.steps, accelerator)
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "benchmark": "train step images/s: train_unconditional.py's train_step (bf16 autocast + EMA) vs plain fp32",
        "command": "python bench/bench_train.py " + " ".join(
            ["--presets", *args.presets, "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
        ),
        "results": results,
    }
    write_report(args.out, report, load_before)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
