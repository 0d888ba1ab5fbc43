"""From a probe grid to a Hub classifier in one command: ``ddae-probe --push_to_hub`` against a fake Hub (only
the HTTP layer is faked), then the uploaded folder through ``AutoModelForImageClassification`` and
``pipeline("image-classification")`` on the probe's own test images, for a pixel UNet, a pixel DiT and a latent
DiT with its VAE."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import CIFAR10_SAMPLE, FakeHub
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification, pipeline

import ddae_diffusers  # noqa: F401  (registers the DDAE classes with the Auto API)
from ddae_diffusers.data import images_to_tensor
from ddae_diffusers.probing.cli import main as probe_main

NUM_TRAIN, NUM_EVAL = 200, 64
REMOTE_CODE = {
    "modeling_ddae.py", "configuration_ddae.py", "image_processing_ddae.py", "capture.py", "errors.py",
    "families.py", "noise.py",
}  # fmt: skip
UPLOADED = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "probe_grid.png",
            "results.json", *REMOTE_CODE}  # fmt: skip
KINDS = {
    "pixel-unet": ("tiny_unet_pipeline_dir", ["mid_block", "up_blocks.0.resnets.1"]),
    "pixel-dit": ("tiny_dit_pipeline_dir", ["transformer_blocks.0", "transformer_blocks.1"]),
    "latent-dit": ("dit_xl_layout_dir", ["transformer_blocks.0", "transformer_blocks.1"]),
}


def probe_args(model: str, out, layers: list[str]) -> list[str]:
    return [
        "--model", model, "--output_dir", str(out), "--dataset", CIFAR10_SAMPLE,
        "--max_train_samples", str(NUM_TRAIN), "--max_eval_samples", str(NUM_EVAL), "--layers", *layers,
        "--timesteps", "10", "100", "--batch_size", "32", "--epochs", "8", "--lrs", "0.01", "--seed", "3",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
def test_probe_push_round_trip(kind, request, tmp_path):
    fixture, layers = KINDS[kind]
    model_dir = request.getfixturevalue(fixture)
    hub = FakeHub(tmp_path / "hub")
    with hub.patch():
        results = probe_main([*probe_args(model_dir, tmp_path / "probe", layers), "--push_to_hub",
                              "--hub_model_id", f"someone/ddae-{kind}"])  # fmt: skip
    assert len(hub.commits) == 1 and set(hub.repos) == {f"someone/ddae-{kind}"}
    commit = hub.commits[0]
    assert set(commit["paths"]) == UPLOADED  # exactly these files, in one commit
    repo = commit["folder"]
    best = results.best

    # The card: model-index with the probe's test accuracy and kNN accuracy; grid table and heatmap.
    card = ModelCard.load(repo / "README.md")
    metrics = {r.metric_name: r for r in card.data.eval_results}
    linear = next(r for name, r in metrics.items() if name.startswith("Top-1"))
    knn = next(r for name, r in metrics.items() if name.startswith("kNN"))
    assert linear.metric_value == pytest.approx(best.linear_acc) and knn.metric_value == pytest.approx(best.knn_acc)
    assert linear.dataset_split == "test" and linear.dataset_name == "cifar10-sample"
    assert "## Probe grid" in card.text and "probe_grid.png" in card.text and "results.json" in card.text
    assert json.loads((repo / "results.json").read_text())["best"] == json.loads(
        (tmp_path / "probe" / "results.json").read_text()
    )["best"]
    config = json.loads((repo / "config.json").read_text())
    assert (config["feature_layer"], config["timestep"]) == (best.layer, best.timestep)
    assert (config["vae_config"] is not None) == (kind == "latent-dit")
    if kind == "latent-dit":
        assert "VAE encoder" in card.text and "decoder dropped" in card.text

    # The uploaded folder reproduces the probe's test accuracy on the same images.
    test = datasets.load_dataset(CIFAR10_SAMPLE, split=f"test[:{NUM_EVAL}]")[:]  # plain lists
    labels = torch.tensor(test["label"])
    model = AutoModelForImageClassification.from_pretrained(repo).eval()
    if kind == "latent-dit":
        assert not any(p.requires_grad for p in model.vae.parameters())
        assert not any(name.startswith("vae.decoder") for name in model.state_dict())
    pixels = images_to_tensor(test["img"], model.config.image_size)
    with torch.no_grad():
        logits = model(pixels).logits  # one batch in split order: the probe's own test noise
    predicted = logits.argmax(-1)
    # Equal up to argmax near-ties (the cached and the end-to-end path round floats differently).
    top2 = logits.topk(2, dim=-1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())
    assert near_ties <= 2
    assert abs((predicted == labels).float().mean().item() - best.linear_acc) <= near_ties / NUM_EVAL + 1e-9

    classify = pipeline("image-classification", model=str(repo), device="cpu")
    outputs = classify(test["img"], batch_size=NUM_EVAL, top_k=1)
    piped = torch.tensor([model.config.label2id[out[0]["label"]] for out in outputs])
    assert torch.equal(piped, predicted)


def test_push_cell_and_hub_checks_come_before_any_extraction(tiny_unet_pipeline_dir, tmp_path):
    args = probe_args(tiny_unet_pipeline_dir, tmp_path / "probe", ["mid_block", "up_blocks.0.resnets.1"])
    cases = [
        (["--push_to_hub", "--hub_model_id", "not a/valid/id"], "is not a Hub repository id"),
        (["--push_to_hub", "--push_cell", "mid_block@999"], "not in the grid's noise levels"),
        (["--push_to_hub", "--push_cell", "down_blocks.0@10"], "not in the grid's layers"),
        (["--push_to_hub", "--push_cell", "mid_block"], "is not LAYER@LEVEL"),
        (["--hub_model_id", "someone/x"], "need --push_to_hub"),
    ]
    hub = FakeHub(tmp_path / "hub")
    for extra, message in cases:
        with hub.patch(), pytest.raises(ValueError, match=message):
            probe_main([*args, *extra])
    assert not list((tmp_path / "probe").rglob("features.npy")) and not hub.commits  # nothing computed
    # Offline (no fake Hub): the repository cannot be created, before the output folder is even made.
    offline = probe_args(tiny_unet_pipeline_dir, tmp_path / "offline", ["mid_block"])
    with pytest.raises(ValueError, match="Cannot reach the Hub"):
        probe_main([*offline, "--push_to_hub", "--hub_model_id", "someone/x"])
    assert not (tmp_path / "offline").exists()


def test_push_cell_publishes_the_chosen_cell(tiny_unet_pipeline_dir, tmp_path):
    args = probe_args(tiny_unet_pipeline_dir, tmp_path / "probe", ["mid_block", "up_blocks.0.resnets.1"])
    hub = FakeHub(tmp_path / "hub")
    with hub.patch():
        results = probe_main([*args, "--push_to_hub", "--push_cell", "mid_block@100", "--hub_private_repo"])
    # default id: the output folder's name (as the example scripts do), in the token owner's namespace
    assert set(hub.repos) == {"probe", "someone/probe"} and hub.commits[0]["repo_id"] == "someone/probe"
    config = json.loads((hub.commits[0]["folder"] / "config.json").read_text())
    assert (config["feature_layer"], config["timestep"]) == ("mid_block", 100)
    cell = next(c for c in results.cells if c.key == "mid_block@100")
    card = ModelCard.load(hub.commits[0]["folder"] / "README.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(cell.linear_acc)
