"""``DDAEPipeline``: one diffusers pipeline that samples, extracts DDAE features and classifies.

It holds a pixel-space ``UNet2DModel`` (google/ddpm-cifar10-32 layout) or a ``DiTTransformer2DModel``
(facebook/DiT-XL-2-256 layout, with its ``AutoencoderKL``), a noise scheduler and an optional
``DDAEForImageClassification``. It also reads the layouts of text-conditioned models (Stable Diffusion 1.x, 2.x
and XL, PixArt, SD3, Flux: the denoiser, VAE, scheduler, text encoders and tokenizers) for feature extraction;
those are generated with their own diffusers pipelines. Features come from the capture core (``DDAEBackbone``);
this module only turns user inputs into pixel tensors and wires the components together.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    SchedulerMixin,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard

from ddae_diffusers.capture import (
    DDAEBackbone,
    check_denoiser,
    check_image_batch,
    denoiser_kwargs,
    non_finite_rows,
)
from ddae_diffusers.errors import UsageError, UsageTypeError
from ddae_diffusers.families import FAMILIES, family_of
from ddae_diffusers.hub import create_hub_repo, push_folder
from ddae_diffusers.image_processing_ddae import DDAEImageProcessor
from ddae_diffusers.loading import check_source, inspect_source, load_components, resolve_dtype
from ddae_diffusers.modelcard import pipeline_model_card
from ddae_diffusers.modeling_ddae import DDAEForImageClassification
from ddae_diffusers.noise import EDM_SAMPLING_STEPS, DDPMNoise, EDMNoise, NoiseLevel, is_edm_scheduler, noise_axis
from ddae_diffusers.noise_conditional import check_noise_conditional
from ddae_diffusers.probing.result import ProbeResult

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]

_OUTPUT_TYPES = ("pil", "np", "pt")
# The text encoders and tokenizers of the text-conditioned families, named as their diffusers pipelines name them.
TEXT_COMPONENTS = tuple(
    dict.fromkeys(name for family in FAMILIES.values() if family.text is not None for name in family.text.components)
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from ddae_diffusers import DDAEPipeline

        >>> # any diffusers DDPM or DiT repo or folder: google/ddpm-cifar10-32, facebook/DiT-XL-2-256, ...
        >>> pipe = DDAEPipeline.from_pretrained("google/ddpm-cifar10-32")

        >>> # sample like DDPMPipeline
        >>> images = pipe(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0)).images

        >>> # class-conditional samples need a noise-conditional classifier of this model
        >>> # (training/train_noise_conditional.py): DDAEPipeline.from_pretrained(model, classifier=its_folder),
        >>> # then pipe(class_labels=["cat"] * 4, guidance_scale=3.0, num_inference_steps=50)

        >>> # DDAE features: the paper's out_6 at t=11 (diffusers t=10), global-average-pooled
        >>> feats = pipe.extract_features(images, layers=["up_blocks.1.resnets.2"], timesteps=[10])
        >>> feats["up_blocks.1.resnets.2", 10].shape
        torch.Size([2, 256])
        ```
"""


