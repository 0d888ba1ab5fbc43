"""Train a small CIFAR-10 classifier from scratch: an independent feature network for offline generation scores.

A transformers ``ResNetForImageClassification`` on a tiny config (basic blocks), trained on 32x32 CIFAR-10 images
with random crop (4-pixel zero padding) and horizontal flip, upsampled to the model's input size. The learning rate
follows a one-cycle schedule over ``--epochs`` or ``--max_minutes``, whichever ends first. The test accuracy is
measured after saving, through the saved ``AutoImageProcessor`` and ``AutoModelForImageClassification``, on the whole
test split, and written into the model card with its 95% Wilson interval::

    python scripts/train_reference_classifier.py --data path/to/cifar10 --output_dir examples/cifar10-cpu-resnet

``--data`` is a ``datasets`` folder or Hub id in the layout of ``uoft-cs/cifar10`` (columns ``img``, ``label``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)
from transformers.models.vit import ViTImageProcessorPil

from ddae_diffusers.probing.stats import wilson_interval

MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 in the layout of uoft-cs/cifar10 (img, label)")
    parser.add_argument("--output_dir", default="examples/cifar10-cpu-resnet")
    parser.add_argument("--resolution", type=int, default=64, help="the model's input size (images are upsampled)")
    parser.add_argument("--hidden_sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 2, 2])
    parser.add_argument("--embedding_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--max_minutes", type=float, default=24.0, help="wall-clock budget of the training loop")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=0.1, help="peak SGD learning rate (one-cycle)")
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def decode_split(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, 3, 32, 32) uint8 images, (N,) int64 labels and the class names of one split."""
    dataset = load_dataset(data, split=split)
    names = dataset.features["label"].names
    images = np.stack([np.asarray(image.convert("RGB")) for image in dataset["img"]])
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, names


def augment(images: torch.Tensor, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, 32, 32) uint8 -> (B, 3, R, R) float, normalised: random crop (pad 4), flip, bilinear upsampling."""
    b, _, h, w = images.shape
    padded = F.pad(images.float() / 255.0, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 3, h, w + 8)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, 3, h, w)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return normalise(cropped, resolution)


def normalise(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, 32, 32) float in [0, 1] -> (B, 3, R, R), bilinear (half-pixel centres, like PIL's upsampling)."""
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def one_cycle(progress: float, peak: float) -> float:
    """Linear warm-up over the first 15% of training, then cosine decay to zero."""
    if progress < 0.15:
        return peak * progress / 0.15
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - 0.15) / 0.85)))


@torch.no_grad()
def test_accuracy(output_dir: str, data: str, batch_size: int = 500) -> tuple[int, int]:
    """(correct, total) of the SAVED model on the whole test split, preprocessed by its saved image processor."""
    processor = AutoImageProcessor.from_pretrained(output_dir)
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    dataset = load_dataset(data, split="test")
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        inputs = processor(images=[image.convert("RGB") for image in rows["img"]], return_tensors="pt")
        predictions = model(**inputs).logits.argmax(-1)
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct, len(dataset)


def write_card(output_dir: str, args: argparse.Namespace, facts: dict, command: str) -> None:
    low, high = facts["wilson_95"]
    accuracy = facts["correct"] / facts["total"]
    card = f"""---
library_name: transformers
pipeline_tag: image-classification
datasets:
- uoft-cs/cifar10
metrics:
- accuracy
---

# cifar10-cpu-resnet

A small ResNet (`ResNetForImageClassification`, basic blocks, hidden sizes {args.hidden_sizes}, depths {args.depths},
stem width {args.embedding_size}; {facts["parameters"]:,} parameters) trained from scratch on CIFAR-10 on
{args.threads} CPU thread(s).
It is an independent classifier, unrelated to any DDAE: its penultimate features (the input of the final linear layer,
{args.hidden_sizes[-1]} values) serve as the feature space of an offline Frechet distance (`ddae-fid --feature_model`).

## Accuracy

On the 10,000 test images of CIFAR-10, preprocessed by the saved image processor:
**{accuracy:.2%}** ({facts["correct"]:,}/{facts["total"]:,}; 95% Wilson interval {low:.2%} to {high:.2%}).

## Training

- data: the 50,000 training images of CIFAR-10 (`uoft-cs/cifar10`), random crop (4-pixel zero padding) and horizontal
  flip at 32x32, then bilinear upsampling to {args.resolution}x{args.resolution}, normalised with the CIFAR-10 channel
  mean and standard deviation
- optimiser: SGD, momentum 0.9, Nesterov, weight decay {args.weight_decay} (not on norms and biases), batch size
  {args.batch_size}, peak learning rate {args.learning_rate} with a 15% linear warm-up then cosine decay, over
  {args.epochs} epochs or {args.max_minutes:g} minutes, whichever ends first
- this run: {facts["steps"]:,} steps ({facts["epochs_done"]:.2f} epochs) in {facts["train_minutes"]:.1f} minutes,
  {args.threads} CPU thread(s), seed {args.seed}, final training loss {facts["final_loss"]:.3f}

```
{command}
```

## Use

```python
from transformers import pipeline

classify = pipeline("image-classification", model="examples/cifar10-cpu-resnet")
```
"""
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels, names = decode_split(args.data, "train")
    print(f"decoded {len(labels)} training images", flush=True)

    config = ResNetConfig(
        embedding_size=args.embedding_size,
        hidden_sizes=args.hidden_sizes,
        depths=args.depths,
        layer_type="basic",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    model = ResNetForImageClassification(config)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.0,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = len(labels) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    budget = args.max_minutes * 60
    start = time.monotonic()
    step, loss_ema = 0, float("nan")
    model.train()
    done = False
    while not done:
        order = torch.randperm(len(labels), generator=generator)
        for batch in range(steps_per_epoch):
            elapsed = time.monotonic() - start
            progress = max(step / total_steps, elapsed / budget)
            if progress >= 1.0:
                done = True
                break
            for group in optimizer.param_groups:
                group["lr"] = one_cycle(progress, args.learning_rate)
            index = order[batch * args.batch_size : (batch + 1) * args.batch_size]
            loss = model(pixel_values=augment(images[index], args.resolution, generator), labels=labels[index]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
            step += 1
            if step % 100 == 0:
                epoch = step / steps_per_epoch
                print(f"step {step} epoch {epoch:.2f} loss {loss_ema:.3f} {elapsed / 60:.1f} min", flush=True)
    train_minutes = (time.monotonic() - start) / 60

    os.makedirs(args.output_dir, exist_ok=True)
    model.eval().save_pretrained(args.output_dir)
    processor = ViTImageProcessorPil(
        do_resize=True,
        size={"height": args.resolution, "width": args.resolution},
        resample=2,  # PIL bilinear
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=MEAN,
        image_std=STD,
    )
    processor.save_pretrained(args.output_dir)
    correct, total = test_accuracy(args.output_dir, args.data)
    facts = {
        "correct": correct,
        "total": total,
        "accuracy": correct / total,
        "wilson_95": list(wilson_interval(correct, total)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "epochs_done": step / steps_per_epoch,
        "train_minutes": train_minutes,
        "final_loss": loss_ema,
    }
    command = "python scripts/train_reference_classifier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_card(args.output_dir, args, facts, command)
    print(json.dumps(facts, indent=2), flush=True)


if __name__ == "__main__":
    main()
