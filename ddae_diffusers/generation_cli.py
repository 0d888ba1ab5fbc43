"""``ddae-fid``: FID and KID of a pipeline's samples against a data set (or FD/KD in a classifier's feature space).

Examples::

    ddae-fid --model ./my-ddpm --dataset uoft-cs/cifar10 --num_samples 10000        # FID (torch-fidelity)
    ddae-fid --model examples/ddae-cifar10-cpu --dataset data/cifar10-sample --num_samples 500 \\
        --feature_model examples/cifar10-cpu-resnet --scheduler ddim --num_inference_steps 20   # offline FD
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import ArgumentParser, UsageError, run_command
from .generation_metrics import (
    DEFAULT_KID_SUBSETS,
    DEFAULT_NUM_SAMPLES,
    GenerationScore,
    default_cache_dir,
    score_pipeline,
)

DEFAULT_DATASET = "uoft-cs/cifar10"
SCHEDULERS = ("pipeline", "ddim", "ddpm")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ddae-fid",
        description="Frechet and kernel distances of a diffusion pipeline's samples to a data set (torchmetrics).",
    )
    add = parser.add_argument
    add("--model", required=True, help="Folder or Hub id of a DDAEPipeline / DDPMPipeline (model_index.json).")
    add("--dataset", default=DEFAULT_DATASET,
        help=f"Reference images: Hub id or folder loadable by datasets.load_dataset (default: {DEFAULT_DATASET}; "
             "data/cifar10-sample in this repository is a local sample of it).")
    add("--split", default="test", help="Split of the reference images (default: test).")
    add("--image_column", default=None, help="Image column (default: auto-detected, e.g. img/image).")
    add("--num_reference", type=int, default=None, help="Use the first N images of the split (default: all).")
    add("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES, help="Images to generate.")
    add("--feature_model", default=None,
        help="Score in the feature space of this AutoModelForImageClassification (folder or Hub id; the input of "
             "its final linear layer), reported as FD_<name>/KD_<name>, instead of the FID Inception-v3.")
    add("--inception_weights", default=None,
        help="A local copy of torch-fidelity's Inception-v3 weights (.pth), for FID without a download.")
    add("--num_inference_steps", type=int, default=None, help="Sampling steps (default: the scheduler's).")
    add("--scheduler", choices=SCHEDULERS, default="pipeline",
        help="Sample with the pipeline's own scheduler, or DDIM/DDPM built from its config (DDPM-family models).")
    add("--batch_size", type=int, default=64, help="Images per sampling call.")
    add("--seed", type=int, default=0, help="Seed of the sampling noise and of KID's subsets.")
    add("--no_kid", action="store_true", help="Skip the kernel distance.")
    add("--kid_subset_size", type=int, default=None, help="KID subset size (default: min(1000, both counts)).")
    add("--kid_subsets", type=int, default=DEFAULT_KID_SUBSETS, help="KID subsets.")
    add("--cache_dir", default=None,
        help="Cache of reference features (default: $DDAE_FID_CACHE or ~/.cache/ddae_diffusers/fid_reference).")
    add("--no_cache", action="store_true", help="Compute the reference features without reading or writing a cache.")
    add("--device", default=None, help="Device to sample on (default: cuda if available, else cpu).")
    add("--output", default=None, help="Also write the scores as JSON to this file.")
    return parser


def set_scheduler(pipeline, name: str) -> None:
    """Swaps ``pipeline.scheduler`` for DDIM or DDPM built from its config ('pipeline' keeps it)."""
    if name == "pipeline":
        return
    from diffusers import DDIMScheduler, DDPMScheduler

    from .noise import is_edm_scheduler

    if is_edm_scheduler(pipeline.scheduler):
        raise UsageError(f"--scheduler {name} needs a DDPM-family model; this one has an EDM scheduler: drop it.")
    scheduler_class = DDIMScheduler if name == "ddim" else DDPMScheduler
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)


def main(argv: Sequence[str] | None = None) -> GenerationScore:
    args = build_parser().parse_args(argv)
    import torch

    from .feature_networks import load_feature_network
    from .loading import check_source

    if args.no_cache and args.cache_dir is not None:
        raise UsageError("--no_cache and --cache_dir contradict each other: drop one.")
    if args.num_samples < 2:
        raise UsageError(f"The Frechet distance needs at least 2 samples, got --num_samples {args.num_samples}.")
    if not args.no_kid and args.kid_subset_size is not None and args.kid_subset_size > args.num_samples:
        raise UsageError(f"--kid_subset_size {args.kid_subset_size} is more than --num_samples {args.num_samples}: "
                         "KID draws its subsets from the samples; lower it or pass --no_kid.")
    model = check_source(args.model, "--model")
    network = load_feature_network(args.feature_model, args.inception_weights)  # before anything heavy
    from ddae_diffusers.pipelines import DDAEPipeline

    pipeline = DDAEPipeline.from_pretrained(model)
    set_scheduler(pipeline, args.scheduler)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline.to(device)
    network.to(device)
    pipeline.set_progress_bar_config(disable=True)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())

    def progress(done: int, total: int) -> None:
        print(f"\rsampled {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    score = score_pipeline(
        pipeline, args.dataset, num_samples=args.num_samples, feature=network, split=args.split,
        image_column=args.image_column, num_reference=args.num_reference,
        num_inference_steps=args.num_inference_steps, batch_size=args.batch_size, seed=args.seed,
        kid=not args.no_kid, kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
        cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    print(score.summary())
    if args.output:
        from .io_utils import atomic_path

        record = {**score.as_dict(), "model": args.model, "dataset": args.dataset, "split": args.split,
                  "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps, "seed": args.seed}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with atomic_path(args.output) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    return score


def console_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``ddae-fid``: exits 0 on success, 2 with one ``ddae-fid: error: ...`` line on a usage error."""
    run_command("ddae-fid", lambda: main(argv))


if __name__ == "__main__":
    console_main()
