#!/usr/bin/env python
"""Pretrain a denoising diffusion autoencoder (DDAE): an unconditional diffusion model (``UNet2DModel`` or pixel
``DiTTransformer2DModel``) trained as a DDPM or with EDM's objective (``--objective edm``) on a ``datasets`` image
data set, while a probe monitor watches the linear separability of its features and keeps the best-probe weights.

Flags that exist in diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` keep
their names and meaning. Run it with ``python`` or ``accelerate launch``, e.g. on CIFAR-10::

    accelerate launch training/train_unconditional.py --dataset_name uoft-cs/cifar10 \\
        --model_config ddpm-cifar10-32 --resolution 32 --random_flip --train_batch_size 128 \\
        --learning_rate 2e-4 --lr_warmup_steps 5000 --use_ema --mixed_precision bf16 \\
        --probe_every_n_steps 5000 --output_dir ddae-cifar10

EDM (Karras et al. 2022): the same command with ``--objective edm`` (DDPM++ layout: ``--model_config
ddpmpp-cifar10``); the saved pipeline holds an ``EDMEulerScheduler`` (sigma range, ``sigma_data``), from which
every loader knows that noise levels are sigmas and how inputs are preconditioned.

Outputs in ``--output_dir``: a pipeline folder with the EMA weights (``DDPMPipeline`` for a DDPM UNet, a
``DDAEPipeline`` folder for a DiT or an EDM model), a model card ``README.md``, ``best-probe/``, ``best-fid/``
(with ``--fid_every_n_steps``: the weights whose samples scored the lowest FID, or FD in ``--fid_feature_model``),
``checkpoint-N/`` folders (``accelerator.save_state``) and ``logs/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import shlex
import shutil
import sys
import tempfile
import time

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, EDMEulerScheduler, SchedulerMixin
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.capture import EXTRACTION_BATCH_SIZE, derive_seed
from ddae_diffusers.data import (
    conversion_note,
    default_num_workers,
    detect_image_column,
    detect_label_column,
    to_rgb_array,
)
from ddae_diffusers.distributed import host_group, wait_for_main
from ddae_diffusers.errors import ArgumentParser, UsageError, fail, run_command
from ddae_diffusers.families import family_named, family_of, sample_size
from ddae_diffusers.feature_networks import load_feature_network
from ddae_diffusers.generation_metrics import GenerationScore, default_cache_dir, prepare_reference
from ddae_diffusers.hub import create_hub_repo, push_folder
from ddae_diffusers.io_utils import atomic_path, check_writable_dir
from ddae_diffusers.loading import check_source, is_hub_id
from ddae_diffusers.modelcard import PretrainingSummary, pretraining_model_card
from ddae_diffusers.noise import EDMNoise, is_edm_scheduler, noise_axis, noise_level
from ddae_diffusers.presets import PRESETS, build_denoiser
from ddae_diffusers.pretraining.checkpoints import (
    checkpoint_step,
    list_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from ddae_diffusers.pretraining.generation import GenerationMonitor, ScoreHistory
from ddae_diffusers.pretraining.monitor import ProbeHistory, ProbeMonitor, eval_split_name, load_probe_data
from ddae_diffusers.pretraining.tracking import JSONLinesTracker
from ddae_diffusers.pretraining.training_step import (
    PREDICTION_TYPES,
    NonFiniteLossError,
    check_finite_weights,
    train_step,
)

logger = get_logger(__name__, log_level="INFO")

LOGGERS = ("jsonl", "none", "tensorboard", "wandb", "all")
OBJECTIVES = ("ddpm", "edm")
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", ".*", "*.tmp", "*/.*"]
DEFAULT_NUM_EPOCHS = 100
DEFAULT_PROBE_EVERY = 500
FID_SAMPLERS = ("ddim", "ddpm")
DEFAULT_FID_DDIM_STEPS = 50
PROG = "train_unconditional.py"


# ============================================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A Hub data set id (uoft-cs/cifar10) or a local folder load_dataset understands.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--train_data_dir", type=str, default=None,
                      help="A folder of images, read with the imagefolder builder (instead of --dataset_name).")
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--image_column", type=str, default=None,
                      help="Column with the images; default: 'img' or 'image', whichever exists.")
    data.add_argument("--label_column", type=str, default=None,
                      help="Integer class column for the probe monitor; default: 'label'/'labels'/...")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on the first N examples only (debugging, quick runs).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Training resolution; default: the model's sample_size (64 if it has none).")
    data.add_argument("--center_crop", action="store_true",
                      help="Centre-crop after resizing the shorter side; otherwise a random crop.")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--dataloader_num_workers", type=int, default=None,
                      help="Image-loading worker processes (default: 0 on CPU, min(8, CPU count) on CUDA).")

    model = parser.add_argument_group("model")
    model.add_argument("--model_config", "--model_config_name_or_path", dest="model_config", type=str, default=None,
                       help=f"A preset ({', '.join(PRESETS)}) or a diffusers config.json (or its folder) of a "
                            "UNet2DModel / DiTTransformer2DModel; default ddpm-cifar10-32.")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Continue from these weights: a pipeline folder/repo or a model folder.")
    model.add_argument("--objective", choices=OBJECTIVES, default="ddpm",
                       help="ddpm: epsilon prediction over --ddpm_num_steps timesteps; edm: EDM's preconditioning, "
                            "log-normal sigmas (P_mean -1.2, P_std 1.2) and loss weighting (Karras et al. 2022).")
    model.add_argument("--edm_sigma_min", type=float, default=0.002, help="EDM: smallest sigma of the schedule.")
    model.add_argument("--edm_sigma_max", type=float, default=80.0, help="EDM: largest sigma of the schedule.")
    model.add_argument("--edm_sigma_data", type=float, default=0.5, help="EDM: the data's standard deviation.")
    model.add_argument("--ddpm_num_steps", type=int, default=1000)
    model.add_argument("--ddpm_num_inference_steps", type=int, default=None,
                       help="Sampling steps of the sample grids (default 1000 for DDPM, 18 for EDM).")
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear")
    model.add_argument("--prediction_type", type=str, default="epsilon", choices=PREDICTION_TYPES)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=16, help="Batch size per process.")
    optim.add_argument("--eval_batch_size", type=int, default=16, help="Number of images to sample.")
    optim.add_argument("--num_epochs", type=int, default=None,
                       help=f"Epochs to train (default {DEFAULT_NUM_EPOCHS}); give this or --max_train_steps.")
    optim.add_argument("--max_train_steps", type=int, default=None,
                       help="Optimiser steps to train; give this or --num_epochs.")
    optim.add_argument("--max_train_minutes", type=float, default=None,
                       help="A time budget: stop (final probe and save included) at the first step after this many "
                            "minutes of training, counted over every resumed segment. The learning-rate schedule "
                            "still spans --max_train_steps / --num_epochs.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--lr_scheduler", type=str, default="cosine", choices=[t.value for t in SchedulerType])
    optim.add_argument("--lr_warmup_steps", type=int, default=500)
    optim.add_argument("--adam_beta1", type=float, default=0.95)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-6)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is what is saved.")
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0)
    optim.add_argument("--ema_power", type=float, default=3 / 4)
    optim.add_argument("--ema_max_decay", type=float, default=0.9999)
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Default: accelerate's config/launch flag, else no. bf16 is ~1.9x faster here.")
    optim.add_argument("--seed", type=int, default=0, help="Seeds the weights, data order, augmentation and noise.")

    probe = parser.add_argument_group("probe monitor")
    probe.add_argument("--probe_every_n_steps", type=int, default=None,
                       help=f"Probe the EMA weights every N steps (0: never). Default {DEFAULT_PROBE_EVERY} "
                            "when labelled data is available, else 0.")
    probe.add_argument("--probe_layer", type=str, default=None,
                       help="Block to probe, e.g. up_blocks.1.resnets.2; default: the middle of the decoder.")
    probe.add_argument("--probe_timestep", type=noise_level, default=None,
                       help="Noise level of the probe in the model's units: a DDPM timestep index (default 10, the "
                            "paper's t=11) or an EDM sigma (default index 4 of the 18-step schedule, about 0.06).")
    probe.add_argument("--probe_train_samples", type=int, default=1000)
    probe.add_argument("--probe_eval_samples", type=int, default=500)
    probe.add_argument("--probe_dataset_name", type=str, default=None,
                       help="Labelled data set for probing (default: the training data set's labelled splits).")
    probe.add_argument("--probe_dataset_config_name", type=str, default=None)
    probe.add_argument("--probe_batch_size", type=int, default=EXTRACTION_BATCH_SIZE)
    probe.add_argument("--probe_linear_epochs", type=int, default=30,
                       help="Epochs of the quick linear probe (0: kNN only).")
    probe.add_argument("--probe_linear_lr", type=float, default=3e-3)

    fid = parser.add_argument_group("generation score (FID) monitor")
    fid.add_argument("--fid_every_n_steps", type=int, default=0,
                     help="Sample the EMA weights every N steps (and at the last step) and score the samples "
                          "against the reference images: FID/KID, or FD/KD in --fid_feature_model's space; the best "
                          "(lowest) weights go to best-fid/ (0: never).")
    fid.add_argument("--fid_num_samples", type=int, default=1000, help="Images sampled per evaluation.")
    fid.add_argument("--fid_feature_model", type=str, default=None,
                     help="An AutoModelForImageClassification (folder or Hub id) whose penultimate features replace "
                          "the FID Inception-v3 (which needs torch-fidelity and its weights); reported as FD_<name>.")
    fid.add_argument("--fid_inception_weights", type=str, default=None,
                     help="A local copy of torch-fidelity's Inception-v3 weights (.pth), for FID without a download.")
    fid.add_argument("--fid_num_inference_steps", type=int, default=None,
                     help=f"Sampling steps per image (default: {DEFAULT_FID_DDIM_STEPS} with DDIM, 1000 with DDPM, "
                          "the scheduler's 18 for EDM models).")
    fid.add_argument("--fid_sampler", type=str, default=None, choices=FID_SAMPLERS,
                     help="DDPM objective: sample with DDIM (default) or DDPM built from the training scheduler's "
                          "config; EDM models always sample with their EDM scheduler.")
    fid.add_argument("--fid_reference_samples", type=int, default=None,
                     help="Compare with the first N images of the reference split (default: all of it).")
    fid.add_argument("--fid_dataset_name", type=str, default=None,
                     help="Reference images (default: the training data set).")
    fid.add_argument("--fid_split", type=str, default=None,
                     help="Split of the reference images (default: test/validation if there is one, else train).")
    fid.add_argument("--fid_batch_size", type=int, default=64, help="Images per sampling call.")
    fid.add_argument("--fid_kid_subset_size", type=int, default=None,
                     help="KID subset size (default: min(1000, samples, reference images)).")
    fid.add_argument("--fid_cache_dir", type=str, default=None,
                     help="Cache of reference features (default: $DDAE_FID_CACHE or ~/.cache/ddae_diffusers/"
                          "fid_reference).")

    save = parser.add_argument_group("saving and logging")
    save.add_argument("--output_dir", type=str, default="ddae-model")
    save.add_argument("--overwrite_output_dir", action="store_true",
                      help="Delete checkpoints of an earlier run in --output_dir instead of refusing to start.")
    save.add_argument("--checkpointing_steps", type=int, default=500)
    save.add_argument("--checkpoints_total_limit", type=int, default=None)
    save.add_argument("--resume_from_checkpoint", type=str, default=None,
                      help="A checkpoint-N folder, or 'latest' (start fresh if there is none).")
    save.add_argument("--save_images_epochs", type=int, default=10,
                      help="Sample --eval_batch_size images every N epochs to samples/ (0: never).")
    save.add_argument("--save_model_epochs", type=int, default=10,
                      help="Also write the pipeline every N epochs (it is always written at the end).")
    save.add_argument("--logger", type=str, default="jsonl", choices=LOGGERS,
                      help="jsonl (logs/<run>/metrics.jsonl, no extra package), none, tensorboard, wandb, all.")
    save.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    save.add_argument("--push_to_hub", action="store_true")
    save.add_argument("--hub_token", type=str, default=None)
    save.add_argument("--hub_model_id", type=str, default=None)
    save.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    command_line = _redact(sys.argv[1:] if argv is None else argv)
    args.command = " ".join(["train_unconditional.py", *map(shlex.quote, command_line)])
    check_args(args)
    return args


def _redact(argv: list[str]) -> list[str]:
    """The command line with the value of --hub_token replaced by *** (it goes into logs and the card)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--hub_token="):
            out[i] = "--hub_token=***"
        elif arg == "--hub_token" and i + 1 < len(out):
            out[i + 1] = "***"
    return out


