"""Common fixtures: tiny real diffusers models saved to folders, and the embedded CIFAR-10 sample."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and subprocess tests (2-process runs) would
# oversubscribe the cores; set before torch is imported so child processes inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)
from huggingface_hub import CommitInfo, HfApi  # noqa: E402
from huggingface_hub.hf_api import RepoUrl  # noqa: E402

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

# Latent DiT in the facebook/DiT-XL-2-256 shape, tiny: 4 latent channels, learned sigma (8 out), 1000 classes.
TINY_LATENT_DIT = dict(in_channels=4, out_channels=8, sample_size=8, num_embeds_ada_norm=1000)


def make_tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET_CONFIG, **overrides}).eval()


def make_tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**TINY_DIT_CONFIG, **overrides}).eval()


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


def save_tiny_resnet(folder) -> str:
    """A tiny real ResNetForImageClassification (3 labels, 16 penultimate features) with a 32x32 ViT-style image
    processor, saved to ``folder``: an image classifier independent of any DDAE."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    ResNetForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_unet_pipeline_dir(tmp_path_factory) -> str:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with a tiny random UNet."""
    folder = tmp_path_factory.mktemp("tiny-ddpm")
    DDPMPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dit_pipeline_dir(tmp_path_factory) -> str:
    """A pixel-space DDAEPipeline folder (model_index.json, transformer/, scheduler/) with a tiny random DiT."""
    from ddae_diffusers import DDAEPipeline

    folder = tmp_path_factory.mktemp("tiny-pixel-dit")
    DDAEPipeline(transformer=make_tiny_dit(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return str(folder)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="session")
def dit_xl_layout_dir(tmp_path_factory) -> str:
    """A folder in the facebook/DiT-XL-2-256 layout (DiTPipeline model_index with the legacy
    Transformer2DModel class name, id2label, DDIMScheduler, AutoencoderKL) with tiny random weights."""
    folder = tmp_path_factory.mktemp("dit-xl-2-256-layout")
    transformer = make_tiny_dit(**TINY_LATENT_DIT)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    DiTPipeline(transformer=transformer, vae=make_tiny_vae(), scheduler=scheduler).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_diffusers_version="0.12.0.dev0", transformer=["diffusers", "Transformer2DModel"],
                 id2label={"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus"})
    write_json(folder / "model_index.json", index)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    write_json(folder / "transformer" / "config.json", {**config, "_class_name": "Transformer2DModel"})
    return str(folder)


@pytest.fixture(scope="session")
def cifar_small():
    """256 real CIFAR-10 training images of the embedded sample (columns ``img``, ``label``)."""
    import datasets

    return datasets.load_dataset(CIFAR10_SAMPLE, split="train[:256]")


class FakeHub:
    """Records what HfApi would send: created repos and, per commit, the files written into a local 'repo'."""

    user = "someone"  # the owner of the fake token

    def __init__(self, root: Path):
        self.root, self.repos, self.commits = root, [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        if "/" not in repo_id:  # the Hub puts a bare name in the token owner's namespace
            repo_id = f"{self.user}/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, **kwargs):
        folder = self.root / repo_id.replace("/", "--")
        paths = []
        for op in operations:
            target = folder / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                shutil.copy(source, target)
            else:
                target.write_bytes(source if isinstance(source, bytes) else source.read())
            paths.append(op.path_in_repo)
        self.commits.append({"repo_id": repo_id, "paths": sorted(paths), "folder": folder, **kwargs})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message=kwargs.get("commit_message"),
            commit_description="", oid="0" * 40,
        )  # fmt: skip

    def patch(self):
        hub = self
        patches = [
            # upload_folder's classic path ends in create_commit; the streamed xet path would talk to a storage
            # server instead.
            mock.patch("huggingface_hub.hf_api.is_xet_available", lambda: False),
            mock.patch.multiple(
                HfApi,
                create_repo=lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw),
                create_commit=lambda api, repo_id, operations, **kw: hub.create_commit(api, repo_id, operations, **kw),
                # The Hub's /api/validate-yaml endpoint (upload_folder checks a README's metadata): parse it here.
                _validate_yaml=lambda api, content, **kw: yaml.safe_load(content.split("---")[1]),
            ),
        ]
        stack = contextlib.ExitStack()
        for patch in patches:
            stack.enter_context(patch)
        return stack
