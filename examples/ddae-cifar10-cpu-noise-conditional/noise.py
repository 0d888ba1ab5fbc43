"""One noise axis for DDPM, EDM and flow-matching models: how a clean input is noised at a level in the model's
own units.

* **DDPM** (variance preserving, any scheduler with ``alphas_cumprod``): the level is a diffusers timestep
  index ``t`` (an ``int``, 0..T-1). The network sees ``scheduler.add_noise(x0, eps, t)`` and ``t``.
* **EDM** (Karras et al. 2022; ``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): the level is
  ``sigma`` (a ``float``). The network sees ``c_in(sigma) * (x0 + sigma * eps)`` and ``c_noise(sigma)``,
  through the scheduler's own ``precondition_inputs`` / ``precondition_noise``.
* **Flow matching** (SD3, Flux; ``FlowMatchEulerDiscreteScheduler``): the level is ``sigma`` in (0, 1) (a
  ``float``). The network sees ``(1 - sigma) x0 + sigma * eps`` from the scheduler's own ``scale_noise`` (without
  the sampling schedule's shift, so the level is the sigma the network sees) and the timestep
  ``sigma * num_train_timesteps``.

All report the variance-exploding equivalent ``sigma`` of a level (DDPM: ``sqrt((1 - a) / a)`` with
``a = alphas_cumprod[t]``; flow matching: ``sigma / (1 - sigma)``) and its log-SNR ``-2 ln sigma``, so the
grids of all three line up on one axis.
The DDAE paper's EDM noise levels are those of the 18-step EDM sampling schedule counted from the clean
end (index 0 is sigma 0): :meth:`EDMNoise.sigma_at_index` turns such an index into a sigma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import UsageError, UsageTypeError

NoiseLevel = int | float

# EDM's CIFAR-10 sampling schedule length; the DDAE paper's EDM grid indexes it from the clean end.
EDM_SAMPLING_STEPS = 18
DEFAULT_DDPM_LEVELS = (0, 10, 25, 50, 100, 200, 400)
DEFAULT_EDM_INDICES = (2, 3, 4, 5, 6, 7, 8)  # sigma 0.0075 .. 1.09, about the VE range of DDPM t = 0 .. 200
DEFAULT_DDPM_PROBE_LEVEL = 10  # the paper's t=11
DEFAULT_EDM_PROBE_INDEX = 4  # sigma ~ 0.06, the official code's default
# Flow matching: VE sigma 0.02 .. 1, about the VE range of DDPM t = 0 .. 200; the probe level's VE sigma is 0.053,
# that of DDPM t=10 on a linear schedule is 0.047.
DEFAULT_FLOW_LEVELS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_FLOW_PROBE_LEVEL = 0.05


def is_edm_scheduler(scheduler: object) -> bool:
    """True for diffusers' EDM schedulers (they precondition inputs, noise levels and outputs)."""
    return all(
        hasattr(scheduler, name) for name in ("precondition_inputs", "precondition_noise", "precondition_outputs")
    )


def is_flow_scheduler(scheduler: object) -> bool:
    """True for diffusers' flow-matching schedulers (``scale_noise`` mixes clean input and noise linearly)."""
    return hasattr(scheduler, "scale_noise") and not hasattr(scheduler, "alphas_cumprod")


def is_integer_level(level: object) -> bool:
    return isinstance(level, (int, np.integer)) and not isinstance(level, bool)