def check_args(args: argparse.Namespace) -> None:
    """Flag-level errors (conflicts, ranges), raised as ``ValueError`` before anything is loaded."""
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise UsageError("Give exactly one of --dataset_name (Hub id or local data set) and --train_data_dir.")
    if args.num_epochs is not None and args.max_train_steps is not None:
        raise UsageError("Give one of --num_epochs and --max_train_steps, not both: each sets the training length.")
    minutes = args.max_train_minutes
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise UsageError(f"--max_train_minutes must be a finite number > 0, got {args.max_train_minutes}.")
    for flag in ("num_epochs", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                 "checkpointing_steps", "checkpoints_total_limit", "resolution", "max_train_samples",
                 "probe_batch_size", "ddpm_num_steps", "eval_batch_size", "ddpm_num_inference_steps",
                 "fid_num_inference_steps", "fid_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}.")
    for flag in ("probe_every_n_steps", "save_images_epochs", "save_model_epochs", "lr_warmup_steps",
                 "probe_linear_epochs", "dataloader_num_workers", "fid_every_n_steps"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag} must be >= 0, got {value}.")
    if args.model_config is not None and args.pretrained_model_name_or_path is not None:
        raise UsageError(
            "Give --model_config (a fresh model) or --pretrained_model_name_or_path (continue from weights), not both."
        )
    if (args.hub_model_id or args.hub_private_repo) and not args.push_to_hub:
        raise UsageError("--hub_model_id/--hub_private_repo need --push_to_hub.")
    if args.probe_dataset_config_name and not args.probe_dataset_name:
        raise UsageError("--probe_dataset_config_name needs --probe_dataset_name.")
    for flag in ("fid_num_samples", "fid_reference_samples", "fid_kid_subset_size"):
        value = getattr(args, flag)
        if value is not None and value < 2:
            raise UsageError(f"--{flag} must be >= 2 (a Frechet distance needs two images a side), got {value}.")
    if args.objective == "edm" and args.fid_sampler is not None:
        raise UsageError("--fid_sampler applies to --objective ddpm: an EDM model samples with its EDM scheduler; "
                         "drop --fid_sampler.")
    for flag in ("dataset_name", "probe_dataset_name", "pretrained_model_name_or_path", "fid_dataset_name",
                 "fid_feature_model"):
        if getattr(args, flag) is not None:
            setattr(args, flag, check_source(getattr(args, flag), f"--{flag}"))
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir!r} is not a folder: give a folder of images.")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}.")
    sigmas = (args.edm_sigma_min, args.edm_sigma_max, args.edm_sigma_data)
    if not all(math.isfinite(s) and s > 0 for s in sigmas) or args.edm_sigma_min >= args.edm_sigma_max:
        raise UsageError("--edm_sigma_min/--edm_sigma_max/--edm_sigma_data must be positive, with min < max.")
    if args.objective == "edm" and args.prediction_type != "epsilon":
        raise UsageError("--prediction_type applies to --objective ddpm: EDM's network output is fixed by its "
                         "preconditioning; drop --prediction_type.")
    if not math.isfinite(args.learning_rate) or args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be a finite number > 0, got {args.learning_rate}.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a GPU; on CPU use bf16.")
    if args.logger in ("tensorboard", "wandb", "all"):
        missing = [p for p in (("tensorboard", "wandb") if args.logger == "all" else (args.logger,))
                   if not _importable(p)]
        if missing:
            raise UsageError(f"--logger {args.logger} needs {' and '.join(missing)} installed; "
                             "use --logger jsonl (no extra package) or none.")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ============================================================================================ data
