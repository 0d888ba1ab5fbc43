"""One pretraining step: the diffusion loss, the optimiser step and the per-step seed.

``training/train_unconditional.py`` and ``bench/bench_train.py`` call the same :func:`train_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import SchedulerMixin
from diffusers.training_utils import EMAModel

from ..capture import Denoiser, denoiser_kwargs
from ..errors import UsageError
from ..noise import EDMNoise, noise_axis

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class NonFiniteLossError(RuntimeError):
    """The loss of a training step is NaN or infinite (on any process)."""


def non_finite_weights(tensors) -> tuple[int, int] | None:
    """``(index, count)`` of the first tensor of ``tensors`` holding NaN or inf values, else None."""
    for index, tensor in enumerate(tensors):
        count = int((~torch.isfinite(tensor.detach())).sum())
        if count:
            return index, count
    return None


def check_finite_weights(model: torch.nn.Module, ema=None, where: str = "") -> None:
    """Raises :class:`NonFiniteLossError` if a weight of ``model`` (or of the EMA copy) is NaN or inf.

    Called before anything is saved, so that no checkpoint or model with non-finite weights is written.
    """
    named = list(model.named_parameters())
    groups = [("", [p for _, p in named], [n for n, _ in named])]
    if ema is not None:
        groups.append(("EMA ", list(ema.shadow_params), [n for n, _ in named]))
    for label, tensors, names in groups:
        bad = non_finite_weights(tensors)
        if bad is not None:
            index, count = bad
            total = sum(int((~torch.isfinite(t.detach())).sum()) for t in tensors)
            raise NonFiniteLossError(
                f"the {label}weights are non-finite{where} ({total:,} NaN/inf values, first in "
                f"{names[index] if index < len(names) else f'tensor {index}'}, {count:,} there)"
            )


def diffusion_loss(
    denoiser: Denoiser,
    noise_scheduler: SchedulerMixin,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    forward_kwargs: dict | None = None,
) -> torch.Tensor:
    """The training loss for a (B, C, H, W) batch of clean images in [-1, 1], DDPM or EDM by the scheduler.

    ``noise`` (B, C, H, W) and the noise levels ``timesteps`` (B,) are given by the caller (DDPM: timestep
    indices; EDM: sigmas, see :func:`edm_loss`). The DDPM target follows ``noise_scheduler.config.prediction_type``:
    ``epsilon`` (MSE to the noise), ``sample`` (MSE to the clean image weighted by SNR, as diffusers' example) or
    ``v_prediction``. ``forward_kwargs`` default to the family's (a DiT gets the null class id); pass them for a
    wrapped (DDP) ``denoiser``. A learned-sigma DiT's variance channels are ignored.
    """
    if forward_kwargs is None:
        forward_kwargs = denoiser_kwargs(denoiser, clean_images.shape[0], clean_images.device)
    axis = noise_axis(noise_scheduler)
    if isinstance(axis, EDMNoise):
        return edm_loss(denoiser, axis, clean_images, noise, timesteps, forward_kwargs)
    noisy = noise_scheduler.add_noise(clean_images, noise, timesteps)
    output = denoiser(noisy, timesteps, **forward_kwargs)
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


def edm_loss(
    denoiser: Denoiser,
    axis: EDMNoise,
    clean_images: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    forward_kwargs: dict,
) -> torch.Tensor:
    """EDM's loss: ``lambda(s) |D(x + s n; s) - x|^2`` averaged over all values, for (B,) sigmas ``s``.

    ``D(y; s) = c_skip y + c_out F(c_in y; c_noise)`` comes from the scheduler's ``precondition_inputs``,
    ``precondition_noise`` and ``precondition_outputs``; ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` with
    ``sd = sigma_data``, which makes the loss about 1 per value at initialisation.
    """
    sigma = sigmas.float().view(-1, 1, 1, 1)
    noisy = clean_images.float() + sigma * noise.float()
    inputs, c_noise = axis.precondition(noisy, sigmas.float())
    output = denoiser(inputs, c_noise, **forward_kwargs).sample[:, : clean_images.shape[1]].float()
    denoised = axis.scheduler.precondition_outputs(noisy, output, sigma)
    sigma_data = float(axis.scheduler.config.sigma_data)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight * (denoised - clean_images.float()) ** 2).mean()


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
    """One micro-step: noise and noise levels (DDPM timesteps or EDM sigmas) from ``generator``, forward under the
    accelerator's
    autocast, backward, and (on gradient-sync steps) clipping, optimiser, LR and EMA updates.

    ``clean_images``: (B, C, H, W) in [-1, 1]. Returns the loss averaged over processes; raises
    :class:`NonFiniteLossError` before any update if the loss is NaN/inf on any process.
    """
    noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
    timesteps = noise_axis(noise_scheduler).draw_training_levels(clean_images.shape[0], clean_images.device, generator)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    forward_kwargs = denoiser_kwargs(unwrapped, clean_images.shape[0], clean_images.device)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = diffusion_loss(model, noise_scheduler, clean_images, noise, timesteps, forward_kwargs)
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
        ema_step(ema, unwrapped)
    return losses.mean()


def ema_step(ema: EMAModel, model: torch.nn.Module) -> None:
    """Updates ``ema`` with the parameters of ``model``, on the parameters' device.

    The shadow weights follow the model: an EMA built before ``accelerator.prepare`` moved the model, or reloaded by
    ``accelerator.load_state`` (which reads custom state onto the CPU), is moved to the model's device first, once.
    """
    device = next(model.parameters()).device
    if ema.shadow_params and ema.shadow_params[0].device != device:
        ema.to(device=device)
    ema.step(model.parameters())
