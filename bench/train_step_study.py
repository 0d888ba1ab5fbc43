"""Pretraining step study: what each CPU/GPU option buys over the diffusers example's plain fp32 loop.

Every variant starts from the same random weights and draws the same noise (a generator seeded 0), so their
losses can be compared step by step; steps are interleaved (one of each variant per round) so that machine noise
hits all alike, and the median step time after the warm-up is reported.

  * ``plain_fp32``: ``bench_train.plain_step`` (noise, ``unet(x_t, t)``, MSE, backward, clip, AdamW) -- the
    baseline of every ratio;
  * ``script_fp32``: ``ddae_diffusers.pretraining.training_step.train_step`` (what the training script runs)
    with the script's EMA, fp32;
  * ``+foreach_adamw`` / ``+fused_adamw``: the AdamW implementation; ``+ema_foreach``: ``EMAModel(foreach=True)``;
  * ``+channels_last``: model and batch in channels-last memory format; ``+compile``: ``torch.compile`` (inductor),
    its compile time reported apart; ``+bf16``: the step under bf16 autocast (what ``--mixed_precision bf16`` does);
  * options joined by ``+`` (``channels_last+foreach_adamw``) make one variant with all of them.

    python bench/train_step_study.py --preset ddpm-cifar10-32 --batch_size 32 --steps 3 [--variants ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from accelerate import Accelerator
from bench_train import plain_step, write_report
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ddae_diffusers import build_denoiser
from ddae_diffusers.pretraining.training_step import train_step

OPTIONS = ("bf16", "foreach_adamw", "fused_adamw", "ema_foreach", "channels_last", "compile")


def make_variant(base: torch.nn.Module, options: set[str], images: torch.Tensor, accelerator: Accelerator):
    """A zero-argument step function (returns the loss) for the script's step with ``options``."""
    model = copy.deepcopy(base).train()
    batch = images.clone()
    if "channels_last" in options:
        model = model.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    adamw = {"foreach": True} if "foreach_adamw" in options else {"fused": True} if "fused_adamw" in options else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw)
    ema = EMAModel(model.parameters(), use_ema_warmup=True, power=0.75, foreach="ema_foreach" in options)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if "compile" in options:
        model = torch.compile(model)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler()
    device, bf16 = accelerator.device.type, "bf16" in options

    def step() -> torch.Tensor:
        # the accelerator runs fp32, so its own autocast inside this one is a no-op
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return train_step(accelerator, model, optimizer, lr_schedule, scheduler, batch, generator, ema=ema)

    return step


def plain_variant(base: torch.nn.Module, images: torch.Tensor):
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler()
    return lambda: plain_step(model, optimizer, scheduler, images, generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-cifar10-32")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["script_fp32", *OPTIONS], help="Besides plain_fp32.")
    parser.add_argument("--out", default="bench/results/train_step_study.json")
    args = parser.parse_args()
    load_before = list(os.getloadavg())

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    base = build_denoiser(args.preset)
    images = (torch.rand(args.batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    images = images.to(accelerator.device)
    base.to(accelerator.device)
    variants = {"plain_fp32": plain_variant(base, images)}
    for name in args.variants:
        options = set() if name == "script_fp32" else set(name.split("+"))
        if not options <= set(OPTIONS):
            parser.error(f"unknown option in {name!r}: use script_fp32 or {', '.join(OPTIONS)} (joined by +)")
        variants[name] = make_variant(base, options, images, accelerator)

    warmup: dict[str, float] = {}
    for name, step in variants.items():  # first step (compile happens here), then a second warm-up
        torch.manual_seed(0)  # dropout draws from the global generator: the same masks for every variant
        start = time.perf_counter()
        step()
        warmup[name] = round(time.perf_counter() - start, 2)
        torch.manual_seed(1)
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.steps):
        for name, step in variants.items():
            torch.manual_seed(2 + round_index)
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    plain = args.batch_size / statistics.median(times["plain_fp32"])
    results = {}
    for name in variants:
        img_per_s = args.batch_size / statistics.median(times[name])
        results[name] = {
            "img_per_s": round(img_per_s, 2),
            "vs_plain_fp32": round(img_per_s / plain, 2),
            "first_step_s": warmup[name],
            "step_s": [round(t, 3) for t in times[name]],
            "losses": losses[name],
        }
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "benchmark": "pretraining step images/s per option, vs the plain fp32 loop, interleaved",
        "command": f"python bench/train_step_study.py --preset {args.preset} --batch_size {args.batch_size} "
        f"--steps {args.steps} --variants {' '.join(args.variants)}",
        "params_M": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
        "results": results,
    }
    write_report(args.out, report, load_before)


if __name__ == "__main__":
    main()
