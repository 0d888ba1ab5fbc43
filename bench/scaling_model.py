"""The cost model of docs/scaling.md: each stage of a ``ddae-probe`` grid as a function of images, cells, feature
width and classes, evaluated for ImageNet-1k with DiT-XL/2 and with the 35.7M DDPM UNet on 1 and 8 GPUs.

    python bench/scaling_model.py --output bench/results/scaling_model.json   # prints the table of docs/scaling.md

Counted exactly here: the FLOPs of each forward to the deepest default layer and of the VAE encoder (the real
architectures from their public configs, on PyTorch's ``meta`` device under ``FlopCounterMode``), the default
layers and their widths, the bytes the cache holds. Measured on this CPU and read from ``bench/results``: the host
path's CPU time per image (``host_path.json``, 32x32 PNG; ``host_path_with_jpeg.json``, 256x256 JPEG) and the head
and kNN throughput of the 500,000-row run (``scaling_sim.json``). Assumed, because no GPU was measured here (see
``ASSUMED``): the device's sustained FLOP/s and the disk's read speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ASSUMED = {
    "forward_flops": 240e12,  # bf16 forwards: 30% of an H200's dense bf16 peak
    "head_flops": 20e12,  # float32 heads, kNN and logistic matmuls (small widths): 30% of its fp32 peak
    "disk_bytes_per_s": 2e9,  # one NVMe, reads and writes of the feature cache
    "host_cores_per_gpu": 16,  # decoding workers per GPU (the lent H200 machine has 16 cores)
}
IMAGENET = {"train": 1_281_167, "test": 50_000, "classes": 1000, "val_fraction": 0.1}
LEVELS, ETA, EPOCHS, LRS, LOGISTIC_CELLS, LOGISTIC_CS, LOGISTIC_ITERS = 7, 3, 30, 9, 3, 7, 300
KNN_CHUNK = 4096  # query rows per pass over the bank (table.CHUNK_ROWS)


def model_costs() -> dict:
    """FLOPs to the deepest default layer, default layers and widths, VAE encoder FLOPs: exact counts."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from ddae_diffusers import DDAEBackbone
    from ddae_diffusers.capture import capture_activations
    from ddae_diffusers.presets import build_denoiser
    from ddae_diffusers.probing.engine import default_layers

    with torch.device("meta"):
        dit = DiTTransformer2DModel(sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28,
                                    num_attention_heads=16, attention_head_dim=72, num_embeds_ada_norm=1000)
        unet = build_denoiser("ddpm-cifar10-32")
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    costs = {}
    models = (("DiT-XL/2", dit, (4, 32, 32), 256), ("UNet 35.7M", unet, (3, 32, 32), 32))
    for name, denoiser, sample, image_side in models:
        backbone = DDAEBackbone(denoiser)
        layers = default_layers(backbone)
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            capture_activations(denoiser, torch.zeros(1, *sample), torch.zeros(1), layers, stop_after=layers[-1],
                                conditioning=backbone.conditioning, pooling="avg")  # fmt: skip
        width = sum(backbone.layer_info(x).feature_dim for x in layers)
        costs[name] = {"layers": len(layers), "width_per_level": width,
                       "cell_width": backbone.layer_info(layers[-1]).feature_dim, "image_side": image_side,
                       "forward_flops": counter.get_total_flops()}  # fmt: skip
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        vae.encode(torch.zeros(1, 3, 256, 256))
    costs["DiT-XL/2"]["vae_flops"] = counter.get_total_flops()
    costs["DiT-XL/2"]["latent_bytes"] = 4 * 32 * 32 * 4
    return costs


def measured_constants() -> dict:
    """CPU seconds per image of the host path, and this CPU's head and kNN throughput (the 500k-row run)."""
    def images_per_s(file: str, data: str) -> float:
        rows = json.load(open(os.path.join(RESULTS, file)))["results"]
        return max(r["images_per_s"] for r in rows if r["data"] == data)

    sim = json.load(open(os.path.join(RESULTS, "scaling_sim.json")))
    run = max(sim["runs"], key=lambda r: r["train_rows"])
    fit_rows = round(run["train_rows"] * 0.9)
    width, classes = 32, sim["classes"]
    head_units = fit_rows * EPOCHS * sim.get("lrs", 7) * width * classes  # (row, epoch, lr, width, class)
    return {
        "png32_core_s": 2 / images_per_s("host_path.json", "cifar10_png_32"),
        "jpeg256_core_s": 2 / images_per_s("host_path_with_jpeg.json", "synthetic_jpeg_256"),
        "cpu_head_flops": 6 * head_units / run["timings"]["heads"]["wall_s"],
        "cpu_knn_flops": 2 * fit_rows * run["eval_rows"] * width / run["timings"]["score"]["wall_s"],
    }


