"""Classifier guidance by the DDAE's own noise-conditional head, judged by an independent classifier.

    python bench/guidance_study.py --model examples/ddae-cifar10-cpu --head ddae-cifar10-noise-conditional \\
        --judge examples/cifar10-cpu-resnet --per_class 20 --scales 1 3 10 --output_dir guidance-study

For each guidance scale (0 = unguided) it draws ``--per_class`` samples of every class with the same initial noise
(sample i of every setting starts from seed i), with DDIM, and reports the share that the judge (an image classifier
that does not use the DDAE's features) assigns to the requested class, with its 95% Wilson interval, the share the
head itself assigns at the lowest level, and the sampling time per image. Unguided samples are "requested" round
robin, so their share is the chance that a sample lands in its assigned class. Writes ``guidance.json``,
``guidance.md`` and ``guidance_grid.png`` (one row of samples per class at ``--grid_scale``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler
from transformers import AutoImageProcessor, AutoModelForImageClassification

from ddae_diffusers import DDAEForImageClassification, DDAEPipeline
from ddae_diffusers.io_utils import atomic_path
from ddae_diffusers.probing.stats import format_interval, wilson_interval


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The unconditional DDAE (pipeline folder or Hub id).")
    parser.add_argument("--head", required=True, help="Its noise-conditional classifier folder.")
    parser.add_argument("--judge", required=True, help="An independent AutoModelForImageClassification folder.")
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps.")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--grid_scale", type=float, default=None, help="Default: the largest scale.")
    parser.add_argument("--grid_columns", type=int, default=10)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args()


@torch.no_grad()
def judge_predictions(judge, processor, images: list[PIL.Image.Image]) -> np.ndarray:
    """(N,) class ids the judge assigns to PIL images."""
    predictions = []
    for start in range(0, len(images), 256):
        inputs = processor(images=images[start : start + 256], return_tensors="pt")
        predictions.append(judge(**inputs).logits.argmax(-1).numpy())
    return np.concatenate(predictions)


@torch.no_grad()
def head_predictions(head: DDAEForImageClassification, images: torch.Tensor) -> np.ndarray:
    """(N,) class ids the noise-conditional head assigns to (N, 3, H, W) images in [0, 1] at diffusers t=0."""
    return head(images * 2 - 1, timestep=0).logits.argmax(-1).numpy()


def sample(pipe: DDAEPipeline, labels: list[int], scale: float | None, steps: int, batch_size: int, first_seed: int):
    """(N, 3, H, W) samples in [0, 1] for the requested labels (``scale=None``: unguided), seconds taken."""
    chunks, start_time = [], time.perf_counter()
    for start in range(0, len(labels), batch_size):
        batch = labels[start : start + batch_size]
        generators = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(batch))]
        guidance = {} if scale is None else {"class_labels": batch, "guidance_scale": scale}
        kwargs = {"batch_size": len(batch)} if scale is None else {}
        chunks.append(
            pipe(generator=generators, num_inference_steps=steps, output_type="pt", **guidance, **kwargs).images
        )
    return torch.cat(chunks), time.perf_counter() - start_time


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [PIL.Image.fromarray(a) for a in arrays]


def grid(images: torch.Tensor, labels: list[int], names: list[str], columns: int) -> PIL.Image.Image:
    """One row per class: its first ``columns`` samples, the class name on the left."""
    from PIL import ImageDraw

    size = images.shape[-1]
    margin = 70
    canvas = PIL.Image.new("RGB", (margin + columns * (size + 2), len(names) * (size + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    pictures = to_pil(images)
    for row, name in enumerate(names):
        draw.text((4, row * (size + 2) + size // 2 - 5), name, fill="black")
        picked = [i for i, label in enumerate(labels) if label == row][:columns]
        for column, index in enumerate(picked):
            canvas.paste(pictures[index], (margin + column * (size + 2), row * (size + 2)))
    return canvas.resize((canvas.width * 2, canvas.height * 2), PIL.Image.NEAREST)


def main() -> None:
    args = parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    head = DDAEForImageClassification.from_pretrained(args.head).eval()
    pipe = DDAEPipeline.from_pretrained(args.model, classifier=head)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    judge = AutoModelForImageClassification.from_pretrained(args.judge).eval()
    processor = AutoImageProcessor.from_pretrained(args.judge)
    num_labels = head.config.num_labels
    names = [str(head.config.id2label[i]) for i in range(num_labels)]
    labels = [i % num_labels for i in range(args.per_class * num_labels)]

    rows, grid_images = [], None
    grid_scale = args.grid_scale if args.grid_scale is not None else max(args.scales)
    for scale in [None, *args.scales]:
        images, seconds = sample(pipe, labels, scale, args.steps, args.batch_size, first_seed=0)
        judged = judge_predictions(judge, processor, to_pil(images)) == np.array(labels)
        self_judged = head_predictions(head, images) == np.array(labels)
        hits = int(judged.sum())
        rows.append({
            "guidance_scale": 0.0 if scale is None else scale,
            "samples": len(labels),
            "judge_share": hits / len(labels),
            "judge_share_ci95": list(wilson_interval(hits, len(labels))),
            "judge_share_per_class": [float(judged[np.array(labels) == c].mean()) for c in range(num_labels)],
            "head_share": float(self_judged.mean()),
            "seconds_per_image": seconds / len(labels),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        if scale == grid_scale:
            grid_images = images
    result = {"command": "python bench/guidance_study.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "judge": args.judge, "head": args.head, "model": args.model, "rows": rows}  # fmt: skip
    with atomic_path(os.path.join(args.output_dir, "guidance.json")) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    unguided_time = rows[0]["seconds_per_image"]
    lines = ["| guidance scale | judged as requested (%) | head's own (%) | s / image | time vs unguided |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['guidance_scale']:g} | {format_interval(row['judge_share'], row['judge_share_ci95'], unit='')} | "
            f"{100 * row['head_share']:.1f} | {row['seconds_per_image']:.3f} | "
            f"{row['seconds_per_image'] / unguided_time:.2f}x |"
        )
    with atomic_path(os.path.join(args.output_dir, "guidance.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    if grid_images is not None:
        with atomic_path(os.path.join(args.output_dir, "guidance_grid.png")) as tmp:
            grid(grid_images, labels, names, args.grid_columns).save(tmp, format="PNG")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
