"""The tiny Hub-layout folders load with DiffusionPipeline.from_pretrained, encode prompts and generate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from hub_layouts import LAYOUTS, RESOLUTIONS

NAMES = sorted(LAYOUTS)

CLIP = ["transformers", "CLIPTextModel"]
CLIP_PROJ = ["transformers", "CLIPTextModelWithProjection"]
CLIP_TOK = ["transformers", "CLIPTokenizer"]
T5 = ["transformers", "T5EncoderModel"]
VAE = ["diffusers", "AutoencoderKL"]
UNET = ["diffusers", "UNet2DConditionModel"]

# The public repositories' model_index.json: pipeline class and {component: [library, class]}.
PUBLIC_MODEL_INDEX: dict[str, tuple[type, dict[str, list[str | None]]]] = {
    "sd15": (
        StableDiffusionPipeline,
        {
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": CLIP,
            "tokenizer": CLIP_TOK,
            "unet": UNET,
            "vae": VAE,
        },
    ),
    "sd21": (
        StableDiffusionPipeline,
        {
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": CLIP,
            "tokenizer": CLIP_TOK,
            "unet": UNET,
            "vae": VAE,
        },
    ),
    "sdxl": (
        StableDiffusionXLPipeline,
        {
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": CLIP,
            "text_encoder_2": CLIP_PROJ,
            "tokenizer": CLIP_TOK,
            "tokenizer_2": CLIP_TOK,
            "unet": UNET,
            "vae": VAE,
        },
    ),
    "pixart_sigma": (
        PixArtSigmaPipeline,
        {
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": T5,
            "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "vae": VAE,
        },
    ),
    "sd3": (
        StableDiffusion3Pipeline,
        {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": CLIP_PROJ,
            "text_encoder_2": CLIP_PROJ,
            "text_encoder_3": T5,
            "tokenizer": CLIP_TOK,
            "tokenizer_2": CLIP_TOK,
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": VAE,
        },
    ),
    "flux": (
        FluxPipeline,
        {
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": CLIP,
            "text_encoder_2": T5,
            "tokenizer": CLIP_TOK,
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": VAE,
        },
    ),
}
# Pipeline-level entries of model_index.json besides the components.
PUBLIC_EXTRAS: dict[str, dict[str, Any]] = {
    "sd21": {"requires_safety_checker": False},
    "sdxl": {"force_zeros_for_empty_prompt": True},
}

# Config values the real checkpoints have and the tiny ones keep: (component, key) -> value.
KEY_CONFIG: dict[str, dict[tuple[str, str], Any]] = {
    "sd15": {
        ("vae", "scaling_factor"): 0.18215,
        ("scheduler", "prediction_type"): "epsilon",
        ("scheduler", "beta_schedule"): "scaled_linear",
        ("scheduler", "beta_start"): 0.00085,
        ("scheduler", "beta_end"): 0.012,
        ("scheduler", "skip_prk_steps"): True,
        ("text_encoder", "hidden_act"): "quick_gelu",
    },
    "sd21": {
        ("vae", "scaling_factor"): 0.18215,
        ("scheduler", "prediction_type"): "v_prediction",
        ("scheduler", "beta_schedule"): "scaled_linear",
        ("unet", "use_linear_projection"): True,
        ("text_encoder", "hidden_act"): "gelu",
    },
    "sdxl": {
        ("vae", "scaling_factor"): 0.13025,
        ("unet", "addition_embed_type"): "text_time",
        ("scheduler", "timestep_spacing"): "leading",
    },
    "pixart_sigma": {
        ("vae", "scaling_factor"): 0.13025,
        ("transformer", "norm_type"): "ada_norm_single",
        ("transformer", "use_additional_conditions"): False,
        ("transformer", "out_channels"): 8,
        ("scheduler", "algorithm_type"): "dpmsolver++",
    },
    "sd3": {
        ("vae", "latent_channels"): 16,
        ("vae", "scaling_factor"): 1.5305,
        ("vae", "shift_factor"): 0.0609,
        ("vae", "use_quant_conv"): False,
        ("scheduler", "shift"): 3.0,
    },
    "flux": {
        ("vae", "latent_channels"): 16,
        ("vae", "scaling_factor"): 0.3611,
        ("vae", "shift_factor"): 0.1159,
        ("vae", "use_quant_conv"): False,
        ("vae", "use_post_quant_conv"): False,
        ("transformer", "guidance_embeds"): True,
        ("transformer", "in_channels"): 64,
        ("scheduler", "use_dynamic_shifting"): True,
        ("scheduler", "base_shift"): 0.5,
        ("scheduler", "max_shift"): 1.15,
    },
}

# Each pipeline's default guidance_scale (Flux: the distilled guidance embedding, no CFG batch).
GUIDANCE = {"sd15": 7.5, "sd21": 7.5, "sdxl": 5.0, "pixart_sigma": 4.5, "sd3": 7.0, "flux": 3.5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub_layouts")
    return {name: write(root / name) for name, write in LAYOUTS.items()}


def encode_empty_prompt(name: str, pipe: DiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``pipe.encode_prompt("")`` with the arguments each pipeline needs; returns (embeddings, pooled or None)."""
    if name in ("sd15", "sd21"):
        embeds, negative = pipe.encode_prompt("", "cpu", 1, True)
        assert torch.isfinite(negative).all()
        return embeds, None
    if name == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("", device="cpu")
        # force_zeros_for_empty_prompt: the unconditional branch is all zeros.
        assert not negative.any() and not negative_pooled.any()
        return embeds, pooled
    if name == "pixart_sigma":
        embeds, mask, negative, negative_mask = pipe.encode_prompt("", device="cpu")
        assert embeds.shape[1] == mask.shape[1] == 300  # PixArt-Sigma's max_sequence_length
        assert torch.isfinite(negative).all()
        return embeds, None
    if name == "sd3":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt("", None, None, device="cpu")
        assert embeds.shape[1] == pipe.tokenizer.model_max_length + 256  # CLIP tokens, then T5's 256
        assert torch.isfinite(negative).all() and torch.isfinite(negative_pooled).all()
        return embeds, pooled
    embeds, pooled, text_ids = pipe.encode_prompt("", None, device="cpu")
    assert embeds.shape[1] == text_ids.shape[0] == 512  # Flux's T5 max_sequence_length
    return embeds, pooled


