"""Train a noise-conditional DDAE classifier on frozen features and measure its accuracy at each noise level.

    python training/train_noise_conditional.py --model_name_or_path examples/ddae-cifar10-cpu \\
        --layer mid_block.resnets.1 --dataset_name uoft-cs/cifar10 --output_dir ddae-cifar10-noise-conditional \\
        --with_random_init

The head (a two-layer MLP told the level) is trained over all noise levels on the frozen denoiser's features and
saved as a ``DDAEForImageClassification`` (``forward(..., timestep=...)``; without ``timestep`` it classifies at
``--timestep``, so ``pipeline("image-classification")`` works) that also guides ``DDAEPipeline`` sampling. The
test accuracy at the 20 DDPM levels 0, 50, ..., 950 (the DDAE paper's t = 1, 51, ..., 951) or the 18 EDM sigmas
goes to ``accuracy_by_level.json``, ``.md`` and ``.png``; ``--with_random_init`` adds the same architecture with
a randomly initialised denoiser, trained and tested the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from ddae_diffusers.capture import DDAEBackbone
from ddae_diffusers.data import (
    detect_eval_split,
    detect_image_column,
    detect_label_column,
    label_names,
    load_split,
    pixels_of,
    read_labels,
)
from ddae_diffusers.errors import ArgumentParser, UsageError, run_command
from ddae_diffusers.io_utils import atomic_path, check_writable_dir
from ddae_diffusers.noise import noise_level
from ddae_diffusers.noise_conditional import (
    DEFAULT_HIDDEN_DIM,
    accuracy_by_level,
    noise_conditional_classifier,
    plot_accuracy_by_level,
    train_noise_conditional_head,
)
from ddae_diffusers.probing.stats import compare, format_interval

PROG = "train_noise_conditional.py"


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="A diffusers DDPM or EDM model: folder or Hub id.")
    parser.add_argument("--layer", required=True, help="The feature block, e.g. mid_block.resnets.1.")
    parser.add_argument("--timestep", default=None, help="The level forward uses by default (default: the probe's).")
    parser.add_argument("--dataset_name", required=True, help="A Hub dataset id or a folder load_dataset reads.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default=None, help="Default: test, validation, ... whichever exists.")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--levels_per_image", type=int, default=4, help="Training levels drawn per image.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--head_hidden_dim", type=int, default=DEFAULT_HIDDEN_DIM)
    parser.add_argument("--eval_levels", nargs="+", default=None, help="Default: 20 DDPM levels / 18 EDM sigmas.")
    parser.add_argument("--with_random_init", action="store_true", help="Also the same network at random init.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def load_images(args, split: str, max_samples: int | None, resolution: int):
    """(N, 3, R, R) pixels in [-1, 1], (N,) labels and the class names of one split."""
    dataset = load_split(args.dataset_name, split, max_samples, args.dataset_config_name)
    image_column = detect_image_column(dataset, args.image_column)
    label_column = detect_label_column(dataset, args.label_column)
    pixels = pixels_of(dataset[image_column], resolution)
    return pixels, torch.as_tensor(read_labels(dataset, label_column)), label_names(dataset, label_column)


def random_init_backbone(backbone: DDAEBackbone, seed: int) -> DDAEBackbone:
    """The same denoiser architecture with diffusers' random initialisation, and the same noise schedule."""
    torch.manual_seed(seed)
    denoiser = type(backbone.denoiser).from_config(backbone.denoiser.config)
    return DDAEBackbone(denoiser, backbone.scheduler, backbone.vae)