def load_image_dataset(args: argparse.Namespace):
    """The training ``DatasetDict`` from --dataset_name or --train_data_dir (clear errors if missing)."""
    try:
        if args.dataset_name is not None:
            return datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
        return datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        source = args.dataset_name or args.train_data_dir
        raise UsageError(f"Could not load the data set {source!r}: {type(error).__name__}: {error}") from None


class TrainImages(torch.utils.data.Dataset):
    """Training images keyed by ``(epoch, index)``: resize the shorter side to ``resolution``, crop
    (centre or random), maybe flip, -> (3, R, R) float32 in [-1, 1]. The random crop and flip of an
    example are drawn from (seed, epoch, index), so they do not depend on batching or processes."""

    def __init__(self, split, image_column: str, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.split = split
        self.image_column = image_column
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        image = self.split[int(index)][self.image_column]
        array = to_rgb_array(image, self.resolution, center_crop=True, rng=None if self.center_crop else rng)
        if self.random_flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return torch.from_numpy(np.array(array)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys in a permutation seeded by (seed, epoch): the data order is a
    function of the seed alone, so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        return iter([(self.epoch, int(i)) for i in order])


# ============================================================================================ model
def build_model(args: argparse.Namespace, resolution: int | None) -> tuple[torch.nn.Module, SchedulerMixin]:
    """The denoiser (fresh from --model_config, or --pretrained_model_name_or_path) and the scheduler of
    --objective (``DDPMScheduler`` or ``EDMEulerScheduler``); a pretrained model keeps its objective."""
    if args.pretrained_model_name_or_path is not None:
        try:
            backbone = DDAEBackbone.from_pretrained(args.pretrained_model_name_or_path, cache_dir=args.cache_dir)
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(
                f"Could not load --pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {error}"
            ) from None
        if backbone.vae is not None:
            raise UsageError("Latent (VAE) models are not supported for pretraining: give a pixel-space model.")
        denoiser = backbone.denoiser
        if backbone.objective != args.objective:
            raise UsageError(
                f"--pretrained_model_name_or_path is a {backbone.objective.upper()} model but --objective is "
                f"{args.objective}: pass --objective {backbone.objective} to continue training it."
            )
        size = backbone.image_size
        if resolution is not None and size is not None and resolution != size:
            raise UsageError(
                f"--resolution {resolution} does not match the pretrained model's sample_size {size}: "
                f"use --resolution {size}."
            )
    else:
        from ddae_diffusers.presets import load_model_config

        config = load_model_config(args.model_config or "ddpm-cifar10-32")
        preset_size = sample_size(config)
        if resolution is not None and preset_size not in (None, resolution):
            logger.warning(f"--resolution {resolution}: building {args.model_config or 'ddpm-cifar10-32'} for "
                           f"{resolution}x{resolution} images (the preset is {preset_size}x{preset_size}).")
        resolution = resolution or sample_size(config) or 64
        _check_resolution(config, resolution)
        config["sample_size"] = resolution
        torch.manual_seed(args.seed)
        denoiser = build_denoiser(config)
    if args.objective == "edm":
        return denoiser, EDMEulerScheduler(
            sigma_min=args.edm_sigma_min, sigma_max=args.edm_sigma_max, sigma_data=args.edm_sigma_data
        )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    return denoiser, noise_scheduler


def _check_resolution(config: dict, resolution: int) -> None:
    """``ValueError`` if the architecture cannot take ``resolution`` x ``resolution`` images."""
    if family_named(config.get("_class_name", "UNet2DModel")).component == "transformer":
        patch = config.get("patch_size", 2)
        if resolution % patch:
            raise UsageError(f"--resolution {resolution} is not a multiple of the DiT patch size {patch}.")
    else:
        factor = 2 ** (len(config.get("down_block_types", [None] * 4)) - 1)
        if resolution % factor:
            raise UsageError(
                f"--resolution {resolution} cannot go through this UNet's {factor}x down-sampling: "
                f"use a multiple of {factor} (e.g. {max(factor, round(resolution / factor) * factor)})."
            )


def pipeline_for(denoiser, noise_scheduler):
    """The pipeline to save: ``DDPMPipeline`` for a DDPM UNet, ``DDAEPipeline`` for a DiT or an EDM model
    (``DDPMPipeline`` neither preconditions nor scales the initial noise)."""
    component = family_of(denoiser).component
    if component == "unet" and not isinstance(noise_axis(noise_scheduler), EDMNoise):
        return DDPMPipeline(unet=denoiser, scheduler=noise_scheduler)
    from ddae_diffusers.pipelines.pipeline_ddae import DDAEPipeline

    return DDAEPipeline(**{component: denoiser}, scheduler=noise_scheduler)


def diverged(what: str, output_dir: str) -> NonFiniteLossError:
    """The error that stops a diverged run: what happened, the last good checkpoint, and the fix."""
    last = list_checkpoints(output_dir)
    return NonFiniteLossError(
        f"Stopping: {what}. The last good checkpoint is {last[-1] if last else 'none (none was written yet)'}. "
        "Start over with a lower --learning_rate (with --overwrite_output_dir, or another --output_dir): a "
        "resume restores the checkpoint's learning-rate schedule, so it would diverge again."
    )


def check_weights(model, ema, step: int, output_dir: str) -> None:
    """Stops the run, saving nothing, if the weights (or their EMA) are no longer finite."""
    try:
        check_finite_weights(model, ema, where=f" after step {step}")
    except NonFiniteLossError as error:
        raise diverged(f"{error}; nothing was saved", output_dir) from None


def save_pipeline(denoiser, noise_scheduler, folder: str, card=None) -> None:
    """Writes the pipeline (and model card) into ``folder`` without ever leaving half-written entries:
    each component is written aside and renamed into place; ``model_index.json`` comes last."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pipeline.", dir=folder) as staging:
        pipeline_for(denoiser, noise_scheduler).save_pretrained(staging)
        if card is not None:
            card.save(os.path.join(staging, "README.md"))
        for name in sorted(os.listdir(staging), key=lambda n: n == "model_index.json"):
            with atomic_path(os.path.join(folder, name)) as target:
                os.replace(os.path.join(staging, name), target)


def build_ema(args: argparse.Namespace, model: torch.nn.Module) -> EMAModel:
    """The EMA of ``model``'s parameters, on their device (build it after ``accelerator.prepare`` moved them)."""
    return EMAModel(
        model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
        power=args.ema_power, model_cls=type(model), model_config=model.config,
    )


class EMAWeights:
    """``with EMAWeights(ema, model):`` swaps the EMA weights into ``model`` and restores them after."""

    def __init__(self, ema: EMAModel | None, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


class TrainState:
    """Counters that are part of every checkpoint (with the model, optimiser, EMA and probe history)."""

    def __init__(self):
        self.global_step = 0
        self.images_seen = 0
        self.wall_time = 0.0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "images_seen": self.images_seen, "wall_time": self.wall_time}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.images_seen = int(state["images_seen"])
        self.wall_time = float(state["wall_time"])


# ============================================================================================ main
def main(args: argparse.Namespace) -> str:
    """Trains and returns the output folder."""
    start_time = time.time()
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    log_with = {"none": None, "jsonl": [JSONLinesTracker("train_unconditional", logging_dir)]}.get(
        args.logger, args.logger
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    host_group()  # every rank, now: the long waits for the main process (probing, sampling, saving) use it
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes == 1:
        raise UsageError(
            f"WORLD_SIZE={world_size} but accelerate sees 1 process: the processes would train independent "
            "copies into one folder. On CPU launch with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N ...` (or torchrun with ACCELERATE_USE_CPU=true)."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()

    # ---- everything that can be wrong with the inputs is checked here, before any training step
    check_writable_dir(args.output_dir)
    old_checkpoints = list_checkpoints(args.output_dir)
    if old_checkpoints and args.resume_from_checkpoint is None:
        if not args.overwrite_output_dir:
            raise UsageError(
                f"{args.output_dir!r} holds checkpoints of an earlier run ({os.path.basename(old_checkpoints[-1])}): "
                "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over."
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for old in old_checkpoints:
                shutil.rmtree(old)
    resume_path = None
    if args.resume_from_checkpoint is not None:
        resume_path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)

    dataset_dict = load_image_dataset(args)
    if "train" not in dataset_dict:
        raise UsageError(f"The data set has no 'train' split (splits: {list(dataset_dict)}).")
    train_split = dataset_dict["train"]
    image_column = detect_image_column(train_split, args.image_column)
    if args.max_train_samples is not None:
        train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))

    denoiser, noise_scheduler = build_model(args, args.resolution)
    backbone = DDAEBackbone(denoiser, noise_scheduler)
    resolution = args.resolution or backbone.image_size
    if args.probe_timestep is None:
        args.probe_timestep = backbone.noise_axis.default_probe_level()

    probe_layer = args.probe_layer or backbone.default_layer()
    monitor = _build_monitor(args, dataset_dict, image_column, denoiser, noise_scheduler, resolution, probe_layer)
    probe_every = args.probe_every_n_steps if monitor is not None else 0
    fid_monitor = _build_generation_monitor(args, dataset_dict, image_column, noise_scheduler, resolution)
    fid_every = args.fid_every_n_steps if fid_monitor is not None else 0
    if fid_monitor is not None:
        fid_monitor.network.to(accelerator.device)  # features on the device that samples

    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_hub_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                                  token=args.hub_token, private=args.hub_private_repo)

    # ---- model, EMA, optimiser, data
    denoiser.train()
    optimizer = torch.optim.AdamW(
        denoiser.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    note = conversion_note(train_split[0][image_column], resolution)
    if note:
        logger.warning(f"{note} for training (first image).")
    sampler = EpochSampler(len(train_split), args.seed)
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_num_workers(accelerator.device)
    train_dataloader = torch.utils.data.DataLoader(
        TrainImages(train_split, image_column, resolution, args.center_crop, args.random_flip, args.seed),
        batch_size=args.train_batch_size, sampler=sampler, num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    if args.max_train_steps is not None:
        max_train_steps = args.max_train_steps
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    else:
        num_epochs = args.num_epochs or DEFAULT_NUM_EPOCHS
        max_train_steps = num_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = build_ema(args, unwrapped) if args.use_ema else None  # after prepare: on the model's device
    state, history, scores = TrainState(), ProbeHistory(), ScoreHistory()
    for obj in (state, history) if ema is None else (state, history, ema):
        accelerator.register_for_checkpointing(obj)
    if fid_monitor is not None:  # last, so the indices of the others do not depend on it
        accelerator.register_for_checkpointing(scores)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps

    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        try:
            accelerator.load_state(resume_path)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
            reason = " ".join(str(error).split())[:200]
            raise UsageError(
                f"{resume_path} is damaged ({type(error).__name__}: {reason}): resume from an earlier checkpoint-N "
                "with --resume_from_checkpoint, or start over with --overwrite_output_dir."
            ) from None
        if ema is not None:
            ema.to(device=accelerator.device)  # load_state reads the EMA's state onto the CPU
        if state.global_step != checkpoint_step(resume_path):
            raise UsageError(f"{resume_path} holds the state of step {state.global_step}, not its name's step.")
        resumed_lr = getattr(lr_scheduler, "scheduler", lr_scheduler).base_lrs[0]
        if not math.isclose(resumed_lr, args.learning_rate, rel_tol=1e-9):
            raise UsageError(
                f"--learning_rate {args.learning_rate:g} differs from the {resumed_lr:g} of {resume_path}: a resume "
                f"continues the checkpoint's schedule. Pass --learning_rate {resumed_lr:g} to resume, or start over "
                "(--overwrite_output_dir) with the new rate."
            )
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"No checkpoint in {args.output_dir!r}: starting a new run.")

    if accelerator.is_main_process:
        config = {k: v for k, v in vars(args).items()
                  if isinstance(v, (int, float, str, bool, type(None))) and k != "hub_token"}
        accelerator.init_trackers("train_unconditional", config=config)
    logger.info(
        f"{len(train_split)} images, {num_epochs} epochs, {max_train_steps} steps of {total_batch_size} images "
        f"({accelerator.num_processes} processes x {args.train_batch_size} x {args.gradient_accumulation_steps} "
        f"accumulation), {sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters, "
        f"mixed precision {accelerator.mixed_precision}."
    )

    # ---- training loop
    first_epoch = state.global_step // steps_per_epoch
    skip_batches = (state.global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress = tqdm(total=max_train_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="Steps")
    postfix: dict[str, str] = {}
    segment_start = time.time()
    out_of_time = False
    for epoch in range(first_epoch, num_epochs):
        if state.global_step >= max_train_steps or out_of_time:
            break
        model.train()
        loader, offset = train_dataloader, 0
        if epoch == first_epoch and skip_batches:
            loader, offset = accelerator.skip_first_batches(train_dataloader, skip_batches), skip_batches
        loader.set_epoch(epoch)  # reaches the EpochSampler (a fresh skip loader would otherwise say epoch 0)
        for batch_index, clean_images in enumerate(loader, start=offset):
            # Every micro-step draws its noise, timesteps and dropout from its own seed.
            torch.manual_seed(derive_seed(args.seed, epoch * batches_per_process + batch_index,
                                        accelerator.process_index))
            try:
                loss = train_step(accelerator, model, optimizer, lr_scheduler, noise_scheduler, clean_images,
                                  generator=None, ema=ema, max_grad_norm=args.max_grad_norm)
            except NonFiniteLossError as error:
                raise diverged(f"the loss became non-finite ({error}) at step {state.global_step + 1} "
                               f"(epoch {epoch}); nothing was updated with it", args.output_dir) from None
            state.images_seen += clean_images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], "step": state.global_step,
                    "epoch": epoch, "images_seen": state.images_seen}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            postfix["loss"] = f"{logs['loss']:.4f}"

            if args.max_train_minutes is not None:
                # the main process's clock decides; every process stops at the same step
                if accelerator.is_main_process and (
                    state.wall_time + time.time() - segment_start >= 60 * args.max_train_minutes
                ):
                    accelerator.set_trigger()
                out_of_time = accelerator.check_trigger()
            is_last = state.global_step >= max_train_steps or out_of_time
            if probe_every and (state.global_step % probe_every == 0 or is_last):
                if accelerator.is_main_process:
                    metrics = probe_step(monitor, unwrapped, ema, noise_scheduler, history, state, args.output_dir)
                    logs.update({f"probe/{k}": v for k, v in metrics.items()})
                    postfix.update({k.replace("_acc", ""): f"{v:.3f}" for k, v in metrics.items()})
                wait_for_main(accelerator)
            if fid_every and (state.global_step % fid_every == 0 or is_last):
                if accelerator.is_main_process:
                    score = fid_step(fid_monitor, unwrapped, ema, noise_scheduler, args.fid_sampler, scores, state,
                                     args.output_dir)
                    logs[f"fid/{score.fd_name}"] = score.fd
                    if score.kid_mean is not None:
                        logs.update({f"fid/{score.kd_name}_mean": score.kid_mean,
                                     f"fid/{score.kd_name}_std": score.kid_std})
                    postfix[score.fd_name] = f"{score.fd:.4g}"
                wait_for_main(accelerator)
            progress.set_postfix(postfix)
            accelerator.log(logs, step=state.global_step)
            if state.global_step % args.checkpointing_steps == 0:
                now = time.time()
                state.wall_time += now - segment_start
                segment_start = now
                check_weights(unwrapped, ema, state.global_step, args.output_dir)
                path = save_checkpoint(accelerator, args.output_dir, state.global_step, args.checkpoints_total_limit)
                logger.info(f"Saved state to {path}")
            if is_last:
                break

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            done = state.global_step >= max_train_steps or epoch == num_epochs - 1 or out_of_time
            if args.save_images_epochs and ((epoch + 1) % args.save_images_epochs == 0):
                with EMAWeights(ema, unwrapped):
                    save_samples(args, unwrapped, noise_scheduler, epoch, accelerator)
            if args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0 and not done:
                check_weights(unwrapped, ema, state.global_step, args.output_dir)
                with EMAWeights(ema, unwrapped):
                    save_pipeline(unwrapped, noise_scheduler, args.output_dir)
        wait_for_main(accelerator)
    progress.close()
    state.wall_time += time.time() - segment_start

    # ---- final pipeline (EMA weights) and model card
    if accelerator.is_main_process:
        summary = pretraining_summary(
            args, unwrapped, backbone, state, history, monitor, probe_layer, total_batch_size,
            accelerator.mixed_precision, ema is not None, repo_id, fid_monitor=fid_monitor, scores=scores,
        )
        check_weights(unwrapped, ema, state.global_step, args.output_dir)
        with EMAWeights(ema, unwrapped):
            save_pipeline(unwrapped, noise_scheduler, args.output_dir, card=pretraining_model_card(summary))
        logger.info(f"Saved the pipeline to {args.output_dir} ({summary.steps} steps, "
                    f"{summary.images_seen} images, {time.time() - start_time:.0f}s in this process)")
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, token=args.hub_token, commit_message="End of training",
                        ignore_patterns=UPLOAD_IGNORE_PATTERNS)
    wait_for_main(accelerator)
    accelerator.end_training()
    return args.output_dir


