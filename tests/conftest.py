"""Common fixtures: tiny real diffusers models saved to folders, and the embedded CIFAR-10 sample."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and subprocess tests (2-process runs) would
# oversubscribe the cores; set before torch is imported so child processes inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's own real CIFAR-10 sample (5,000 train / 1,000 test, uoft-cs/cifar10 layout).
CIFAR10_SAMPLE = str(REPO_ROOT / "data" / "cifar10-sample")

# A 2-level UNet with attention at 8x8, small enough for sub-second forwards.
TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=None,
    norm_num_groups=8,
)
TINY_DIT_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    patch_size=2,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_embeds_ada_norm=1,
    norm_type="ada_norm_zero",
    norm_elementwise_affine=False,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def make_tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET_CONFIG, **overrides}).eval()


def make_tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**TINY_DIT_CONFIG, **overrides}).eval()


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


@pytest.fixture(scope="session")
def tiny_unet_pipeline_dir(tmp_path_factory) -> str:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with a tiny random UNet."""
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def cifar_small():
    """256 real CIFAR-10 training images of the embedded sample (columns ``img``, ``label``)."""
    import datasets

    return datasets.load_dataset(CIFAR10_SAMPLE, split="train[:256]")
