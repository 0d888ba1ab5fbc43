"""``ddae-probe``: the layer x timestep probe grid from the command line.

Examples::

    ddae-probe --model google/ddpm-cifar10-32 --dataset uoft-cs/cifar10 --output_dir probe-out
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m ddae_diffusers.probing.cli \\
        --model ./my-ddpm --dataset data/cifar10-sample --timesteps 10 50 --output_dir probe-out
    ddae-probe --model ./my-edm --dataset data/cifar10-sample --sigma_index 3 4 5 --output_dir probe-edm
    ddae-probe --model ./my-ddpm --dataset data/cifar10-sample --output_dir probe-out \
        --push_to_hub --hub_model_id me/ddae-cifar10-probe   # the best cell as a Hub classifier
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from accelerate.logging import get_logger

from ..capture import EXTRACTION_BATCH_SIZE
from ..distributed import host_group
from ..errors import ArgumentParser, UsageError, run_command
from ..families import UNCONDITIONAL
from ..hub import create_hub_repo
from ..loading import check_source, inspect_source
from ..noise import DEFAULT_EDM_INDICES, EDM_SAMPLING_STEPS, axis_class, noise_level
from .engine import (
    CUDA_BATCH_SIZE,
    DEFAULT_TIMESTEPS,
    DTYPES,
    HALVING_FROM_ROWS,
    LOGISTIC_CELLS,
    PROTOCOLS,
    RECIPES,
    SEARCHES,
    TRAIN_AUGMENTS,
    ProbeConfig,
    prepare,
    run_probe,
)
from .fewshot import FEW_SHOT_SEEDS
from .fused import HEAD_KINDS
from .heads import NORMALIZATIONS, ProbeRecipe
from .publish import check_cell_in_grid, parse_push_cell, publish_probe
from .suite import TRANSFER_MD, run_suite

DEFAULT_DATASET = "uoft-cs/cifar10"
logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ddae-probe",
        description="Linear and kNN probes of a diffusion denoiser's pooled features over a layer x timestep grid.",
    )
    add = parser.add_argument
    add("--model", required=True, help="Hub id or folder of a diffusers pipeline (model_index.json) or model.")
    add("--dataset", default=None,
        help=f"Hub id or local folder loadable by datasets.load_dataset (default: {DEFAULT_DATASET}, which needs the "
             "Hub or its cache; data/cifar10-sample in this repository is a 5,000/1,000 sample of it).")
    add("--datasets", nargs="+", default=None, metavar="DATASET",
        help="Probe the model on each of these data sets (Hub ids or folders) with one configuration, with the "
             "pixel baseline and a random-init probe of each best cell, and write transfer.md/transfer.json (one "
             "row per data set, 95%% intervals, paired tests) beside one probe folder per data set.")
    add("--image_column", default=None, help="Image column (default: auto-detected, e.g. img/image).")
    add("--label_column", default=None, help="Integer class-label column (default: auto-detected, e.g. label).")
    add("--train_split", default="train")
    add("--eval_split", default=None,
        help="Held-out split to score on (default: the first of test, validation, valid, val that the data set has).")
    add("--max_train_samples", type=int, default=None)
    add("--max_eval_samples", type=int, default=None)
    add("--layers", nargs="+", default=None,
        help="Block names (default: every resnet/attention output of encoder, mid block and decoder).")
    add("--timesteps", "--noise_levels", dest="timesteps", nargs="+", type=noise_level, default=None,
        help="Noise levels in the model's units: diffusers timestep indices for DDPM models (the paper's t=11 is "
             f"10; default {' '.join(map(str, DEFAULT_TIMESTEPS))}), sigmas for EDM models (e.g. 0.06; default: "
             f"--sigma_index {' '.join(map(str, DEFAULT_EDM_INDICES))}).")
    add("--sigma_index", nargs="+", type=int, default=None,
        help=f"EDM models: noise levels as indices of the {EDM_SAMPLING_STEPS}-step EDM sampling schedule counted "
             "from the clean end (index 0 is sigma 0), as the DDAE code does: 4 is about sigma 0.06, 3 0.023, 5 0.14.")
    add("--resolution", type=int, default=None, help="Image side (default: the model's sample size).")
    add("--prompt", default=None,
        help="Text-conditioned models (Stable Diffusion, PixArt, SD3, Flux): condition on this prompt (default: the "
             "empty prompt, encoded once with the pipeline's own text encoders).")
    add("--batch_size", type=int, default=None,
        help=f"Extraction batch size (default: {EXTRACTION_BATCH_SIZE} on CPU, where small batches run fastest; "
             f"{CUDA_BATCH_SIZE} on CUDA).")
    add("--num_workers", type=int, default=None,
        help="Image-loading worker processes that decode and convert batches ahead of the forward (default: 0 on "
             "CPU, i.e. in the main process, which leaves the cores to the forward; min(8, CPU count) on CUDA). "
             "Features are the same whatever the count.")
    add("--output_dir", required=True)
    add("--cache_dir", default=None, help="Feature cache (default: <output_dir>/feature_cache).")
    add("--train_views", type=int, default=1,
        help="Views of the train set: view 0 is the clean images (as the test set), views 1.. are augmented with "
             "--train_augment and fresh noise.")
    add("--train_augment", choices=TRAIN_AUGMENTS, default="crop_flip",
        help="Augmentation of train views 1..K-1: 'crop_flip' (4-pixel padded random crop + horizontal flip) or "
             "'none' (fresh noise only).")
    add("--lrs", nargs="+", type=float, default=list(ProbeRecipe().lrs),
        help="Head learning rates to sweep (default: 1e-3 to 10 in half-decade steps); a cell whose best rate is at "
             "an edge gets the next rates out, up to 3 times (logged and listed in results.md).")
    add("--epochs", type=int, default=ProbeRecipe().epochs, help="Head training epochs over the cached features.")
    add("--head_batch_size", type=int, default=ProbeRecipe().batch_size)
    add("--normalization", choices=NORMALIZATIONS, default="standardize")
    add("--recipe", choices=RECIPES, default="converge",
        help="'paper': raw features, Adam lr 1e-3, 15 epochs, batch 128 (overrides lrs/epochs/normalization).")
    add("--protocol", choices=PROTOCOLS, default="cached",
        help="'online': the paper's protocol, features recomputed every epoch (slow reference).")
    add("--dtype", choices=list(DTYPES), default="float32", help="Autocast dtype of the forward passes.")
    add("--seed", type=int, default=0)
    add("--random_init", action="store_true",
        help="Baseline: probe the same architecture with freshly initialised weights (seeded by --seed).")
    add("--fused_probes", action="store_true",
        help="Also train heads on concatenations of cells (the top 2/3/5 on validation, the best layer at every "
             "level, every layer at the best level), chosen on validation; results.md compares them with the best "
             "single cell.")
    add("--fused_head", choices=HEAD_KINDS, default="linear",
        help="Head of the fused probes: linear, or a small MLP (one hidden layer of 512, ReLU).")
    add("--search", choices=SEARCHES, default="auto",
        help=f"'auto' (default): 'halving' from {HALVING_FROM_ROWS:,} training images on (cached, 3+ noise levels), "
             "'exhaustive' below. 'halving': score every cell on a 1/eta^R random share of the train split, keep "
             "the best 1/eta of the noise levels, grow the share eta-fold, and finish the last level on the full "
             "splits (fewer forwards; results.md lists the rungs).")
    add("--halving_eta", type=int, default=3, help="--search halving: the reduction factor per rung.")
    add("--pixel_baseline", action="store_true",
        help="Baseline: also probe the flattened raw pixels (same views, rows and heads) and report them.")
    add("--logistic_cells", type=int, default=None,
        help=f"L-BFGS logistic regression (standardised features, C chosen on validation) on this many of the best "
             f"cells on validation, beside their linear and kNN accuracies (default: {LOGISTIC_CELLS}, none with "
             "--protocol online; 0: none; a full-batch fit per cell).")
    add("--few_shot", type=int, nargs="+", default=None, metavar="K",
        help="Few-shot probes of the best cell: logistic regression on K labelled images per class (e.g. 1 5 10 "
             "25), over --few_shot_seeds random draws (mean, std and the 95%% interval of the mean).")
    add("--few_shot_seeds", type=int, default=FEW_SHOT_SEEDS, help="Random draws per --few_shot count.")
    add("--alignment", action="store_true",
        help="Also measure each cell's alignment (two noise draws of the same image) and uniformity (Wang and Isola) "
             "on 5,000 training images: results.json, results.md and alignment/uniformity heatmaps.")
    hub = parser.add_argument_group("publishing (the flags of the diffusers and transformers example scripts)")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="After the grid, push the best cell (or --push_cell) as a DDAEForImageClassification "
                          "with its model card and results.json, in one commit.")
    hub.add_argument("--hub_model_id", default=None, help="Repository id (default: the --output_dir folder name).")
    hub.add_argument("--hub_private_repo", action="store_true", help="Create the repository as private.")
    hub.add_argument("--hub_token", default=None, help="Hub write token (default: the logged-in one).")
    hub.add_argument("--push_cell", default=None, metavar="LAYER@LEVEL",
                     help="The cell to publish, e.g. up_blocks.1.resnets.2@10 (default: best on validation).")
    return parser


HUB_FLAGS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_token", "push_cell")


def check_publishable(family: str, objective: str | None) -> None:
    """``--push_to_hub`` publishes a ``DDAEForImageClassification``: unconditional DDPM or EDM denoisers only."""
    if family not in UNCONDITIONAL or objective not in (None, "ddpm", "edm"):
        raise UsageError(
            f"--push_to_hub publishes a DDAEForImageClassification, which takes unconditional DDPM or EDM denoisers "
            f"({', '.join(UNCONDITIONAL)}); this {family}{f' ({objective})' if objective else ''} cannot be one: "
            "drop --push_to_hub."
        )


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    hub = {name: getattr(args, name) for name in HUB_FLAGS}  # not part of the run's recorded config (the token)
    for name in HUB_FLAGS:
        delattr(args, name)
    if not hub["push_to_hub"] and any(hub[name] for name in HUB_FLAGS[1:]):
        raise UsageError("--hub_model_id, --hub_private_repo, --hub_token and --push_cell need --push_to_hub.")
    parse_push_cell(hub["push_cell"])
    datasets = args.datasets
    del args.datasets
    if datasets is not None and (args.dataset is not None or hub["push_to_hub"] or args.random_init):
        raise UsageError("--datasets runs the suite: drop --dataset, --push_to_hub and --random_init (each data set "
                         "gets its random-init probe).")  # fmt: skip
    if datasets is not None:
        args.dataset = datasets[0]
        datasets = [check_source(dataset, "--datasets") for dataset in datasets]
    dataset_defaulted = args.dataset is None
    args.dataset = DEFAULT_DATASET if dataset_defaulted else args.dataset
    args.model = check_source(args.model, "--model")
    args.dataset = check_source(args.dataset, "--dataset")
    config = ProbeConfig(**vars(args))
    from accelerate import Accelerator

    accelerator = Accelerator()
    host_group()  # every rank, now: the other ranks wait on it while the main process trains the heads
    if dataset_defaulted:
        logger.warning(f"No --dataset given: probing on {DEFAULT_DATASET} (CIFAR-10 from the Hub).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and accelerator.num_processes == 1:
        raise UsageError(
            "WORLD_SIZE > 1 but accelerate started a single process: on CPU launch with "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N."
        )
    if datasets is not None:
        table = run_suite(config, datasets, accelerator)
        if table is not None:
            print(f"transfer table of {len(datasets)} data sets -> {os.path.join(args.output_dir, TRANSFER_MD)}")
        return table
    repo_id = None
    if hub["push_to_hub"]:
        if args.random_init:
            raise UsageError("--push_to_hub publishes the probed model's weights: a --random_init baseline has other "
                             "weights; drop one of the two.")
        check_publishable(inspect_source(args.model).family.name, None)
        # every process: a refused id or token stops all of them before any extraction
        repo_id = create_hub_repo(
            hub["hub_model_id"] or os.path.basename(os.path.abspath(args.output_dir)),
            token=hub["hub_token"], private=hub["hub_private_repo"] or None,
        )
    prepared = prepare(config, accelerator=accelerator)
    check_cell_in_grid(hub["push_cell"], prepared.layers, prepared.timesteps)
    if repo_id is not None:
        check_publishable(prepared.backbone.family.name, prepared.backbone.objective)
    results = run_probe(config, accelerator, prepared=prepared)
    if results is not None and repo_id is not None:
        commit = publish_probe(args.output_dir, repo_id, cell=hub["push_cell"], token=hub["hub_token"])
        print(f"pushed to {commit.commit_url}")
    if results is not None:
        best = results["best"]
        print(
            f"best cell (on validation): {best['layer']} @ {axis_class(results.objective).label(best['timestep'])}: "
            f"linear {100 * best['linear_acc']:.2f}%, kNN {100 * best['knn_acc']:.2f}% -> {args.output_dir}/results.md"
        )
    return results


def console_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``ddae-probe`` command: exits 0 on success (``main`` returns the results dict),
    2 with one ``ddae-probe: error: ...`` line on a usage error."""
    run_command("ddae-probe", lambda: main(argv))


if __name__ == "__main__":
    console_main()
