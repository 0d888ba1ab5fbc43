"""Denoiser families: one small description per kind of diffusers denoiser.

A family says how to recognise the model (its class, and legacy names diffusers remaps on load), which of
its modules are layers, which tensor of a block's output is the feature (the image stream of a joint block), how
its tokens map back to the latent grid, and how one forward is called: the extra arguments of an unconditional
model (DiT's null class) or, for text-conditioned models, the conditioning (prompt embeddings computed once with
the pipeline's own ``encode_prompt``, pooled embeddings, time ids, image and text ids). How inputs are noised
depends on the scheduler, not the family: see ``noise.py``. The capture core, the loaders, the classifier and the
pipeline ask the family; supporting a new kind of denoiser is one new entry in ``FAMILIES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from .errors import UsageError, UsageTypeError

ForwardKwargs = Callable[[nn.Module, int, torch.device], dict]
# Conditioning of a text-conditioned denoiser: tensors with a batch dimension of 1 (expanded to the batch at each
# forward), e.g. {"encoder_hidden_states": (1, L, D), "pooled_projections": (1, P)}; Flux's "txt_ids" is (L, 3).
Conditioning = dict[str, torch.Tensor]
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, for guidance-distilled models (FLUX.1-dev)


def _no_kwargs(denoiser: nn.Module, batch_size: int, device: torch.device) -> dict:
    return {}


def _null_class_labels(denoiser: nn.Module, batch_size: int, device: torch.device) -> dict:
    """DiT's forward fails on ``class_labels=None``: an unconditional pass uses the null id."""
    null_class = denoiser.config.num_embeds_ada_norm
    return {"class_labels": torch.full((batch_size,), null_class, dtype=torch.long, device=device)}


def first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """UNet down blocks return (hidden_states, residuals); most other blocks return a tensor."""
    return output[0] if isinstance(output, tuple) else output


def image_stream(output: tuple) -> torch.Tensor:
    """Joint (MM-DiT) blocks of SD3 and Flux return (text tokens or None, image tokens): the image tokens."""
    return output[1]


def batched(
    conditioning: Conditioning, batch_size: int, device: torch.device, dtype: torch.dtype | None = None
) -> Conditioning:
    """The conditioning with its batch-1 tensors expanded to ``batch_size``, on ``device``; with ``dtype``, its
    floating tensors in that dtype (the denoiser's, as diffusers pipelines cast prompt embeddings and ids)."""
    out = {}
    for key, value in conditioning.items():
        value = value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
        if value.ndim >= 2 and value.shape[0] == 1 and key != "txt_ids":
            value = value.expand(batch_size, *value.shape[1:])
        elif key == "guidance":
            value = value.expand(batch_size)
        out[key] = value
    return out


# ------------------------------------------------------------------ how one forward is called
def call_unconditional(denoiser: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning=None):
    return denoiser(sample, timestep, **family_of(denoiser).forward_kwargs(denoiser, sample.shape[0], sample.device))


def call_unet_2d_condition(denoiser, sample, timestep, conditioning: Conditioning):
    added = {k: conditioning[k] for k in ("text_embeds", "time_ids") if k in conditioning}  # SDXL
    return denoiser(
        sample, timestep, encoder_hidden_states=conditioning["encoder_hidden_states"], added_cond_kwargs=added or None
    )


def call_pixart(denoiser, sample, timestep, conditioning: Conditioning):
    added = {k: conditioning.get(k) for k in ("resolution", "aspect_ratio")}
    return denoiser(
        sample,
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        timestep=timestep,
        added_cond_kwargs=added,
        encoder_attention_mask=conditioning.get("encoder_attention_mask"),
    )


def call_sd3(denoiser, sample, timestep, conditioning: Conditioning):
    return denoiser(
        hidden_states=sample,
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        pooled_projections=conditioning["pooled_projections"],
        timestep=timestep,
    )