def pretraining_summary(
    args: argparse.Namespace,
    model: torch.nn.Module,
    backbone: DDAEBackbone,
    state: TrainState,
    history: ProbeHistory,
    monitor: ProbeMonitor | None,
    probe_layer: str,
    total_batch_size: int,
    mixed_precision: str,
    use_ema: bool,
    repo_id: str | None,
    fid_monitor: GenerationMonitor | None = None,
    scores: ScoreHistory | None = None,
) -> PretrainingSummary:
    """The run's summary (what its model card shows) from its flags, model and counters."""
    scored = fid_monitor is not None and scores is not None
    return PretrainingSummary(
        model_name=os.path.basename(os.path.abspath(args.output_dir)),
        model_class=type(model).__name__,
        num_params=sum(p.numel() for p in model.parameters()),
        dataset=args.dataset_name or args.train_data_dir,
        hub_dataset=args.dataset_name if is_hub_id(args.dataset_name) else None,
        command=args.command,
        steps=state.global_step,
        images_seen=state.images_seen,
        wall_time_s=state.wall_time,
        total_batch_size=total_batch_size,
        mixed_precision=mixed_precision,
        objective=backbone.objective,
        probe_layer=probe_layer,
        probe_timestep=args.probe_timestep,
        probe_level_text=backbone.noise_axis.level_text(args.probe_timestep),
        probe_description=monitor.data.description if monitor else "probe monitor off",
        history=[dict(record) for record in history.records],
        best=dict(history.best) if history.best else None,
        use_ema=use_ema,
        repo_or_path=repo_id or args.output_dir,
        probe_eval_images=len(monitor.data.eval_ids) if monitor else None,
        generation_history=[dict(record) for record in scores.records] if scored else [],
        generation_best=dict(scores.best) if scored and scores.best else None,
        generation_metric=fid_monitor.metric_name if scored else None,
        generation_description=fid_monitor.description() if scored else None,
    )


