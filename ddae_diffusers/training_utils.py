"""Reusable pieces of ``training/train_unconditional.py``: the diffusion loss, one optimiser step,
per-step seeding, a JSON-lines tracker, atomic checkpoints and the pretraining model card.

The script and ``bench/bench_train.py`` call the same :func:`train_step`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from diffusers import SchedulerMixin

from .capture import Denoiser, denoiser_kwargs
from .errors import UsageError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The loss of a training step is NaN or infinite (on any process)."""


def step_seed(seed: int, micro_step: int, process_index: int = 0) -> int:
    """A 63-bit seed for one micro-step of one process, independent of everything before it."""
    state = np.random.SeedSequence([int(seed), int(micro_step), int(process_index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def diffusion_loss(
    denoiser: Denoiser,
    noise_scheduler: SchedulerMixin,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """The DDPM training loss for a (B, C, H, W) batch of clean images in [-1, 1].

    ``noise`` (B, C, H, W) and ``timesteps`` (B,) are given by the caller. The target follows
    ``noise_scheduler.config.prediction_type``: ``epsilon`` (MSE to the noise), ``sample``
    (MSE to the clean image weighted by SNR, as diffusers' example) or ``v_prediction``.
    A DiT gets the null class id; a learned-sigma DiT's variance channels are ignored.
    """
    noisy = noise_scheduler.add_noise(clean_images, noise, timesteps)
    output = denoiser(noisy, timesteps, **denoiser_kwargs(_unwrap(denoiser), clean_images.shape[0], noisy.device))
    prediction = output.sample[:, : clean_images.shape[1]].float()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return F.mse_loss(prediction, noise.float())
    if prediction_type == "v_prediction":
        return F.mse_loss(prediction, noise_scheduler.get_velocity(clean_images, noise, timesteps).float())
    if prediction_type == "sample":
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean_images.device)[timesteps]
        snr = (alphas_cumprod / (1 - alphas_cumprod)).view(-1, 1, 1, 1)
        return (snr * F.mse_loss(prediction, clean_images.float(), reduction="none")).mean()
    raise UsageError(f"Unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}.")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    noise_scheduler: SchedulerMixin,
    clean_images: torch.Tensor,
    generator: torch.Generator,
    ema=None,
    max_grad_norm: float = 1.0,
) -> torch.Tensor:
    """One micro-step: noise and timesteps from ``generator``, forward under the accelerator's
    autocast, backward, and (on gradient-sync steps) clipping, optimiser, LR and EMA updates.

    ``clean_images``: (B, C, H, W) in [-1, 1]. Returns the loss averaged over processes; raises
    :class:`NonFiniteLossError` before any update if the loss is NaN/inf on any process.
    """
    num_timesteps = noise_scheduler.config.num_train_timesteps
    noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
    timesteps = torch.randint(0, num_timesteps, (clean_images.shape[0],), generator=generator)
    timesteps = timesteps.to(clean_images.device)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = diffusion_loss(model, noise_scheduler, clean_images, noise, timesteps)
        losses = accelerator.gather(loss.detach().reshape(1))
        if not torch.isfinite(losses).all():
            raise NonFiniteLossError(f"loss is {loss.item()}")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    if ema is not None and accelerator.sync_gradients:
        ema.step(_unwrap(model).parameters())
    return losses.mean()


# ---------------------------------------------------------------------------------------------- tracking
class JSONLinesTracker(GeneralTracker):
    """An accelerate tracker that appends one JSON object per ``log`` call to ``<logging_dir>/metrics.jsonl``.

    Needs nothing beyond the standard library; the first line holds the run configuration.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name = run_name
        self.path = os.path.join(logging_dir, run_name, "metrics.jsonl")

    @property
    def tracker(self) -> str:
        return self.path

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values, "time": time.time()})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self._write({"step": step, **values, "time": time.time()})


def read_jsonl(path: str) -> list[dict]:
    """The records of a :class:`JSONLinesTracker` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str) -> list[str]:
    """Complete ``checkpoint-N`` folders in ``output_dir``, oldest (smallest N) first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(n)]
    names.sort(key=lambda n: int(CHECKPOINT_PATTERN.match(n).group(1)))
    return [os.path.join(output_dir, n) for n in names if os.path.isdir(os.path.join(output_dir, n))]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """The checkpoint folder for ``--resume_from_checkpoint`` (a path, a folder name, or ``latest``).

    ``latest`` with no checkpoint yet returns None (start fresh); a missing path raises ``ValueError``.
    """
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            return candidate
    raise UsageError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist: give a checkpoint-N folder, "
        f"or 'latest' for the newest one in {output_dir!r}."
    )


def checkpoint_step(path: str) -> int:
    """N of a ``checkpoint-N`` folder."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise UsageError(f"{path!r} is not a checkpoint-N folder.")
    return int(match.group(1))


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, atomically, on every process.

    The state is written to a hidden temporary folder and renamed once every process has
    finished, so a kill never leaves a half-written ``checkpoint-N``. Then the oldest
    checkpoints beyond ``total_limit`` are removed.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
