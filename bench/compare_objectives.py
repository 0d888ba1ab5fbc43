"""DDPM vs. EDM at an equal budget: the same probe grid and a sample grid for two pretrained models.

Give the output folders of two ``train_unconditional.py`` runs that differ only in ``--objective``. Each model
is probed with ``ddae-probe``'s default layers and its objective's default noise levels (DDPM timesteps
0..400, EDM sigma indices 2..8; both span about VE sigma 0.01 to 1-2) on the same images, and samples 16
images (DDPM: its 1000-step DDPM sampler; EDM: 18 Euler steps). Writes, under ``--output_dir``:
``results.json`` (best cell, best cell per part, probe history and training time of each),
``<name>/results.md`` + ``heatmap.png`` + ``knn_heatmap.png`` (the probe reports), ``<name>-samples.png``.

    python bench/compare_objectives.py --run ddpm=runs/equal-ddpm --run edm=runs/equal-edm \\
        --dataset data/cifar10-sample --output_dir bench/results/edm-vs-ddpm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ddae_diffusers.pipelines import DDAEPipeline  # noqa: E402
from diffusers.utils import make_image_grid  # noqa: E402

from ddae_diffusers.pretraining.tracking import read_jsonl  # noqa: E402
from ddae_diffusers.probing.engine import ProbeConfig, run_probe  # noqa: E402
from ddae_diffusers.probing.report import best_per_part  # noqa: E402

REPORT_FILES = ("results.md", "heatmap.png", "knn_heatmap.png")


def training_summary(folder: str) -> dict:
    """Steps, images seen, wall time and probe history of a training run (from its metrics log)."""
    records = read_jsonl(os.path.join(folder, "logs", "train_unconditional", "metrics.jsonl"))
    steps = [r for r in records if "loss" in r]
    keys = ("step", "probe/knn_acc", "probe/linear_acc")
    probes = [{k: r[k] for k in keys} for r in records if "probe/knn_acc" in r]
    return {"steps": steps[-1]["step"], "images_seen": steps[-1]["images_seen"], "final_loss": steps[-1]["loss"],
            "wall_s_from_step_1": round(steps[-1]["time"] - steps[0]["time"], 1), "probe_history": probes}


def sample_grid(folder: str, path: str, seed: int) -> None:
    """16 samples (4 x 4) with the pipeline's own scheduler and its default number of steps."""
    pipe = DDAEPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=16, generator=torch.manual_seed(seed)).images
    make_image_grid(images, rows=4, cols=4).resize((256, 256)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="name=folder of a training run (repeat).")
    parser.add_argument("--dataset", default="uoft-cs/cifar10", help="Labelled data (Hub id or local folder).")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=os.path.join(REPO, "bench", "results", "edm-vs-ddpm"))
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.run)
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {"dataset": args.dataset, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "runs": {}}
    for name, folder in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = ProbeConfig(model=folder, dataset=args.dataset, output_dir=tmp, cache_dir=os.path.join(tmp, "c"),
                                 max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                                 batch_size=args.batch_size, seed=args.seed)
            result = run_probe(config)
            report = os.path.join(args.output_dir, name)
            os.makedirs(report, exist_ok=True)
            for file in REPORT_FILES:
                shutil.copy(os.path.join(tmp, file), os.path.join(report, file))
        cells = result.to_dict()["cells"]
        best = result.best
        summary["runs"][name] = {
            "model": folder,
            "objective": result.objective,
            "training": training_summary(folder),
            "best_cell": {"layer": best.layer, "level": best.timestep, "linear_acc": best.linear_acc,
                          "knn_acc": best.knn_acc},
            "best_knn": max(cells, key=lambda c: c["knn_acc"])["knn_acc"],
            "best_per_part": {part: {"layer": c["layer"], "level": c["timestep"], "linear_acc": c["linear_acc"],
                                     "knn_acc": c["knn_acc"]} for part, c in best_per_part(cells).items()},
            "noise_levels": result.noise_levels,
            "probe_wall_s": round(sum(lap["wall_s"] for lap in result.timings.values()), 1),
        }
        sample_grid(folder, os.path.join(args.output_dir, f"{name}-samples.png"), args.seed)
        print(f"{name}: best {best.layer} @ {best.timestep}: linear {100 * best.linear_acc:.2f}%, "
              f"kNN {100 * best.knn_acc:.2f}%")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