def _build_monitor(
    args, dataset_dict, image_column, denoiser, noise_scheduler, resolution, layer: str
) -> ProbeMonitor | None:
    """The probe monitor of ``layer``, or None when probing is off; all its inputs are validated here."""
    if args.probe_every_n_steps == 0:
        return None
    probe_dict = dataset_dict
    probe_image_column = image_column
    if args.probe_dataset_name is not None:
        try:
            probe_dict = datasets.load_dataset(
                args.probe_dataset_name, args.probe_dataset_config_name, cache_dir=args.cache_dir
            )
        except Exception as error:
            raise UsageError(f"Could not load --probe_dataset_name {args.probe_dataset_name!r}: {error}") from None
        probe_image_column = None
    elif args.probe_every_n_steps is None:
        try:
            detect_label_column(dataset_dict["train"], args.label_column)
        except ValueError:
            logger.info("The training data has no label column: the probe monitor is off.")
            return None
    if args.probe_every_n_steps is None:
        args.probe_every_n_steps = DEFAULT_PROBE_EVERY
    data = load_probe_data(
        probe_dict, resolution, args.probe_train_samples, args.probe_eval_samples,
        image_column=probe_image_column, label_column=args.label_column, seed=args.seed,
    )
    monitor = ProbeMonitor(
        data, layer, args.probe_timestep,
        batch_size=args.probe_batch_size, linear_epochs=args.probe_linear_epochs, linear_lr=args.probe_linear_lr,
        dtype=torch.bfloat16 if args.mixed_precision == "bf16" else None, seed=args.seed,
    )
    monitor.check(denoiser, noise_scheduler)
    return monitor


