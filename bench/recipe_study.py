"""Pretraining recipes at an equal time budget: the table of runs, ranked by the probe monitor's linear accuracy.

Give the output folders of ``train_unconditional.py`` runs made with the same ``--max_train_minutes`` (and the same
probe monitor settings). For each: its architecture and parameter count, the flags that differ between the runs,
steps and images seen in the budget, the last loss, and the monitor's linear and kNN accuracy at its last probe
(and at its best). Writes ``--out`` (JSON) and prints a markdown table.

    python bench/recipe_study.py --run lr1e-3=runs/recipe-lr1e-3 --run lr2e-3=runs/recipe-lr2e-3 \\
        --out bench/results/recipe_study.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from compare_objectives import training_summary  # noqa: E402

from ddae_diffusers.io_utils import atomic_path  # noqa: E402
from ddae_diffusers.pretraining.tracking import read_jsonl  # noqa: E402

COMPARED = ("model_config", "learning_rate", "lr_warmup_steps", "lr_scheduler", "train_batch_size", "objective",
            "random_flip", "use_ema", "max_train_minutes")


def run_row(name: str, folder: str) -> dict:
    """One run: its settings (the first record of its metrics log), budget use and probe results."""
    with open(os.path.join(folder, "unet", "config.json")) as f:
        model_config = json.load(f)
    records = read_jsonl(os.path.join(folder, "logs", "train_unconditional", "metrics.jsonl"))
    settings = next(r["config"] for r in records if "config" in r)
    summary = training_summary(folder)
    history = summary["probe_history"]
    last = history[-1] if history else {}
    best = max(history, key=lambda r: r["probe/linear_acc"]) if history else {}
    return {
        "name": name,
        "folder": folder,
        "settings": {key: settings.get(key) for key in COMPARED},
        "block_out_channels": model_config.get("block_out_channels"),
        **{key: summary[key] for key in ("steps", "images_seen", "final_loss", "wall_s_from_step_1")},
        "last_probe": last,
        "best_probe": best,
        "probe_history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="name=folder of a training run (repeat).")
    parser.add_argument("--out", default="bench/results/recipe_study.json")
    args = parser.parse_args()
    rows = [run_row(*spec.split("=", 1)) for spec in args.run]
    rows.sort(key=lambda r: -r["last_probe"].get("probe/linear_acc", 0.0))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    print("| run | channels | lr | batch | steps | images | last loss | linear % (last) | kNN % (last) | "
          "linear % (best, step) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        last, best, s = r["last_probe"], r["best_probe"], r["settings"]
        print(f"| {r['name']} | {r['block_out_channels']} | {s['learning_rate']:g} | {s['train_batch_size']} | "
              f"{r['steps']} | {r['images_seen']:,} | {r['final_loss']:.4f} | "
              f"{100 * last['probe/linear_acc']:.2f} | {100 * last['probe/knn_acc']:.2f} | "
              f"{100 * best['probe/linear_acc']:.2f} ({best['step']}) |")


if __name__ == "__main__":
    main()
