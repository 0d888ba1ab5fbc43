"""Offline push_to_hub: only the HTTP layer (HfApi.create_repo / create_commit) is faked; the uploaded files
are checked and loaded back with and without ddae_diffusers installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FakeHub
from huggingface_hub import ModelCard
from test_finetune_ddae import finetune
from test_modeling_ddae import images, write_probe_folder
from transformers import AutoModelForImageClassification

from ddae_diffusers import DDAEForImageClassification

REMOTE_FILES = {"modeling_ddae.py", "configuration_ddae.py", "image_processing_ddae.py", "capture.py"}


def load_without_package(folder: Path, pixels_path: Path, tmp_path: Path) -> np.ndarray:
    """Loads ``folder`` with trust_remote_code=True in a Python where ddae_diffusers cannot be imported."""
    site_packages = sysconfig.get_paths()["purelib"]
    out = tmp_path / "remote_logits.npy"
    code = f"""
import sys
sys.path.append({site_packages!r})  # -S: no .pth files, so the editable ddae_diffusers install is invisible
try:
    import ddae_diffusers
    sys.exit("ddae_diffusers is importable")
except ModuleNotFoundError:
    pass
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(processor).__name__ == "DDAEImageProcessor"
with torch.no_grad():
    logits = model(torch.from_numpy(np.load({str(pixels_path)!r}))).logits
np.save({str(out)!r}, logits.numpy())
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


def test_push_probe_export(tiny_unet_pipeline_dir, tmp_path):
    write_probe_folder(tmp_path / "probe", tiny_unet_pipeline_dir)
    model = DDAEForImageClassification.from_probe(tmp_path / "probe")
    hub = FakeHub(tmp_path / "hub")
    with hub.patch():
        model.push_to_hub("someone/ddae-tiny-probe", tags=["cifar10"])
    assert hub.repos == ["someone/ddae-tiny-probe"] and len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit["paths"]) == {
        "config.json", "model.safetensors", "preprocessor_config.json", "README.md", "probe_grid.png",
        "errors.py", "families.py", "noise.py", *REMOTE_FILES,
    }  # fmt: skip
    repo = commit["folder"]

    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ddae.DDAEConfig",
        "AutoModelForImageClassification": "modeling_ddae.DDAEForImageClassification",
        "AutoImageProcessor": "image_processing_ddae.DDAEImageProcessor",
    }
    assert config["id2label"] == {"0": "airplane", "1": "automobile", "2": "bird"}
    assert json.loads((repo / "preprocessor_config.json").read_text())["size"] == {"height": 16, "width": 16}

    card = ModelCard.load(repo / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"ddae", "diffusers", "cifar10"} <= set(data.tags) and data.license == "apache-2.0"
    assert data.datasets == ["uoft-cs/cifar10"]
    result = data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_split) == ("accuracy", 0.6, "test")
    assert data.model_name == "ddae-tiny-probe"  # named after the repo, as a folder saved locally is
    assert "up_blocks.0.resnets.1" in card.text and "probe_grid.png" in card.text

    pixel_values = images()
    with torch.no_grad():
        expected = model(pixel_values).logits
        local = AutoModelForImageClassification.from_pretrained(repo)(pixel_values).logits
    torch.testing.assert_close(local, expected, rtol=0, atol=0)
    np.save(tmp_path / "pixels.npy", pixel_values.numpy())
    remote = load_without_package(repo, tmp_path / "pixels.npy", tmp_path)
    np.testing.assert_allclose(remote, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_model_card_metadata_for_hub_ids(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.modelcard import classifier_model_card

    model = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer="mid_block", num_labels=2)
    model.config.base_model = "google/ddpm-cifar10-32"
    card = classifier_model_card(model.config)
    assert card.data.base_model == "google/ddpm-cifar10-32"
    assert card.data.eval_results is None  # no accuracy yet: no model-index
    model.config.base_model = tiny_unet_pipeline_dir
    assert classifier_model_card(model.config).data.base_model is None  # local paths are not Hub ids


def test_finetune_push_to_hub(tiny_unet_pipeline_dir, tmp_path):
    from conftest import CIFAR10_SAMPLE

    hub = FakeHub(tmp_path / "hub")
    with hub.patch():
        metrics = finetune.main([
            "--model_name_or_path", tiny_unet_pipeline_dir, "--layer", "mid_block", "--dataset_name", CIFAR10_SAMPLE,
            "--train_split", "train[:64]", "--eval_split", "test[:32]", "--output_dir", str(tmp_path / "run"),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "32", "--save_strategy", "no",
            "--use_cpu", "--freeze_backbone", "--push_to_hub", "--hub_model_id", "someone/ddae-ft",
            "--disable_tqdm", "true",
        ])  # fmt: skip
    assert set(hub.repos) == {"someone/ddae-ft"} and len(hub.commits) == 1
    commit = hub.commits[0]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(commit["paths"])
    assert REMOTE_FILES <= set(commit["paths"])
    card = ModelCard.load(commit["folder"] / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(metrics["eval_accuracy"])
    assert card.data.eval_results[0].dataset_split == "test[:32]"
    assert "someone/ddae-ft" in card.text and "frozen backbone" in card.text
    reloaded = AutoModelForImageClassification.from_pretrained(commit["folder"])
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "run")
    x = images()
    torch.testing.assert_close(reloaded(x).logits, saved(x).logits, rtol=0, atol=0)