def noise_level(text: str) -> NoiseLevel:
    """A command-line noise level: ``"10"`` -> 10 (a DDPM timestep), ``"0.06"`` / ``"2e-2"`` -> a float sigma."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"Noise level {text!r} is not a number: give DDPM timesteps (10) or EDM sigmas (0.06)."
        ) from None


class NoiseAxis:
    """The noise levels of one model: validation, noising, and their place on the variance-exploding axis."""

    objective: str = ""
    unit: str = ""
    example: str = ""  # a valid call, for error messages

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def check_levels(self, levels: NoiseLevel | Sequence[NoiseLevel]) -> list[NoiseLevel]:
        """Validates levels in the model's units; returns them as a list (``UsageError`` naming the fix)."""
        levels = [levels] if isinstance(levels, (int, float, np.number)) else list(levels)
        if not levels:
            raise UsageError(f"No noise levels requested: pass at least one, e.g. {self.example}.")
        return [self._check(level) for level in levels]

    def _check(self, level) -> NoiseLevel:
        raise NotImplementedError

    def network_inputs(
        self, clean: torch.Tensor, noise: torch.Tensor | None, level: NoiseLevel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, C, h, w) float32 input the network sees for clean inputs ``clean`` and noise ``noise`` at
        ``level``, and the (B,) timestep it is given. Noising is done in float32 whatever dtype ``clean`` and
        ``noise`` come in (half precision would round the noise away at low levels); callers cast the result to
        the network's dtype. ``noise=None`` adds no noise (an ablation): DDPM passes ``clean`` as it is, EDM still
        preconditions it (``c_in`` belongs to EDM's network, not to its noising). DDPM and EDM also take a (B,)
        tensor of checked levels, one per row."""
        raise NotImplementedError

    def noisy_network_inputs(self, noisy: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and (B,) timestep for a sample that is already noised, as a sampler holds it:
        (B, C, h, w) ``noisy`` at (B,) ``levels`` (DDPM: ``x_t`` and t as they are; EDM: ``c_in x`` and
        ``c_noise``)."""
        raise UsageError(f"{type(self).__name__} models cannot classify noisy samples: use a DDPM or EDM model.")

    def ve_sigma(self, level: NoiseLevel) -> float:
        """The variance-exploding sigma of ``level``: noise std over signal scale."""
        raise NotImplementedError

    def log_snr(self, level: NoiseLevel) -> float:
        """``log(signal^2 / noise^2) = -2 ln sigma_VE``."""
        return -2.0 * math.log(self.ve_sigma(level))

    @classmethod
    def label(cls, level: NoiseLevel) -> str:
        """How reports, cards and the command line name a level: ``t=10`` or ``sigma=0.06``, the level written as
        its cell key writes it (so it reads back as the same level)."""
        return f"{cls.unit}={level}"

    def level_text(self, level: NoiseLevel) -> str:
        """A level in a model card's sentence, with its variance-exploding sigma: ``diffusers timestep 10 (the
        paper's t=11; variance-exploding sigma 0.047)``, ``sigma 0.06 (EDM; a variance-exploding sigma)``."""
        raise NotImplementedError

    def describe(self, level: NoiseLevel) -> dict[str, float]:
        """``{"level", "ve_sigma", "log_snr"}`` of one level, for reports."""
        return {"level": level, "ve_sigma": self.ve_sigma(level), "log_snr": self.log_snr(level)}

    def default_levels(self) -> list[NoiseLevel]:
        """A sensible probe grid in this model's units."""
        raise NotImplementedError

    def default_probe_level(self) -> NoiseLevel:
        """The paper's single noise level for this objective."""
        raise NotImplementedError

    def draw_training_levels(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B,) training noise levels drawn from ``generator`` (default: torch's global one)."""
        raise NotImplementedError


def _float32(clean: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``clean`` and ``noise`` in float32, the noise on ``clean``'s device."""
    clean = clean.float()
    return clean, None if noise is None else noise.to(clean.device, torch.float32)


def _per_row(level: NoiseLevel | torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,) levels for the B rows of ``like``: one level repeated, or a (B,) tensor of levels as given."""
    if isinstance(level, torch.Tensor):
        if level.shape != (like.shape[0],):
            raise UsageError(f"Got {tuple(level.shape)} noise levels for {like.shape[0]} rows: pass one per row.")
        return level.to(like.device, dtype)
    value = float(level) if dtype.is_floating_point else int(level)
    return torch.full((like.shape[0],), value, dtype=dtype, device=like.device)


class DDPMNoise(NoiseAxis):
    """Variance-preserving noise at diffusers timestep indices (DDPM, DDIM, PNDM, DPM-Solver, Euler... schedulers).

    Inputs are noised by a ``DDPMScheduler`` built from the scheduler's config (the same betas): its ``add_noise``
    works at any timestep, whereas samplers such as DPM-Solver or Euler noise on their own sampling schedule
    (Euler even in variance-exploding form)."""

    objective = "ddpm"
    unit = "t"
    example = "timesteps=[10] (the DDAE paper's t=11 is diffusers t=10)"

    def __init__(self, scheduler):
        from diffusers import DDPMScheduler

        super().__init__(scheduler)
        self.noiser = scheduler if type(scheduler) is DDPMScheduler else DDPMScheduler.from_config(scheduler.config)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def _check(self, level) -> int:
        last = self.num_train_timesteps - 1
        if isinstance(level, (float, np.floating)):
            raise UsageError(
                f"Noise level {level!r} is a float, but this is a DDPM model: its levels are integer diffusers "
                f"timesteps 0..{last} (e.g. 10); EDM sigmas apply to EDM models only."
            )
        if not is_integer_level(level) or not 0 <= level <= last:
            raise UsageError(
                f"Timestep {level!r} is out of range: use integer diffusers indices 0..{last} "
                "(the DDAE paper's t=11 is diffusers t=10)."
            )
        return int(level)

    def network_inputs(self, clean, noise, level):
        clean, noise = _float32(clean, noise)
        t = _per_row(level, clean, torch.long)
        if noise is None:
            return clean, t
        return self.noiser.add_noise(clean, noise, t), t

    def noisy_network_inputs(self, noisy, levels):
        return noisy, levels.to(noisy.device, torch.long)

    def ve_sigma(self, level) -> float:
        alpha = float(self.noiser.alphas_cumprod[int(level)])
        return math.sqrt((1.0 - alpha) / alpha)

    def level_text(self, level) -> str:
        return (f"diffusers timestep {level} (the paper's t={int(level) + 1}; variance-exploding sigma "
                f"{self.ve_sigma(level):.3g})")

    def default_levels(self) -> list[int]:
        return [t for t in DEFAULT_DDPM_LEVELS if t < self.num_train_timesteps]

    def default_probe_level(self) -> int:
        return DEFAULT_DDPM_PROBE_LEVEL

    def draw_training_levels(self, batch_size, device, generator=None):
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator).to(device)


class EDMNoise(NoiseAxis):
    """EDM noise at sigma, with the scheduler's preconditioning (``sigma_data``, ``sigma_min..sigma_max``).

    Training draws ``ln sigma ~ N(P_MEAN, P_STD^2)`` as EDM does for CIFAR-10.
    """

    objective = "edm"
    unit = "sigma"
    example = "timesteps=[0.06] (a sigma; EDMNoise.sigma_at_index(4) is the DDAE paper's default)"
    P_MEAN, P_STD = -1.2, 1.2

    @property
    def sigma_range(self) -> tuple[float, float]:
        return float(self.scheduler.config.sigma_min), float(self.scheduler.config.sigma_max)

    def _check(self, level) -> float:
        low, high = self.sigma_range
        if is_integer_level(level):
            raise UsageError(
                f"Noise level {level!r} is an integer, but this is an EDM model: its levels are sigmas (floats) in "
                f"[{low:g}, {high:g}], e.g. 0.06; write {level}.0 for sigma {level}. DDPM timesteps do not apply."
            )
        if not isinstance(level, (float, np.floating)) or not math.isfinite(level):
            raise UsageError(f"Noise level {level!r} is not a finite sigma: use a float in [{low:g}, {high:g}].")
        if level <= 0:
            raise UsageError(f"sigma {level:g} must be > 0 (EDM conditions the network on ln sigma): use e.g. 0.06.")
        if not low <= level <= high:
            raise UsageError(
                f"sigma {level:g} is outside this model's range [{low:g}, {high:g}] (sigma_min, sigma_max of its "
                "scheduler): pick a sigma inside it."
            )
        return float(level)

    def sigma_at_index(self, index: int, num_steps: int = EDM_SAMPLING_STEPS) -> float:
        """Sigma at ``index`` of the ``num_steps``-step sampling schedule of this scheduler, counted from the clean
        end where index 0 is sigma 0 (the DDAE paper's convention: index 4 of 18 is about 0.06), to 4 digits."""
        if not is_integer_level(index) or not 1 <= index <= num_steps:
            raise UsageError(f"EDM sigma index {index!r} must be an integer in 1..{num_steps} (0 is sigma 0).")
        schedule = type(self.scheduler).from_config(self.scheduler.config)
        schedule.set_timesteps(num_steps)
        ascending = schedule.sigmas.flip(0)  # [0, sigma_min, ..., sigma_max]
        return float(f"{float(ascending[index]):.4g}")

    def network_inputs(self, clean, noise, level):
        clean, noise = _float32(clean, noise)
        sigma = _per_row(level, clean, torch.float32)
        noisy = clean if noise is None else clean + sigma.view(-1, *([1] * (clean.ndim - 1))) * noise
        return self.precondition(noisy, sigma)

    def noisy_network_inputs(self, noisy, levels):
        return self.precondition(noisy, levels.to(noisy.device, torch.float32))

    def precondition(self, noisy: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_in * noisy, c_noise)`` for (B, C, h, w) ``noisy`` at (B,) ``sigma``."""
        scaled = self.scheduler.precondition_inputs(noisy, sigma.view(-1, *([1] * (noisy.ndim - 1))))
        return scaled, self.scheduler.precondition_noise(sigma).to(noisy.device)

    def ve_sigma(self, level) -> float:
        return float(level)

    def level_text(self, level) -> str:
        return f"sigma {level} (EDM; a variance-exploding sigma)"

    def default_levels(self) -> list[float]:
        return [self.sigma_at_index(i) for i in DEFAULT_EDM_INDICES]

    def default_probe_level(self) -> float:
        return self.sigma_at_index(DEFAULT_EDM_PROBE_INDEX)

    def draw_training_levels(self, batch_size, device, generator=None):
        return (torch.randn(batch_size, generator=generator) * self.P_STD + self.P_MEAN).exp().to(device)


class FlowMatchNoise(NoiseAxis):
    """Flow-matching noise at sigma in (0, 1): ``(1 - sigma) x0 + sigma eps`` (SD3, Flux).

    Noising goes through the scheduler's own ``scale_noise``, on an unshifted copy of it set to the one sigma
    (``shift`` and dynamic shifting only reshape the sampling schedule, not what a level means)."""

    objective = "flow"
    unit = "sigma"
    example = "timesteps=[0.05] (a flow-matching sigma in (0, 1))"

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self._at_level: dict[float, object] = {}

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def _check(self, level) -> float:
        if is_integer_level(level):
            raise UsageError(
                f"Noise level {level!r} is an integer, but this is a flow-matching model: its levels are sigmas "
                "(floats) in (0, 1), e.g. 0.05. DDPM timesteps do not apply."
            )
        if not isinstance(level, (float, np.floating)) or not 0.0 < level < 1.0:
            raise UsageError(f"Flow-matching sigma {level!r} must be a float in (0, 1) (0 is clean, 1 pure noise).")
        return float(level)

    def _scheduler_at(self, level: float):
        """A copy of the scheduler whose one step is ``level`` (no shift): its ``timesteps[0]`` is the network's.

        Its begin index is set to that step once, so ``scale_noise`` takes the sigma without looking each
        example's timestep up in the schedule (a device sync per example)."""
        if level not in self._at_level:
            unshifted = type(self.scheduler).from_config(
                self.scheduler.config,
                shift=1.0,
                use_dynamic_shifting=False,
                shift_terminal=None,
                use_karras_sigmas=False,
                use_exponential_sigmas=False,
                use_beta_sigmas=False,
            )
            unshifted.set_timesteps(sigmas=[level])
            if hasattr(unshifted, "set_begin_index"):  # flow-match Euler, Heun and LCM have one
                unshifted.set_begin_index(0)
            self._at_level[level] = unshifted
        return self._at_level[level]

    def network_inputs(self, clean, noise, level):
        clean, noise = _float32(clean, noise)
        scheduler = self._scheduler_at(float(level))
        t = scheduler.timesteps[:1].to(clean.device).expand(clean.shape[0])
        if noise is None:
            return clean, t
        return scheduler.scale_noise(clean, t, noise), t

    def ve_sigma(self, level) -> float:
        return float(level) / (1.0 - float(level))

    def level_text(self, level) -> str:
        return f"flow-matching sigma {level} (variance-exploding sigma {self.ve_sigma(level):.3g})"

    def default_levels(self) -> list[float]:
        return list(DEFAULT_FLOW_LEVELS)

    def default_probe_level(self) -> float:
        return DEFAULT_FLOW_PROBE_LEVEL

    def draw_training_levels(self, batch_size, device, generator=None):
        raise UsageError("Training flow-matching models is not supported: train with --objective ddpm or edm.")


NOISE_AXES: dict[str, type[NoiseAxis]] = {axis.objective: axis for axis in (DDPMNoise, EDMNoise, FlowMatchNoise)}


def axis_class(objective: str) -> type[NoiseAxis]:
    """The noise axis class of an ``objective`` (``"ddpm"``, ``"edm"`` or ``"flow"``, as ``results.json`` records
    it): its ``unit`` and ``label`` name levels without the scheduler."""
    if objective not in NOISE_AXES:
        raise UsageError(f"Unknown objective {objective!r}: use one of {', '.join(NOISE_AXES)}.")
    return NOISE_AXES[objective]


def noise_axis(scheduler) -> NoiseAxis:
    """The noise axis of a diffusers scheduler: EDM for EDM schedulers, flow matching for ``scale_noise``
    schedulers, DDPM for those with ``alphas_cumprod``."""
    if is_edm_scheduler(scheduler):
        return EDMNoise(scheduler)
    if is_flow_scheduler(scheduler):
        return FlowMatchNoise(scheduler)
    if hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "add_noise"):
        return DDPMNoise(scheduler)
    raise UsageTypeError(
        f"{type(scheduler).__name__} defines no beta schedule (alphas_cumprod) and no EDM preconditioning, so "
        "DDAE inputs cannot be noised with it: use a DDPM-style scheduler (DDPMScheduler, DDIMScheduler, ...), an "
        "EDM scheduler (EDMEulerScheduler, EDMDPMSolverMultistepScheduler) or a flow-matching one "
        "(FlowMatchEulerDiscreteScheduler)."
    )
