"""The shipped reference result (examples/): the CPU-pretrained DDAE, its probe grid, its classifiers,
and the README's main command that probes it."""

from __future__ import annotations

import json
import re
import shlex

import datasets
import pytest
import torch
from conftest import CIFAR10_SAMPLE, REPO_ROOT
from diffusers import DDPMPipeline
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import ddae_diffusers  # noqa: F401  (registers the "ddae" Auto classes)
from ddae_diffusers import DDAEBackbone, DDAEForImageClassification
from ddae_diffusers.probing.cli import main as probe_main
from ddae_diffusers.probing.engine import DEFAULT_TIMESTEPS, default_layers
from ddae_diffusers.probing.report import load_heads

EXAMPLES = REPO_ROOT / "examples"
MODEL = EXAMPLES / "ddae-cifar10-cpu"
PROBE = EXAMPLES / "ddae-cifar10-cpu-probe"
CLASSIFIERS = [EXAMPLES / "ddae-cifar10-cpu-linear", EXAMPLES / "ddae-cifar10-cpu-finetuned"]


@pytest.fixture(scope="module")
def test_images():
    """The first 256 CIFAR-10 test images."""
    return datasets.load_dataset(CIFAR10_SAMPLE, split="test[:256]")


def test_shipped_model_loads_with_diffusers():
    pipe = DDPMPipeline.from_pretrained(MODEL)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_587_491
    assert sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file()) < 15 * 2**20
    card = (MODEL / "README.md").read_text()
    assert "train_unconditional.py" in card and "Probe history" in card


def test_shipped_probe_grid_covers_every_layer_on_all_of_cifar10():
    results = json.loads((PROBE / "results.json").read_text())
    backbone = DDAEBackbone.from_pretrained(MODEL)
    assert results["layers"] == default_layers(backbone)
    assert 10 in results["timesteps"] and set(results["timesteps"]) <= set(DEFAULT_TIMESTEPS)  # the paper's t=11
    assert results["views"][1]["images"] == "clean"  # the fair protocol: train view 0 is seen as the test images
    assert results["num_train"] + results["num_val"] == 50_000 and results["num_eval"] == 10_000
    assert len(results["cells"]) == len(results["layers"]) * len(results["timesteps"])
    assert set(load_heads(str(PROBE))) == {(c["layer"], c["timestep"]) for c in results["cells"]}
    assert results["baselines"]["pixels"]["feature_dim"] == 3 * 32 * 32
    for name in ("results.md", "heatmap.png", "knn_heatmap.png"):
        assert (PROBE / name).is_file(), name


@pytest.mark.parametrize("folder", CLASSIFIERS, ids=lambda p: p.name)
def test_shipped_classifiers_classify_real_images(folder, test_images):
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(model, DDAEForImageClassification)
    with torch.no_grad():
        logits = model(**processor(test_images["img"], return_tensors="pt")).logits
    accuracy = (logits.argmax(-1) == torch.tensor(test_images["label"])).float().mean().item()
    assert accuracy > 0.35, accuracy  # 10 classes: chance is 0.1
    predictions = pipeline("image-classification", model=str(folder))(test_images["img"][:2])
    assert predictions[0][0]["label"] in model.config.id2label.values()


def test_exported_linear_classifier_is_the_probe_head(test_images, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # results.json names the model by its path from the repository root
    from_probe = DDAEForImageClassification.from_probe(PROBE).eval()
    exported = AutoModelForImageClassification.from_pretrained(CLASSIFIERS[0]).eval()
    assert exported.config.feature_layer == from_probe.config.feature_layer
    pixel_values = AutoImageProcessor.from_pretrained(CLASSIFIERS[0])(test_images["img"][:64], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**pixel_values).logits, from_probe(**pixel_values).logits)


def readme_main_command() -> list[str]:
    """The ``ddae-probe`` command of the README's quick start, as argv (without the program name)."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    command = block.replace("\\\n", " ").split("ddae-probe", 1)[1].splitlines()[0]
    return shlex.split(command)


def test_readme_main_command_runs_on_the_shipped_model(tmp_path, monkeypatch):
    argv = readme_main_command()
    assert argv[argv.index("--model") + 1] == "examples/ddae-cifar10-cpu"
    assert argv[argv.index("--dataset") + 1] == "data/cifar10-sample"  # the embedded sample: runs anywhere
    monkeypatch.chdir(REPO_ROOT)  # the README runs it from the repository root
    # the same command on a slice of the data, one timestep and the default layers
    small = ["--max_train_samples", "100", "--max_eval_samples", "50", "--timesteps", "10",
             "--output_dir", str(tmp_path)]
    results = probe_main(argv + small)
    assert len(results["cells"]) == len(results["layers"]) == 15
    assert (tmp_path / "heatmap.png").is_file() and (tmp_path / "results.md").is_file()