def halving_shares(levels: int, eta: int) -> tuple[float, float]:
    """(level-passes of forwards, level-passes of head training) of successive halving, in units of one level over
    all rows: rung k scores its levels on eta**(k - R) of the rows, then the last level runs on all of them."""
    from ddae_diffusers.probing.halving import rung_plan

    plan = rung_plan(levels, eta)
    fractions = [float(eta) ** (k - len(plan)) for k in range(len(plan))]
    forwards, previous = 0.0, 0.0
    for count, fraction in zip(plan, fractions, strict=True):
        forwards += (fraction - previous) * count  # rows of earlier rungs are cached at the kept levels
        previous = fraction
    forwards += 1 - previous  # the finished level on the rest of the rows
    heads = sum(count * fraction for count, fraction in zip(plan, fractions, strict=True)) + 1
    return forwards, heads


def project(model: dict, gpus: int, search: str, constants: dict) -> dict:
    """Seconds per stage, cache bytes, and memory of one grid on ImageNet-1k."""
    train, test, classes = IMAGENET["train"], IMAGENET["test"], IMAGENET["classes"]
    fit = round(train * (1 - IMAGENET["val_fraction"]))
    images = train + test
    forward_levels, head_levels = (LEVELS, LEVELS) if search == "exhaustive" else halving_shares(LEVELS, ETA)
    final_levels = LEVELS if search == "exhaustive" else 1
    width = model["width_per_level"]
    decode_core_s = constants["jpeg256_core_s"] if model["image_side"] >= 256 else constants["png32_core_s"]
    stages = {
        "decode": images * decode_core_s / (ASSUMED["host_cores_per_gpu"] * gpus),
        "vae_encode": images * model.get("vae_flops", 0) / ASSUMED["forward_flops"] / gpus,
        "forward": images * forward_levels * model["forward_flops"] / ASSUMED["forward_flops"] / gpus,
    }
    cache_bytes = images * forward_levels * width * 2 + images * model.get("latent_bytes", 0)
    stages["cache_write"] = cache_bytes / ASSUMED["disk_bytes_per_s"]  # the main process writes, overlapped
    head_flops = 6 * fit * EPOCHS * LRS * head_levels * width * classes
    head_reads = fit * EPOCHS * head_levels * width * 2
    stages["heads"] = head_flops / ASSUMED["head_flops"] + head_reads / ASSUMED["disk_bytes_per_s"]
    bank_bytes = fit * final_levels * width * 2
    stages["knn"] = (2 * fit * test * final_levels * width / ASSUMED["head_flops"]
                     + bank_bytes * math.ceil(test / KNN_CHUNK) / ASSUMED["disk_bytes_per_s"])  # fmt: skip
    cell = model["cell_width"]
    logistic_flops = LOGISTIC_CELLS * LOGISTIC_CS * LOGISTIC_ITERS * 6 * fit * cell * classes
    stages["logistic"] = logistic_flops / ASSUMED["head_flops"]
    cells = model["layers"] * final_levels
    memory = {
        "host_block_gb": KNN_CHUNK * final_levels * width * 6 / 1e9,  # one block of rows, float16 read + float32
        "head_bank_gpu_gb": cells * LRS * cell * classes * 4 * 4 / 1e9,  # weights, gradients, two Adam moments
        "logistic_gpu_gb": fit * cell * 4 / 1e9,  # one cell's full training matrix
    }
    total = stages["decode"] / 2 + sum(v for k, v in stages.items() if k not in ("decode", "cache_write"))
    return {"gpus": gpus, "search": search, "stages_s": {k: round(v) for k, v in stages.items()},
            "total_h": round(total / 3600, 1), "cache_gb": round(cache_bytes / 1e9), "memory_gb":
            {k: round(v, 1) for k, v in memory.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(RESULTS, "scaling_model.json"))
    args = parser.parse_args()
    costs, constants = model_costs(), measured_constants()
    projections = {name: [project(model, gpus, search, constants) for search in ("exhaustive", "halving")
                          for gpus in (1, 8)] for name, model in costs.items()}  # fmt: skip
    record = {"assumed": ASSUMED, "imagenet": IMAGENET, "grid": {"levels": LEVELS, "eta": ETA, "epochs": EPOCHS,
              "lrs": LRS}, "models": costs, "measured": constants, "projections": projections}  # fmt: skip
    with open(args.output + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(args.output + ".tmp", args.output)
    print("| model | search | GPUs | decode | VAE | forwards | heads | kNN | logistic | **total** | cache | "
          "GPU memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in projections.items():
        for row in rows:
            hours = {stage: f"{seconds / 3600:.2f}" for stage, seconds in row["stages_s"].items()}
            memory = max(row["memory_gb"]["head_bank_gpu_gb"], row["memory_gb"]["logistic_gpu_gb"])
            vae = hours["vae_encode"] if row["stages_s"]["vae_encode"] else "-"
            print(f"| {name} | {row['search']} | {row['gpus']} | {hours['decode']} | {vae} | {hours['forward']} | "
                  f"{hours['heads']} | {hours['knn']} | {hours['logistic']} | **{row['total_h']}** | "
                  f"{row['cache_gb']} GB | {memory} GB |")


if __name__ == "__main__":
    main()