def expected_widths(name: str, pipe: DiffusionPipeline) -> tuple[int, int | None]:
    """The text width the denoiser takes and its pooled width (None where it takes none)."""
    if name in ("sd15", "sd21"):
        return pipe.unet.config.cross_attention_dim, None
    if name == "sdxl":
        unet = pipe.unet.config
        return unet.cross_attention_dim, unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    if name == "pixart_sigma":
        return pipe.transformer.config.caption_channels, None
    return pipe.transformer.config.joint_attention_dim, pipe.transformer.config.pooled_projection_dim


@pytest.mark.parametrize("name", NAMES)
def test_model_index_matches_public_repo(name: str, folders: dict[str, str]) -> None:
    index = json.loads((Path(folders[name]) / "model_index.json").read_text())
    pipeline_class, components = PUBLIC_MODEL_INDEX[name]
    assert index.pop("_class_name") == pipeline_class.__name__
    assert index.pop("_diffusers_version")
    assert index == {**components, **PUBLIC_EXTRAS.get(name, {})}
    for component, (library, _) in components.items():
        assert (Path(folders[name]) / component).is_dir() == (library is not None)


@pytest.mark.parametrize("name", NAMES)
def test_layout_loads_encodes_and_generates(name: str, folders: dict[str, str]) -> None:
    pipe = DiffusionPipeline.from_pretrained(folders[name])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is PUBLIC_MODEL_INDEX[name][0]
    for (component, key), value in KEY_CONFIG[name].items():
        assert getattr(getattr(pipe, component).config, key) == value, (component, key)

    with torch.no_grad():
        embeds, pooled = encode_empty_prompt(name, pipe)
    width, pooled_width = expected_widths(name, pipe)
    assert embeds.shape[0] == 1 and embeds.shape[-1] == width
    assert torch.isfinite(embeds).all()
    if pooled_width is not None:
        assert pooled.shape == (1, pooled_width) and torch.isfinite(pooled).all()

    size = RESOLUTIONS[name]
    extra = {"use_resolution_binning": False} if name == "pixart_sigma" else {}
    images = pipe(
        prompt="",
        num_inference_steps=2,
        height=size,
        width=size,
        guidance_scale=GUIDANCE[name],
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all()


def test_tokenizers_cover_english_prompts(folders: dict[str, str]) -> None:
    """The tiny CLIP (byte-level BPE) and T5 (Unigram) tokenizers map a prompt with no unknown tokens."""
    pipe = DiffusionPipeline.from_pretrained(folders["flux"], transformer=None, vae=None)
    prompt = "A red car in front of the house, 42 trees!"
    clip_ids = pipe.tokenizer(prompt).input_ids
    assert clip_ids[0] == pipe.tokenizer.bos_token_id and clip_ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.eos_token_id not in clip_ids[1:-1]  # <|endoftext|> doubles as CLIP's unk token
    t5_ids = pipe.tokenizer_2(prompt).input_ids
    assert pipe.tokenizer_2.unk_token_id not in t5_ids and t5_ids[-1] == pipe.tokenizer_2.eos_token_id
    assert max(t5_ids) < pipe.text_encoder_2.config.vocab_size
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