def probe_step(monitor, model, ema, noise_scheduler, history, state, output_dir) -> dict[str, float]:
    """The monitor's step: probes the EMA weights; a new best is written to ``output_dir/best-probe`` (atomically)."""
    check_weights(model, ema, state.global_step, output_dir)
    with EMAWeights(ema, model):
        metrics = monitor.evaluate(model, noise_scheduler)
        if history.add(state.global_step, state.images_seen, metrics):
            with atomic_path(os.path.join(output_dir, "best-probe")) as target:
                pipeline_for(model, noise_scheduler).save_pretrained(target)
    logger.info(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def _build_generation_monitor(args, dataset_dict, image_column, noise_scheduler, resolution: int):
    """The generation-score monitor, or None when ``--fid_every_n_steps`` is 0. Everything it needs (the feature
    network, the reference split and column, the counts) is loaded and checked here, before training."""
    if not args.fid_every_n_steps:
        return None
    network = load_feature_network(args.fid_feature_model, args.fid_inception_weights)
    if args.fid_dataset_name is not None:
        split = args.fid_split or "test"
        reference, name, column = prepare_reference(
            args.fid_dataset_name, split=split, num_reference=args.fid_reference_samples
        )
    else:
        split = args.fid_split or eval_split_name(dataset_dict) or "train"
        if split not in dataset_dict:
            raise UsageError(f"--fid_split {split!r} is not a split of the data set ({list(dataset_dict)}).")
        reference, name, column = prepare_reference(
            dataset_dict[split], split=split, image_column=image_column, num_reference=args.fid_reference_samples
        )
        name = args.dataset_name or args.train_data_dir
    name = os.path.abspath(name) if os.path.isdir(name) else name
    sampler = sampling_scheduler(noise_scheduler, args.fid_sampler)
    steps = args.fid_num_inference_steps
    if steps is None and isinstance(sampler, DDIMScheduler):
        steps = DEFAULT_FID_DDIM_STEPS
    num_train = sampler.config.num_train_timesteps
    if steps is not None and not is_edm_scheduler(sampler) and steps > num_train:
        raise UsageError(f"--fid_num_inference_steps {steps} is more than the {num_train} training timesteps.")
    return GenerationMonitor(
        network, reference, dataset_name=name, split=split, image_column=column, resolution=resolution,
        num_samples=args.fid_num_samples, num_inference_steps=steps, sampler=type(sampler).__name__,
        batch_size=args.fid_batch_size, seed=args.seed, kid_subset_size=args.fid_kid_subset_size,
        cache_dir=args.fid_cache_dir or default_cache_dir(),
    )  # fmt: skip


def sampling_scheduler(noise_scheduler, sampler: str | None) -> SchedulerMixin:
    """A fresh scheduler to sample with (never the training one, whose state sampling would change): DDIM (the
    default) or DDPM from a DDPM scheduler's config, the same EDM scheduler class for an EDM model."""
    if is_edm_scheduler(noise_scheduler):
        return type(noise_scheduler).from_config(noise_scheduler.config)
    scheduler_class = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    return scheduler_class.from_config(noise_scheduler.config)


def fid_step(monitor, model, ema, noise_scheduler, sampler, scores, state, output_dir) -> GenerationScore:
    """The generation monitor's step: scores samples of the EMA weights; a new best (lowest) is written to
    ``output_dir/best-fid`` (atomically)."""
    from ddae_diffusers.pipelines.pipeline_ddae import DDAEPipeline

    check_weights(model, ema, state.global_step, output_dir)
    with EMAWeights(ema, model):
        pipeline = DDAEPipeline(**{family_of(model).component: model},
                                scheduler=sampling_scheduler(noise_scheduler, sampler))
        pipeline.set_progress_bar_config(disable=True)
        score = monitor.evaluate(pipeline)
        if scores.add(state.global_step, state.images_seen, score):
            with atomic_path(os.path.join(output_dir, "best-fid")) as target:
                pipeline_for(model, noise_scheduler).save_pretrained(target)
    logger.info(f"step {state.global_step}: {score.summary()}")
    return score


def save_samples(args, model, noise_scheduler, epoch: int, accelerator: Accelerator) -> None:
    """Samples ``--eval_batch_size`` images (seed 0) into ``samples/epoch-<e>.png`` and the trackers."""
    pipeline = pipeline_for(model, noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    was_training = model.training
    model.eval()
    images = pipeline(
        batch_size=args.eval_batch_size,
        # None: the pipeline's default for its scheduler (DDPMPipeline 1000 steps, DDAEPipeline 18 for EDM)
        **({} if args.ddpm_num_inference_steps is None else {"num_inference_steps": args.ddpm_num_inference_steps}),
        generator=torch.Generator(device=model.device).manual_seed(0), output_type="pil",
    ).images
    model.train(was_training)
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    images += [Image.new("RGB", images[0].size)] * (rows * cols - len(images))  # black tiles fill the last row
    grid = make_image_grid(images, rows=rows, cols=cols)
    path = os.path.join(args.output_dir, "samples", f"epoch-{epoch + 1:04d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    if args.logger in ("tensorboard", "all"):
        accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", np.asarray(grid), epoch,
                                                                      dataformats="HWC")


def cli(argv: list[str] | None = None) -> None:
    """The command: a usage error is one line and exit status 2; a diverged run one line and status 1."""
    try:
        run_command(PROG, lambda: main(parse_args(argv)))
    except NonFiniteLossError as error:
        fail(PROG, str(error), status=1)


if __name__ == "__main__":
    cli()