@dataclass
class DDAEClassificationOutput(BaseOutput):
    """Predictions of :meth:`DDAEPipeline.classify`.

    Args:
        labels: predicted class name of each image (``id2label`` of the classifier).
        label_ids: (B,) predicted class indices.
        scores: (B,) softmax probability of the predicted class.
        logits: (B, num_labels) classifier logits.
    """

    labels: list[str]
    label_ids: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class DDAEPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional image generation, DDAE feature extraction and classification with one
    diffusion denoiser.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Give exactly one of `unet` and `transformer`.

    Parameters:
        unet ([`UNet2DModel`] or [`UNet2DConditionModel`], *optional*):
            A pixel-space DDPM denoiser (google/ddpm-cifar10-32 and `train_unconditional.py` outputs), or a Stable
            Diffusion UNet (features only, conditioned on the empty prompt or `set_prompt`).
        scheduler ([`SchedulerMixin`], *optional*):
            The sampling scheduler ([`DDPMScheduler`], [`DDIMScheduler`], ... or, for an EDM model,
            [`EDMEulerScheduler`] / [`EDMDPMSolverMultistepScheduler`]). Its betas (EDM: its sigma range and
            `sigma_data`) also define the noise that feature extraction adds, and the units of noise levels
            (timestep indices or sigmas). Defaults to `DDPMScheduler()` (1000 linear steps, 1e-4 to 0.02), also
            when it is set to `None` later; a text-conditioned denoiser has no default and needs its own.
        transformer ([`DiTTransformer2DModel`], [`PixArtTransformer2DModel`], [`SD3Transformer2DModel`] or
            [`FluxTransformer2DModel`], *optional*):
            A DiT denoiser, latent (with `vae`, as facebook/DiT-XL-2-256) or pixel-space, which always gets the
            null class id, i.e. runs unconditionally; or a text-conditioned transformer (features only).
        vae ([`AutoencoderKL`], *optional*):
            Encodes images to latents (times `scaling_factor`) for features and decodes samples.
        classifier ([`DDAEForImageClassification`], *optional*):
            A fine-tuned or linear-probe DDAE classifier, used by [`~DDAEPipeline.classify`].
        text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (*optional*):
            The text encoders and tokenizers of a text-conditioned denoiser, as its own pipeline names them; they
            encode the prompt (by default the empty one, once) that conditions every feature forward.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->unet->vae"
    _optional_components = [
        "unet", "scheduler", "transformer", "vae", "classifier",
        *TEXT_COMPONENTS,
    ]  # fmt: skip

    def __init__(
        self,
        unet: torch.nn.Module | None = None,
        scheduler: SchedulerMixin | None = None,
        transformer: torch.nn.Module | None = None,
        vae: AutoencoderKL | None = None,
        classifier: DDAEForImageClassification | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: object | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: object | None = None,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer_3: object | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            given = "both" if unet is not None else "neither"
            raise UsageError(
                f"DDAEPipeline needs exactly one denoiser, got {given} of unet and transformer: pass "
                "unet=UNet2DModel(...) for a DDPM or transformer=DiTTransformer2DModel(...) for a DiT."
            )
        check_denoiser(unet if unet is not None else transformer)
        if unet is not None and family_of(unet).component != "unet":
            raise UsageTypeError(f"unet must be a UNet, got {type(unet).__name__}: pass it as transformer=.")
        if transformer is not None and family_of(transformer).component != "transformer":
            raise UsageTypeError(
                f"transformer must be a transformer denoiser, got {type(transformer).__name__}: pass a UNet as unet=."
            )
        if vae is not None and not isinstance(vae, AutoencoderKL):
            raise UsageTypeError(f"vae must be an AutoencoderKL, got {type(vae).__name__}.")
        if classifier is not None and not isinstance(classifier, DDAEForImageClassification):
            # diffusers would silently drop a plain nn.Module on save_pretrained: refuse it here.
            raise UsageTypeError(
                f"classifier must be a DDAEForImageClassification, got {type(classifier).__name__}: build one "
                "with DDAEForImageClassification.from_diffusers / from_probe (diffusers cannot save plain modules)."
            )
        if scheduler is None:
            scheduler = default_scheduler(unet if unet is not None else transformer)
        text = dict(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.register_modules(
            unet=unet, scheduler=scheduler, transformer=transformer, vae=vae, classifier=classifier, **text
        )
        self._backbone: DDAEBackbone | None = None
        self._backbone_key: tuple | None = None
        self.prompt_pipeline: str | None = None  # the diffusers pipeline of the loaded folder, for encode_prompt

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer, whichever this pipeline holds."""
        return self.unet if self.unet is not None else self.transformer

    def _scheduler(self) -> SchedulerMixin:
        """The pipeline's scheduler, or the default of :func:`default_scheduler` when it is None."""
        return self.scheduler if self.scheduler is not None else default_scheduler(self.denoiser)

    @property
    def backbone(self) -> DDAEBackbone:
        """The capture core over this pipeline's denoiser, VAE and noise schedule (rebuilt if they change).

        An EDM scheduler noises and preconditions as in training (levels are sigmas). Otherwise noise is added
        with a ``DDPMScheduler`` built from ``scheduler.config``: the same betas, and an ``add_noise`` that works
        at any timestep whatever sampler is plugged in.
        """
        text = {name: getattr(self, name, None) for name in TEXT_COMPONENTS}
        key = (id(self.denoiser), id(self.scheduler), id(self.vae), *map(id, text.values()))
        if self._backbone is None or self._backbone_key != key:
            noise_scheduler = self._scheduler()
            if isinstance(noise_axis(noise_scheduler), DDPMNoise):
                noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
            self._backbone = DDAEBackbone(
                self.denoiser, noise_scheduler, self.vae, text_components=text, prompt_pipeline=self.prompt_pipeline
            )
            self._backbone_key = key
        return self._backbone

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DDAEPipeline:
        """Loads a diffusers pipeline folder or Hub repo with a UNet or a DiT.

        Reads the layouts of google/ddpm-cifar10-32 (``model_index.json``, ``unet/``, ``scheduler/``; a model
        at the root also works), facebook/DiT-XL-2-256 (``transformer/``, ``vae/``, ``scheduler/``),
        ``DDPMPipeline``/``DDAEPipeline.save_pretrained`` folders and ``train_unconditional.py`` outputs. A
        bare model folder (``config.json`` of a ``UNet2DModel`` or ``DiTTransformer2DModel``) gets a default
        ``DDPMScheduler()``. ``classifier=`` may be a ``DDAEForImageClassification`` or the folder/Hub id of
        one (a probe or fine-tuning export). ``dtype=`` (e.g. ``torch.bfloat16``; the older ``torch_dtype`` is
        accepted as well) loads the weights in that dtype, pipeline or bare model. Other keyword arguments go to
        ``DiffusionPipeline.from_pretrained``.
        """
        path = os.fspath(pretrained_model_name_or_path)
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        if dtype is not None:
            kwargs["dtype"] = dtype
        classifier = kwargs.get("classifier")
        if isinstance(classifier, (str, os.PathLike)):
            classifier = check_source(os.fspath(classifier), "classifier")
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
        source = inspect_source(path, who="DDAEPipeline", flag="pretrained_model_name_or_path", **hub_kwargs)
        path = source.path
        if isinstance(classifier, (str, os.PathLike)):
            kwargs["classifier"] = _load_classifier(os.fspath(classifier), dtype)
        if source.model_index is not None:
            # components this pipeline does not use (safety checker, feature extractor, image encoder) stay unloaded
            accepted = inspect.signature(cls.__init__).parameters
            for name in source.component_names():
                if name not in accepted:
                    kwargs.setdefault(name, None)
            pipe = super().from_pretrained(path, **kwargs)
            pipe.prompt_pipeline = source.pipeline_class
            return pipe
        model_kwargs = {k: kwargs.pop(k) for k in ("dtype", *hub_kwargs) if k in kwargs}
        denoiser = load_components(source, **model_kwargs)["denoiser"]
        return cls(**{source.family.component: denoiser}, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Writes ``model_index.json`` and one folder per component (safetensors), plus a model card
        ``README.md`` unless the folder already has one. ``push_to_hub=True`` then uploads the folder
        (``repo_id``, ``token``, ``private``, ``commit_message``, ``create_pr`` are read from ``kwargs``)."""
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs
        }
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        readme = os.path.join(save_directory, "README.md")
        if not os.path.exists(readme):
            self.model_card(hub_kwargs.get("repo_id")).save(readme)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self._push_folder(save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
    ) -> str:
        """Saves the pipeline with its DDAE model card to a temporary folder and uploads it to ``repo_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, variant=variant, repo_id=repo_id)
            return self._push_folder(
                tmp, repo_id, token=token, private=private, commit_message=commit_message, create_pr=create_pr
            )

    def _push_folder(
        self, folder: str, repo_id: str, token=None, private=None, commit_message=None, create_pr: bool = False
    ) -> str:
        """Uploads ``folder`` as it is (its DDAE card included: diffusers' own push would write a generic one)."""
        repo_id = create_hub_repo(repo_id, token=token, private=private)
        commit = push_folder(
            folder, repo_id, token=token, create_pr=create_pr, commit_message=commit_message or "Upload DDAEPipeline"
        )
        return commit.commit_url

    def model_card(self, repo_id: str | None = None) -> ModelCard:
        """A model card (YAML metadata, components, usage) for this pipeline."""
        return pipeline_model_card(self, repo_id)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: int | str | Sequence[int | str] | None = None,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images unconditionally (a DiT gets the null class id), or toward `class_labels` by classifier
        guidance from the pipeline's own noise-conditional `classifier`.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                The number of images to generate.
            generator (`torch.Generator`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html) (or one per
                image) to make generation deterministic.
            num_inference_steps (`int`, *optional*):
                The number of denoising steps; defaults to 1000 for a DDPM scheduler and 18 for an EDM one
                (`EDMEulerScheduler`: 18 network evaluations; `EDMDPMSolverMultistepScheduler.from_config(
                pipe.scheduler.config)` also works). For a DDPM, swap in a `DDIMScheduler`
                (`DDIMScheduler.from_config(pipe.scheduler.config)`) for good images in about 50 steps.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (`PIL.Image` list), `"np"` ((B, H, W, C) float array in [0, 1]) or `"pt"` ((B, C, H, W)
                tensor in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~pipelines.ImagePipelineOutput`] instead of a plain tuple.
            class_labels (`int`, `str` or a list of them, *optional*):
                Classes to sample (ids or names of the classifier's `id2label`): one for the whole batch, or one per
                image (the list's length is then the batch size). Needs a noise-conditional `classifier` on this
                denoiser's noise schedule; each step adds `guidance_scale` times the gradient of
                `log p(y | x_t)` (the head through the truncated denoiser) to the model's score: for a DDPM
                `eps - s sqrt(1 - alpha_bar_t) grad`, for EDM `D + s sigma^2 grad`.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                The weight `s` of the classifier's gradient (0 samples unguided, as without `class_labels`).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images (first element of the tuple).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
        family = family_of(self.denoiser)
        if family.conditional:
            raise UsageError(
                f"DDAEPipeline generates with unconditional denoisers only; sample this {family.name} with its own "
                f"diffusers pipeline ({family.text.pipeline_class(self.denoiser)}). Its features work here: "
                "extract_features(...)."
            )
        scheduler = self._scheduler()
        num_train = scheduler.config.num_train_timesteps
        if num_inference_steps is None:
            num_inference_steps = EDM_SAMPLING_STEPS if is_edm_scheduler(scheduler) else num_train
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or not (1 <= num_inference_steps <= num_train)
        ):
            raise UsageError(f"num_inference_steps must be an integer in 1..{num_train}, got {num_inference_steps!r}.")
        if output_type not in _OUTPUT_TYPES:
            raise UsageError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        guidance = guidance_axis = None
        if class_labels is not None:
            guidance = self._guidance_labels(class_labels, batch_size, guidance_scale, scheduler)
            guidance_axis = noise_axis(scheduler)  # once: for a DDIM sampler it builds a DDPMScheduler
            batch_size = len(guidance)
        elif guidance_scale != 1.0:
            raise UsageError("guidance_scale needs class_labels: pass the classes to guide toward.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise UsageError(f"Got {len(generator)} generators for batch_size {batch_size}: pass one per image.")

        denoiser = self.denoiser
        channels = denoiser.config.in_channels
        size = denoiser.config.sample_size
        if size is None:
            raise UsageError(f"{type(denoiser).__name__} has no sample_size in its config: cannot choose a shape.")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        device = self._execution_device
        sample = randn_tensor(
            (batch_size, channels, height, width), generator=generator, device=device, dtype=denoiser.dtype
        )
        sample = sample * scheduler.init_noise_sigma
        extra = denoiser_kwargs(denoiser, batch_size, device)
        step_kwargs = {"generator": generator} if _accepts(scheduler.step, "generator") else {}
        learned_sigma = denoiser.config.out_channels == 2 * channels
        scheduler_uses_sigma = scheduler.config.get("variance_type") in ("learned", "learned_range")

        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(sample, t)
            timestep = t.to(device).expand(batch_size)
            output = denoiser(model_input, timestep, **extra).sample
            if learned_sigma and not scheduler_uses_sigma:
                output = output[:, :channels]  # (B, 2C) -> predicted noise; the variance half is unused
            if guidance is not None and guidance_scale != 0:
                shift = self._guidance_shift(sample, t, scheduler, guidance_axis, guidance, guidance_scale)
                output = torch.cat([output[:, :channels] + shift.to(output.dtype), output[:, channels:]], dim=1)
            sample = scheduler.step(output, t, sample, **step_kwargs).prev_sample

        if self.vae is not None:
            config = self.vae.config  # the inverse of capture.encode_latents
            latents = sample.to(self.vae.dtype) / config.scaling_factor + (config.get("shift_factor") or 0.0)
            sample = self.vae.decode(latents).sample
        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------ guidance
    def _guidance_labels(
        self,
        class_labels: int | str | Sequence[int | str],
        batch_size: int,
        guidance_scale: float,
        scheduler: SchedulerMixin,
    ) -> torch.Tensor:
        """(B,) class ids to guide toward, after every check of guided sampling (before any work)."""
        classifier = check_noise_conditional(self.classifier, "Guided sampling (class_labels=)")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise UsageError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}.")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise UsageError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
        labels = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
        if not labels:
            raise UsageError("class_labels is empty: pass at least one class.")
        if len(labels) == 1:
            labels = labels * batch_size
        elif batch_size not in (1, len(labels)):
            raise UsageError(f"Got {len(labels)} class_labels for batch_size {batch_size}: pass one per image.")
        config = classifier.config
        names = {str(name): int(i) for i, name in (config.id2label or {}).items()}
        ids = []
        for label in labels:
            if isinstance(label, str) and label in names:
                label = names[label]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < config.num_labels:
                raise UsageError(
                    f"class label {label!r} is not a class of the classifier: use ids 0..{config.num_labels - 1} or "
                    f"names such as {sorted(names)[:3]}."
                )
            ids.append(label)
        self._check_guidance_schedule(classifier, scheduler)
        return torch.tensor(ids, dtype=torch.long)

    def _check_guidance_schedule(self, classifier: DDAEForImageClassification, scheduler: SchedulerMixin) -> None:
        """The classifier must read this sampler's noisy samples: the same noise schedule, epsilon prediction."""
        sampler, head = noise_axis(scheduler), classifier.noise_axis
        if type(sampler) is not type(head):
            raise UsageError(
                f"The classifier was trained on {head.objective.upper()} noise but the scheduler samples "
                f"{sampler.objective.upper()} noise: guide with a classifier trained on this model."
            )
        if isinstance(sampler, DDPMNoise):
            if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
                raise UsageError(
                    f"Guidance supports epsilon-predicting DDPM schedulers; this one predicts "
                    f"{scheduler.config.prediction_type!r}."
                )
            if float(scheduler.init_noise_sigma) != 1.0:
                raise UsageError(
                    "Guidance needs a sampler whose samples are the variance-preserving x_t (DDPM, DDIM, "
                    f"DPM-Solver); {type(scheduler).__name__} scales them: swap in "
                    "DDIMScheduler.from_config(pipe.scheduler.config)."
                )
            same = sampler.noiser.alphas_cumprod.shape == head.noiser.alphas_cumprod.shape and torch.allclose(
                sampler.noiser.alphas_cumprod, head.noiser.alphas_cumprod
            )
        else:
            same = float(scheduler.config.sigma_data) == float(head.scheduler.config.sigma_data)
        if not same:
            raise UsageError(
                "The classifier's noise schedule differs from the scheduler's (betas or sigma_data): guide with a "
                "classifier trained on this model's schedule."
            )

    def _guidance_shift(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        scheduler: SchedulerMixin,
        axis: DDPMNoise | EDMNoise,
        labels: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """What guidance adds to the model's output at step ``t``: ``-s sqrt(1 - alpha_bar_t) grad`` to a DDPM's
        predicted noise, ``s sigma^2 grad / c_out`` to an EDM model's raw output (so that the denoised estimate moves
        by ``s sigma^2 grad``), with ``grad = d log p(y | x_t) / d x_t`` (B, C, H, W) from the classifier."""
        classifier = self.classifier.eval()
        if isinstance(axis, EDMNoise):
            level = scheduler.sigmas[scheduler.step_index].to(sample.device, torch.float32)
        else:
            level = t.to(sample.device, torch.long)
        levels = level.expand(sample.shape[0])
        with torch.enable_grad():
            noisy = sample.detach().float().requires_grad_(True)
            logits = classifier.logits_of_noisy(noisy, levels).float()
            log_prob = logits.log_softmax(-1).gather(1, labels.to(logits.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(log_prob, noisy)
        if isinstance(axis, EDMNoise):
            c_out = scheduler.precondition_outputs(torch.zeros_like(grad), torch.ones_like(grad), level)
            return guidance_scale * level**2 * grad / c_out
        alpha_bar = float(axis.noiser.alphas_cumprod[int(t)])
        return -guidance_scale * math.sqrt(1 - alpha_bar) * grad

    # ------------------------------------------------------------------ features
    def layer_names(self) -> list[str]:
        """Capturable block names of the denoiser, in execution order (``up_blocks.1.resnets.2``, ...)."""
        return self.backbone.layer_names()

    def preprocess(self, images: ImageInput, image_size: int | None = None) -> torch.Tensor:
        """Images -> (B, 3, H, W) float pixel values in [-1, 1] on the CPU.

        Tensors ((B, C, H, W) or (C, H, W), already in [-1, 1]) are used as they are, so their size must match
        the model. PIL images and numpy arrays (uint8, or floats in [0, 1] as ``output_type="np"`` returns)
        go through ``DDAEImageProcessor``: RGB, resized and centre-cropped to ``image_size`` (default: the
        model's resolution).
        """
        if isinstance(images, torch.Tensor):
            images = images.unsqueeze(0) if images.ndim == 3 else images
        elif isinstance(images, (list, tuple)) and images and all(isinstance(im, torch.Tensor) for im in images):
            images = torch.stack(list(images))
        if isinstance(images, torch.Tensor):
            return images.cpu()
        image_size = image_size or self.backbone.image_size
        if image_size is None:
            raise UsageError("The denoiser config has no sample_size: pass image_size= to resize the images.")
        return DDAEImageProcessor(size=image_size)(images)["pixel_values"]

    def extract_features(
        self,
        images: ImageInput,
        layers: str | Sequence[str] | None = None,
        timesteps: NoiseLevel | Sequence[NoiseLevel] | None = None,
        pooling: str | None = "avg",
        seed: int = 0,
        dtype: torch.dtype | None = None,
        batch_size: int = 64,
        upsample: bool = False,
        ensemble: int = 1,
        prompt: str | None = None,
    ) -> dict[tuple[str, NoiseLevel], torch.Tensor]:
        """DDAE features of ``images``: the denoiser's block outputs on the images noised at ``timesteps``.

        Args:
            images: PIL images, uint8/float arrays or tensors (see :meth:`preprocess`).
            layers: names from :meth:`layer_names` (default: the classifier's ``feature_layer``).
            timesteps: noise levels in the model's units (default: the classifier's): diffusers indices ``0..T-1``
                for a DDPM (the paper's t=11 is 10), sigmas for an EDM model (e.g. 0.06), noised and
                preconditioned as in training.
            pooling: ``"avg"`` -> (N, C) per (layer, t); ``"spatial"`` -> dense (N, C, h, w) maps (transformer
                tokens on their latent grid); ``None`` -> raw (N, C, h, w) maps or (N, tokens, D).
            seed: the noise of the i-th image is drawn from (seed, i), whatever ``batch_size`` is.
            dtype: autocast dtype, e.g. ``torch.bfloat16``.
            batch_size: images per forward.
            upsample: with ``pooling="spatial"``, maps resized to the image size.
            ensemble: average over this many noise draws per image (see ``DDAEBackbone.features``).
            prompt: text-conditioned models: condition on this prompt (default: the empty prompt, or the last
                ``backbone.set_prompt``).

        Returns ``{(layer, t): float32 tensor}`` on the CPU.
        """
        backbone = self.backbone
        if layers is None or timesteps is None:
            if self.classifier is None or getattr(self.classifier.config, "feature_layer", None) is None:
                raise UsageError("Pass layers= and timesteps= (e.g. layers=['mid_block'], timesteps=[10]).")
            layers = layers if layers is not None else [self.classifier.config.feature_layer]
            timesteps = timesteps if timesteps is not None else [self.classifier.config.timestep]
        layers = backbone.check_layers(layers)
        timesteps = backbone.check_timesteps(timesteps)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}.")
        # validated where preprocess left them (the CPU); each batch goes to the device on its own
        pixel_values = check_image_batch(self.preprocess(images), backbone.image_channels, backbone.image_size)
        if prompt is not None:
            backbone.set_prompt(prompt)

        chunks: dict[tuple[str, int], list[torch.Tensor]] = {}
        starts = range(0, pixel_values.shape[0], batch_size)
        for start in self.progress_bar(starts) if len(starts) > 1 else starts:
            batch = pixel_values[start : start + batch_size].to(backbone.device)
            ids = range(start, start + batch.shape[0])
            out = backbone.features(
                batch,
                layers,
                timesteps,
                pooling=pooling,
                seed=seed,
                example_ids=ids,
                dtype=dtype,
                upsample=upsample,
                ensemble=ensemble,
            )
            for key, value in out.items():
                chunks.setdefault(key, []).append(value.cpu())
        return {key: torch.cat(values) for key, values in chunks.items()}

    # ------------------------------------------------------------------ classification
    @torch.no_grad()
    def classify(self, images: ImageInput, batch_size: int = 64) -> DDAEClassificationOutput:
        """Labels and softmax scores of ``images`` from the ``classifier`` component."""
        if self.classifier is None:
            raise UsageError(
                "This pipeline has no classifier: load one with DDAEPipeline.from_pretrained(path, "
                "classifier='path/to/classifier_or_probe_folder') or pass classifier=DDAEForImageClassification."
            )
        config = self.classifier.config
        # The classifier validates size and range itself (clear ValueErrors); PIL/uint8 are resized to its size.
        pixel_values = self.preprocess(images, image_size=getattr(config, "image_size", None))
        self.classifier.eval()
        device = self.classifier.device
        logits = torch.cat(
            [
                self.classifier(pixel_values=pixel_values[i : i + batch_size].to(device)).logits.float().cpu()
                for i in range(0, pixel_values.shape[0], batch_size)
            ]
        )
        bad = non_finite_rows(logits)
        if bad is not None:
            raise UsageError(
                f"The classifier's logits are NaN or inf for image {bad[0]} (and {bad[1] - 1} more): its weights "
                "are probably not finite; check the checkpoint."
            )
        probs = logits.softmax(dim=-1)
        scores, label_ids = probs.max(dim=-1)
        labels = [str(config.id2label.get(int(i), int(i))) for i in label_ids]
        return DDAEClassificationOutput(labels=labels, label_ids=label_ids, scores=scores, logits=logits)


DDAEPipeline.__call__.__doc__ = DDAEPipeline.__call__.__doc__.replace("        Examples:\n", EXAMPLE_DOC_STRING)


def _accepts(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def default_scheduler(denoiser: torch.nn.Module) -> SchedulerMixin:
    """The scheduler of a pipeline given none: ``DDPMScheduler()`` (1000 linear steps, 1e-4 to 0.02, as
    ``DDAEBackbone`` takes) for an unconditional denoiser. A text-conditioned one was trained on its own schedule,
    which no default matches: a ``UsageError`` naming the fix."""
    family = family_of(denoiser)
    if family.conditional:
        raise UsageError(
            f"This {family.name} pipeline has no scheduler, and no default matches a text-conditioned model: pass its "
            "own, scheduler=SchedulerClass.from_pretrained(model_id, subfolder='scheduler') (or set pipe.scheduler)."
        )
    return DDPMScheduler()


def _load_classifier(path: str, dtype: torch.dtype | None = None) -> DDAEForImageClassification:
    """A saved ``DDAEForImageClassification`` (folder or Hub id) or a probe-engine result folder, its weights in
    ``dtype`` (None: as saved)."""
    weights = {"dtype": dtype} if dtype is not None else {}
    if ProbeResult.is_probe_folder(path):
        return DDAEForImageClassification.from_probe(path, **weights)
    return DDAEForImageClassification.from_pretrained(path, **weights)