def pack_flux_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, row-major (Flux's packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise UsageError(f"Flux packs 2x2 latent patches: the latent grid {h}x{w} must have even sides.")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h * w, 3) position ids of the packed latent grid: (0, row, column) per token."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


def call_flux(denoiser, sample, timestep, conditioning: Conditioning):
    h, w = sample.shape[-2] // 2, sample.shape[-1] // 2
    return denoiser(
        hidden_states=pack_flux_latents(sample),
        timestep=timestep.to(sample.dtype) / 1000,  # FluxPipeline passes t / 1000; the model multiplies it back
        guidance=conditioning.get("guidance"),
        pooled_projections=conditioning["pooled_projections"],
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        txt_ids=conditioning["txt_ids"],
        img_ids=flux_image_ids(h, w, sample.device, sample.dtype),
    )


# ------------------------------------------------------------------ prompt encoding (the pipeline's own)
def encode_sd(pipe, prompt: str, device: torch.device, image_size: int, denoiser: nn.Module) -> Conditioning:
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: two encoders, pooled embedding and time ids
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = float(image_size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device)  # original, crop, target
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return {"encoder_hidden_states": embeds}


def encode_pixart(pipe, prompt: str, device: torch.device, image_size: int, denoiser: nn.Module) -> Conditioning:
    embeds, mask, _, _ = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, device=device, clean_caption=False
    )
    out = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if getattr(denoiser, "use_additional_conditions", False):  # PixArt-alpha at 1024: size and aspect ratio
        out["resolution"] = torch.tensor([[float(image_size), float(image_size)]], device=device)
        out["aspect_ratio"] = torch.tensor([[1.0]], device=device)
    return out


def encode_sd3(pipe, prompt: str, device: torch.device, image_size: int, denoiser: nn.Module) -> Conditioning:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def encode_flux(pipe, prompt: str, device: torch.device, image_size: int, denoiser: nn.Module) -> Conditioning:
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, device=device, num_images_per_prompt=1)
    out = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}
    if denoiser.config.guidance_embeds:
        out["guidance"] = torch.full((1,), FLUX_DEFAULT_GUIDANCE, device=device)
    return out


@dataclass(frozen=True)
class TextConditioning:
    """How a text-conditioned family gets its conditioning: the diffusers pipeline whose public
    ``encode_prompt`` computes it (built from the loaded text encoders and tokenizers), and the keys it holds."""

    pipeline_class: Callable[[nn.Module], str]  # denoiser -> name of the diffusers pipeline class
    encode: Callable[..., Conditioning]  # (pipe, prompt, device, image_size, denoiser) -> Conditioning
    required: tuple[str, ...]  # keys a user's precomputed conditioning must hold
    components: tuple[str, ...] = (
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    )


def _sd_pipeline(denoiser: nn.Module) -> str:
    sdxl = denoiser.config.addition_embed_type == "text_time"
    return "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"


# ------------------------------------------------------------------ layers
def _middle_of_unet_decoder(denoiser: nn.Module) -> str:
    """The last resnet of the up-block before the middle resolution (``up_blocks.1.resnets.2``, the paper's
    ``out_6``, for the 35.7M DDPM; for Stable Diffusion UNets the output of ``up_blocks.1``'s last resnet)."""
    index = max(len(denoiser.up_blocks) // 2 - 1, 0)
    return f"up_blocks.{index}.resnets.{len(denoiser.up_blocks[index].resnets) - 1}"


def _middle_dit_block(denoiser: nn.Module) -> str:
    """Block ``num_layers // 2 - 1`` (13 of 28, as the paper's DiT-XL/2)."""
    return f"transformer_blocks.{max(denoiser.config.num_layers // 2 - 1, 0)}"


def _middle_flux_block(denoiser: nn.Module) -> str:
    """The last double-stream block (image and text streams still apart)."""
    return f"transformer_blocks.{max(len(denoiser.transformer_blocks) - 1, 0)}"


def _patch_size(denoiser: nn.Module) -> int:
    return int(denoiser.config.patch_size)


@dataclass(frozen=True)
class DenoiserFamily:
    """What the library needs to know about one diffusers denoiser class."""

    model_class: type[nn.Module]
    layer_pattern: re.Pattern[str]  # full module paths that count as layers
    default_layer: Callable[[nn.Module], str]  # a good single feature layer (middle of the decoder)
    component: str = "unet"  # its name in a pipeline's model_index.json
    forward_kwargs: ForwardKwargs = _no_kwargs  # extra arguments of an unconditional forward
    aliases: tuple[str, ...] = field(default=())  # legacy ``_class_name`` values loaded as this class
    call: Callable = call_unconditional  # (denoiser, sample, timestep, conditioning) -> output
    block_output: Callable[[object], torch.Tensor] = first_tensor  # the feature tensor of a block's output
    token_patch: Callable[[nn.Module], int] | None = None  # tokens: latent pixels per token side (grid = side / p)
    text: TextConditioning | None = None  # text-conditioned families only

    @property
    def name(self) -> str:
        return self.model_class.__name__

    @property
    def conditional(self) -> bool:
        return self.text is not None

    def layer_candidates(self, denoiser: nn.Module) -> list[str]:
        """Module paths of every block whose output can be captured (registration order)."""
        return [name for name, _ in denoiser.named_modules() if self.layer_pattern.match(name)]

    def token_grid(self, denoiser: nn.Module, latent_height: int, latent_width: int) -> tuple[int, int]:
        """The (h, w) grid of a block's tokens for a latent input of that size (row-major tokens)."""
        if self.token_patch is None:
            raise UsageError(f"{self.name} blocks output feature maps, not tokens.")
        patch = self.token_patch(denoiser)
        return latent_height // patch, latent_width // patch


UNET_PATTERN = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)(\.(resnets|attentions)\.\d+)?$")
BLOCKS_PATTERN = re.compile(r"^transformer_blocks\.\d+$")