def table(curves: dict[str, list[dict]], unit: str) -> str:
    """A markdown table: one row per level, one accuracy column (with its 95% interval) per curve."""
    names = list(curves)
    lines = [
        f"| {unit} | sigma (VE) | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, row in enumerate(curves[names[0]]):
        cells = [format_interval(curves[n][i]["accuracy"], curves[n][i]["ci95"], unit="") for n in names]
        lines.append(f"| {row['level']} | {row['ve_sigma']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    output_dir = check_writable_dir(args.output_dir)
    backbone = DDAEBackbone.from_pretrained(args.model_name_or_path)
    if backbone.family.conditional:
        raise UsageError(f"{backbone.family.name} is text-conditioned: use an unconditional DDPM or EDM model.")
    layer = backbone.check_layers([args.layer])[0]
    level = None if args.timestep is None else backbone.check_timesteps([noise_level(args.timestep)])[0]
    eval_levels = args.eval_levels and backbone.check_timesteps([noise_level(text) for text in args.eval_levels])
    eval_split = detect_eval_split(args.dataset_name, args.dataset_config_name, args.eval_split)
    resolution = backbone.image_size

    train_x, train_y, names = load_images(args, args.train_split, args.max_train_samples, resolution)
    eval_x, eval_y, _ = load_images(args, eval_split, args.max_eval_samples, resolution)
    num_labels = int(max(train_y.max(), eval_y.max())) + 1
    id2label = {i: name for i, name in enumerate(names)} if names and len(names) == num_labels else None

    networks = {"DDAE": backbone}
    if args.with_random_init:
        networks["random init"] = random_init_backbone(backbone, args.seed)
    curves, fits, seconds, models = {}, {}, {}, {}
    for name, network in networks.items():
        start = time.perf_counter()
        model = noise_conditional_classifier(
            network, layer, num_labels=num_labels, id2label=id2label, timestep=level,
            head_hidden_dim=args.head_hidden_dim, base_model=args.model_name_or_path,
        )  # fmt: skip
        fits[name] = train_noise_conditional_head(
            model, train_x, train_y, args.levels_per_image, args.epochs, args.learning_rate,
            batch_size=args.batch_size, seed=args.seed,
        )  # fmt: skip
        curves[name] = accuracy_by_level(model, eval_x, eval_y, eval_levels, seed=args.seed)
        seconds[name] = time.perf_counter() - start
        models[name] = model
        print(f"{name}: trained and tested in {seconds[name]:.0f} s", file=sys.stderr)

    unit = backbone.noise_axis.unit
    result = {
        "model": args.model_name_or_path,
        "layer": layer,
        "dataset": args.dataset_name,
        "train_split": args.train_split,
        "eval_split": eval_split,
        "train_images": int(train_x.shape[0]),
        "eval_images": int(eval_x.shape[0]),
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "curves": {
            name: {
                "fit": vars(fits[name]),
                "seconds": seconds[name],
                "levels": [{k: v for k, v in row.items() if k != "correct"} for row in rows],
            }
            for name, rows in curves.items()
        },
    }
    if "random init" in curves:
        result["paired_tests"] = [
            {"level": a["level"], **compare(a["correct"], b["correct"], seed=args.seed)}
            for a, b in zip(curves["DDAE"], curves["random init"], strict=True)
        ]
    models["DDAE"].config.training_summary = {
        "protocol": "noise-conditional head on frozen features, trained over all noise levels",
        "dataset": args.dataset_name,
        "train_split": args.train_split,
        "eval_split": eval_split,
        "accuracy_by_level": {str(row["level"]): row["accuracy"] for row in curves["DDAE"]},
    }
    models["DDAE"].save_pretrained(output_dir)
    with atomic_path(os.path.join(output_dir, "accuracy_by_level.json")) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    with atomic_path(os.path.join(output_dir, "accuracy_by_level.md")) as tmp, open(tmp, "w") as f:
        f.write(f"Test accuracy (%) [95% interval] of `{layer}` of `{args.model_name_or_path}` by noise level, "
                f"{eval_x.shape[0]} images of {eval_split}.\n\n{table(curves, unit)}\n")
    plot = os.path.join(output_dir, "accuracy_by_level.png")
    plot_accuracy_by_level(curves, plot, f"{layer}, noise-conditional head")
    return result


if __name__ == "__main__":
    run_command(PROG, main)
