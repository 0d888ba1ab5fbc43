"""The paths that change on a CUDA device, each run once there, with what they measure.

1. ``pretraining``: the README's pretraining command, shortened (``ddpm-tiny``, embedded sample), with ``--use_ema``,
   bf16, the probe monitor and a checkpoint, then resumed from it: the EMA must follow the model to the device,
   before and after the resume.
2. ``probe_grid``: ``ddae-probe`` on the shipped reference in bf16 with fused probes and the pixel baseline; the
   stage timings of ``results.json`` (heads, kNN and fused probes run on the device).
3. ``precision``: the shipped reference's features on the device (fp32 with TF32 off and on, fp16 weights, bf16
   autocast) against fp32 on the CPU: the largest relative error of each, as the feature cache keys them apart.
4. ``classifier``: the shipped linear classifier loaded in fp16 on the device: its predictions against fp32 on the
   CPU, and the std of the noise it adds at its level against the scheduler's.
5. ``offload``: ``DDAEPipeline.extract_features`` under ``enable_model_cpu_offload`` in bf16 against the features
   without offload.
6. ``throughput``: the 35.7M UNet in bf16: extraction image-levels/s at the default grid's deepest layer, the
   training step's images/s, and the share of ``ddae-probe``'s extraction time the device waits on the host.

Writes ``<output_dir>/gpu_paths.json`` (one entry per path: ``ok``, its numbers or its error) and exits 1 if a path
failed. ``--device cpu`` runs the same paths on the CPU (a dry run of this script, not a measurement).

    python bench/gpu_paths.py --output_dir gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "ddae-cifar10-cpu"
CLASSIFIER = REPO / "examples" / "ddae-cifar10-cpu-linear"
SAMPLE = REPO / "data" / "cifar10-sample"


def launch(device: str) -> list[str]:
    """``accelerate launch`` for one process on ``device``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "bf16", "--dynamo_backend", "no"]  # fmt: skip
    return command + (["--cpu"] if device == "cpu" else [])