UNET_2D = DenoiserFamily(UNet2DModel, UNET_PATTERN, _middle_of_unet_decoder)
DIT = DenoiserFamily(
    DiTTransformer2DModel,
    BLOCKS_PATTERN,
    _middle_dit_block,
    component="transformer",
    forward_kwargs=_null_class_labels,
    aliases=("Transformer2DModel",),  # facebook/DiT-XL-2-256 records the legacy name
    token_patch=_patch_size,
)
UNET_2D_CONDITION = DenoiserFamily(
    UNet2DConditionModel,
    UNET_PATTERN,
    _middle_of_unet_decoder,
    call=call_unet_2d_condition,
    text=TextConditioning(_sd_pipeline, encode_sd, ("encoder_hidden_states",)),
)
PIXART = DenoiserFamily(
    PixArtTransformer2DModel,
    BLOCKS_PATTERN,
    _middle_dit_block,
    component="transformer",
    call=call_pixart,
    token_patch=_patch_size,
    text=TextConditioning(lambda denoiser: "PixArtSigmaPipeline", encode_pixart, ("encoder_hidden_states",)),
)
SD3 = DenoiserFamily(
    SD3Transformer2DModel,
    BLOCKS_PATTERN,
    _middle_dit_block,
    component="transformer",
    call=call_sd3,
    block_output=image_stream,
    token_patch=_patch_size,
    text=TextConditioning(
        lambda denoiser: "StableDiffusion3Pipeline", encode_sd3, ("encoder_hidden_states", "pooled_projections")
    ),
)
FLUX = DenoiserFamily(
    FluxTransformer2DModel,
    re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+$"),
    _middle_flux_block,
    component="transformer",
    call=call_flux,
    block_output=image_stream,
    token_patch=lambda denoiser: 2,  # 2x2 latent patches packed into one token
    text=TextConditioning(
        lambda denoiser: "FluxPipeline", encode_flux, ("encoder_hidden_states", "pooled_projections", "txt_ids")
    ),
)
FAMILIES: dict[str, DenoiserFamily] = {
    family.name: family for family in (UNET_2D, DIT, UNET_2D_CONDITION, PIXART, SD3, FLUX)
}
DENOISER_CLASSES: dict[str, type[nn.Module]] = {name: family.model_class for name, family in FAMILIES.items()}
SUPPORTED = ", ".join(FAMILIES)
DENOISER_COMPONENTS = tuple(dict.fromkeys(family.component for family in FAMILIES.values()))  # unet, transformer
UNCONDITIONAL = tuple(name for name, family in FAMILIES.items() if not family.conditional)


def unsupported(class_name: str | None) -> UsageTypeError:
    return UsageTypeError(f"Unsupported denoiser {class_name}: ddae_diffusers supports {SUPPORTED}.")


def family_named(class_name: str | None) -> DenoiserFamily:
    """The family of a ``_class_name`` from a diffusers config (legacy aliases included)."""
    for family in FAMILIES.values():
        if class_name == family.name or class_name in family.aliases:
            return family
    raise unsupported(class_name)


def family_of(denoiser: object) -> DenoiserFamily:
    """The family of a denoiser instance; ``UsageTypeError`` naming the supported classes otherwise."""
    for family in FAMILIES.values():
        if isinstance(denoiser, family.model_class):
            return family
    raise unsupported(type(denoiser).__name__)


def sample_size(config) -> int | None:
    """The side of a config's ``sample_size`` (an int, a pair, or None)."""
    size = config.get("sample_size") if isinstance(config, dict) else getattr(config, "sample_size", None)
    if size is None:
        return None
    return int(size[0] if isinstance(size, (list, tuple)) else size)