def run(command: list[str], log: Path) -> float:
    """Runs ``command`` from the repository root, its output to ``log``; its wall seconds (raises if it fails)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited {done.returncode}: see {log.name}")
    return round(time.perf_counter() - start, 2)


def pretraining(device: str, out: Path) -> dict:
    folder = out / "pretraining"
    common = ["training/train_unconditional.py", "--dataset_name", str(SAMPLE), "--model_config", "ddpm-tiny",
              "--max_train_samples", "512", "--train_batch_size", "64", "--use_ema", "--checkpointing_steps", "4",
              "--probe_every_n_steps", "4", "--probe_train_samples", "500", "--probe_eval_samples", "200",
              "--save_images_epochs", "0", "--logger", "jsonl", "--output_dir", str(folder)]  # fmt: skip
    first = run(launch(device) + common + ["--max_train_steps", "4"], out / "pretraining.log")
    resumed = run(launch(device) + common + ["--max_train_steps", "8", "--resume_from_checkpoint", "latest"],
                  out / "pretraining_resume.log")  # fmt: skip
    metrics = [json.loads(line) for line in next(folder.rglob("metrics.jsonl")).read_text().splitlines()]
    probes = [m for m in metrics if any(key.startswith("probe/") for key in m)]
    return {"wall_s": first, "resumed_wall_s": resumed, "steps": metrics[-1].get("step"), "probes": probes[-2:]}


def probe_grid(device: str, out: Path) -> dict:
    folder = out / "probe"
    train, test = ("2000", "1000") if device != "cpu" else ("200", "100")  # a dry run on the CPU stays short
    command = launch(device) + ["-m", "ddae_diffusers.probing.cli", "--model", str(MODEL), "--dataset", str(SAMPLE),
                                "--max_train_samples", train, "--max_eval_samples", test, "--dtype", "bfloat16",
                                "--batch_size", "256", "--fused_probes", "--pixel_baseline",
                                "--output_dir", str(folder)]  # fmt: skip
    wall = run(command, out / "probe.log")
    results = json.loads((folder / "results.json").read_text())
    return {"wall_s": wall, "timings": results["timings"], "best": results["best"],
            "cells": len(results["cells"])}  # fmt: skip


def images(count: int) -> torch.Tensor:
    """(count, 3, 32, 32) test images of the embedded sample in [-1, 1]."""
    import datasets

    from ddae_diffusers import DDAEImageProcessor

    split = datasets.load_dataset(str(SAMPLE), split=f"test[:{count}]")
    return DDAEImageProcessor(size=32)(split["img"])["pixel_values"]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float().cpu() - reference).abs().max() / reference.abs().max())


def precision(device: str, out: Path) -> dict:
    from ddae_diffusers import DDAEBackbone
    from ddae_diffusers.probing.engine import default_layers

    pixels = images(256)
    on_cpu = DDAEBackbone.from_pretrained(str(MODEL))
    layers, levels = default_layers(on_cpu)[::4], [10, 100]  # encoder to decoder

    def features(backbone: DDAEBackbone, dtype: torch.dtype | None = None) -> dict:
        return backbone.features(pixels, layers, levels, dtype=dtype)

    reference = features(on_cpu)
    errors = {}
    fp32 = DDAEBackbone.from_pretrained(str(MODEL)).to(device)
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        for name, setting in (("fp32_ieee", "ieee"), ("fp32_tf32", "tf32")):
            torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = setting
            errors[name] = {str(k): relative_error(v, reference[k]) for k, v in features(fp32).items()}
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
    errors["bf16_autocast"] = {str(k): relative_error(v, reference[k]) for k, v in
                               features(fp32, torch.bfloat16).items()}  # fmt: skip
    half = DDAEBackbone.from_pretrained(str(MODEL), dtype=torch.float16).to(device)
    errors["fp16_weights"] = {str(k): relative_error(v, reference[k]) for k, v in features(half).items()}
    return {"max_relative_error": {name: max(values.values()) for name, values in errors.items()}, "cells": errors}


def classifier(device: str, out: Path) -> dict:
    from transformers import AutoModelForImageClassification

    pixels = images(256)
    reference = AutoModelForImageClassification.from_pretrained(str(CLASSIFIER), trust_remote_code=True).eval()
    half = AutoModelForImageClassification.from_pretrained(
        str(CLASSIFIER), trust_remote_code=True, dtype=torch.float16
    ).to(device).eval()  # fmt: skip
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits.argmax(1)
        predicted = half(pixel_values=pixels.to(device)).logits.argmax(1).cpu()
        clean = half.encode(pixels.to(device))
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
        noisy, _ = half.noisy_input(clean, noise.to(device))
    alpha_bar = half.noise_scheduler.alphas_cumprod[half.config.timestep]
    added = noisy.float().cpu() - alpha_bar.sqrt() * clean.float().cpu()
    return {
        "agreement_fp16_vs_fp32_cpu": float((predicted == expected).float().mean()),
        "noise_std_added": float(added.std()),
        "noise_std_expected": float((1 - alpha_bar).sqrt() * noise.std()),
        "dtype_of_noisy_input": str(noisy.dtype),
    }


def offload(device: str, out: Path) -> dict:
    from ddae_diffusers import DDAEPipeline

    pixels = images(64)
    kwargs = dict(layers=["mid_block"], timesteps=[10], dtype=torch.bfloat16)
    plain = DDAEPipeline.from_pretrained(str(MODEL)).to(device)
    reference = plain.extract_features(pixels, **kwargs)
    pipe = DDAEPipeline.from_pretrained(str(MODEL))
    if device == "cpu":
        return {"skipped": "model CPU offload needs an accelerator"}
    pipe.enable_model_cpu_offload(device=device)
    offloaded = pipe.extract_features(pixels, **kwargs)
    return {"max_relative_error": max(relative_error(offloaded[k], reference[k].float()) for k in reference)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(device: str, out: Path) -> dict:
    """The 35.7M google/ddpm-cifar10-32 architecture (random weights) in bf16: extraction image-levels/s at the
    default grid's deepest layer, the training step's images/s, and the share of ``ddae-probe``'s extraction time
    in which the device waits on the host (1 - pure forward time / extraction time, same images and levels)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from ddae_diffusers import DDAEBackbone, build_denoiser
    from ddae_diffusers.noise import DEFAULT_DDPM_LEVELS
    from ddae_diffusers.pretraining.training_step import train_step
    from ddae_diffusers.probing.engine import default_layers

    model_dir = out / "ddpm-cifar10-32-random"
    if not (model_dir / "config.json").exists():
        build_denoiser("ddpm-cifar10-32").save_pretrained(model_dir)
    backbone = DDAEBackbone.from_pretrained(str(model_dir)).to(device)
    backbone.denoiser.eval()
    layer, levels = default_layers(backbone)[-1], list(DEFAULT_DDPM_LEVELS)
    batch, rounds = (256, 8) if device != "cpu" else (16, 2)
    pixels = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    backbone.features(pixels, [layer], levels, dtype=torch.bfloat16)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(rounds):
        backbone.features(pixels, [layer], levels, dtype=torch.bfloat16)
    synchronize(device)
    forward_rate = rounds * batch * len(levels) / (time.perf_counter() - start)

    train_images = 4000 if device != "cpu" else 100
    folder = out / "throughput_probe"
    command = launch(device) + ["-m", "ddae_diffusers.probing.cli", "--model", str(model_dir),
                                "--dataset", str(SAMPLE), "--layers", layer, "--dtype", "bfloat16",
                                "--batch_size", str(batch), "--max_train_samples", str(train_images),
                                "--max_eval_samples", str(train_images // 4), "--epochs", "1",
                                "--output_dir", str(folder)]  # fmt: skip
    run(command, out / "throughput_probe.log")
    results = json.loads((folder / "results.json").read_text())
    laps = results["timings"]
    extract_s = laps["extract_train"]["wall_s"] + laps["extract_eval"]["wall_s"]
    image_levels = (results["num_train"] + results["num_val"] + results["num_eval"]) * len(levels)
    pure_s = image_levels / forward_rate

    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    model = build_denoiser("ddpm-cifar10-32").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    train_batch, steps = (128, 20) if device != "cpu" else (8, 2)
    images = torch.rand(train_batch, 3, 32, 32, device=accelerator.device) * 2 - 1
    train_step(accelerator, model, optimizer, schedule, DDPMScheduler(), images, torch.Generator().manual_seed(0))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(accelerator, model, optimizer, schedule, DDPMScheduler(), images, torch.Generator().manual_seed(0))
    synchronize(device)
    return {
        "layer": layer,
        "levels": len(levels),
        "extraction_image_levels_per_s": round(forward_rate, 1),
        "probe_extraction_image_levels_per_s": round(image_levels / extract_s, 1),
        "device_waits_on_host_fraction": round(max(0.0, 1 - pure_s / extract_s), 3),
        "train_images_per_s": round(steps * train_batch / (time.perf_counter() - start), 1),
        "train_batch_size": train_batch,
    }


PATHS = {"throughput": throughput, "pretraining": pretraining, "probe_grid": probe_grid, "precision": precision,
         "classifier": classifier, "offload": offload}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_paths: no CUDA device here: run it on a machine with one (or pass --device cpu for a dry run).")
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    for name in args.paths:
        start = time.perf_counter()
        try:
            report[name] = {"ok": True, **PATHS[name](args.device, out)}
        except Exception as error:  # one failed path must not hide the others' results
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        report[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(name, "ok" if report[name]["ok"] else f"FAILED: {report[name]['error']}", flush=True)
        (out / "gpu_paths.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(report[name]["ok"] for name in args.paths) else 1


if __name__ == "__main__":
    sys.exit(main())
