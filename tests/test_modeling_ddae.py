"""DDAEConfig / DDAEForImageClassification / DDAEImageProcessor on tiny real diffusers backbones."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_dit, make_tiny_unet, make_tiny_vae
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from ddae_diffusers import (
    DDAEBackbone,
    DDAEConfig,
    DDAEForImageClassification,
    DDAEImageProcessor,
    capture_activations,
    example_noise,
)
from ddae_diffusers.modeling_ddae import PrunedModule
from ddae_diffusers.probing.result import ProbeResult

UNET_LAYERS = [
    "down_blocks.1.resnets.0",
    "mid_block",
    "up_blocks.0.resnets.0",
    "up_blocks.0.attentions.1",
    "up_blocks.1.resnets.0",
]
LABELS = {0: "airplane", 1: "automobile", 2: "bird"}


def images(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def unet():
    return make_tiny_unet()


@pytest.fixture(scope="module")
def model(unet):
    return DDAEForImageClassification.from_diffusers(unet, layer="up_blocks.0.resnets.1", timestep=10, id2label=LABELS)


@pytest.mark.parametrize("layer", UNET_LAYERS)
def test_truncated_unet_matches_full_capture(unet, layer):
    model = DDAEForImageClassification.from_diffusers(unet, layer=layer, timestep=10, num_labels=3)
    x = images()
    with torch.no_grad():
        full = capture_activations(unet, x, 10, [layer], stop_after=layer)[layer]
        truncated = capture_activations(model.denoiser, x, 10, [layer], stop_after=layer)[layer]
    torch.testing.assert_close(truncated, full, rtol=0, atol=0)
    # Unreached modules are gone from the parameters and from the checkpoint.
    assert model.config.pruned_modules
    assert sum(p.numel() for p in model.denoiser.parameters()) < sum(p.numel() for p in unet.parameters())
    keys = model.state_dict().keys()
    for name in model.config.pruned_modules:
        assert isinstance(model.denoiser.get_submodule(name), PrunedModule)
        assert not any(k.startswith(f"denoiser.{name}.") for k in keys)


def test_truncation_drops_the_decoder_tail(unet):
    model = DDAEForImageClassification.from_diffusers(unet, layer="up_blocks.0.resnets.0", num_labels=2)
    pruned = set(model.config.pruned_modules)
    assert {"up_blocks.1", "conv_norm_out", "conv_out", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0"} <= pruned
    # The ModuleList keeps its length, so UNet2DModel.forward still slices the skip connections right.
    assert len(model.denoiser.up_blocks) == len(unet.up_blocks)
    assert len(model.denoiser.up_blocks[0].resnets) == len(unet.up_blocks[0].resnets)


def test_truncated_dit_matches_full_capture():
    dit = make_tiny_dit()
    model = DDAEForImageClassification.from_diffusers(dit, layer="transformer_blocks.0", timestep=5, num_labels=2)
    assert {"transformer_blocks.1", "proj_out_1", "proj_out_2"} <= set(model.config.pruned_modules)
    x = images(size=8)
    with torch.no_grad():
        full = capture_activations(dit, x, 5, ["transformer_blocks.0"], stop_after="transformer_blocks.0")
        cut = capture_activations(model.denoiser, x, 5, ["transformer_blocks.0"], stop_after="transformer_blocks.0")
    torch.testing.assert_close(cut["transformer_blocks.0"], full["transformer_blocks.0"], rtol=0, atol=0)


def test_pretrained_weights_survive_construction_and_reload(unet, model, tmp_path):
    source = unet.state_dict()
    kept = {k: v for k, v in model.denoiser.state_dict().items()}
    assert kept and all(torch.equal(v, source[k]) for k, v in kept.items())
    model.save_pretrained(tmp_path)
    reloaded = DDAEForImageClassification.from_pretrained(tmp_path)
    assert all(torch.equal(v, source[k]) for k, v in reloaded.denoiser.state_dict().items())
    # The head is new: initialised by post_init, not left empty.
    assert model.classifier.weight.abs().sum() > 0 and torch.all(model.classifier.bias == 0)


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_ddae.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ddae" and config["feature_layer"] == "up_blocks.0.resnets.1"
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_ddae.DDAEForImageClassification"
    assert config["id2label"] == {str(k): v for k, v in LABELS.items()}

    assert isinstance(AutoConfig.from_pretrained(tmp_path), DDAEConfig)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), DDAEImageProcessor)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is DDAEForImageClassification and not reloaded.training
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_dit_round_trip_restores_position_table(tmp_path):
    model = DDAEForImageClassification.from_diffusers(make_tiny_dit(), layer="transformer_blocks.0", num_labels=2)
    model.save_pretrained(tmp_path)
    reloaded = DDAEForImageClassification.from_pretrained(tmp_path)
    # DiT's sin-cos table is a non-persistent buffer: rebuilt, not loaded.
    torch.testing.assert_close(reloaded.denoiser.pos_embed.pos_embed, model.denoiser.pos_embed.pos_embed)
    x = images(size=8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_from_pipeline_folder(tiny_unet_pipeline_dir):
    model = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer="mid_block", num_labels=4)
    assert model.config.base_model == tiny_unet_pipeline_dir
    assert model.config.feature_dim == 32 and model.config.image_size == 16
    assert model(images()).logits.shape == (4, 4)


def test_fixed_noise_matches_capture_core(unet, model):
    """Eval logits = head(backbone.features(seed=noise_seed)): the same noise, feature and pooling."""
    x = images()
    backbone = DDAEBackbone(unet)
    feats = backbone.features(x, ["up_blocks.0.resnets.1"], [10], seed=model.config.noise_seed)
    with torch.no_grad():
        expected = model.classifier(model.feature_norm(feats["up_blocks.0.resnets.1", 10]))
        out = model(x, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.hidden_states[0].shape == (4, 32, 8, 8)


def test_noise_policies(unet):
    x = images()
    fixed = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=2, head_norm=None)
    with torch.no_grad():
        assert torch.equal(fixed(x).logits, fixed(x).logits)
        fixed.train()
        assert not torch.equal(fixed(x).logits, fixed(x).logits)  # fresh noise in training
        fixed.eval()
        eps = example_noise((3, 16, 16), range(4), seed=0)
        torch.testing.assert_close(fixed(x, noise=eps).logits, fixed(x).logits)

    random = DDAEForImageClassification.from_diffusers(
        unet, layer="mid_block", num_labels=2, head_norm=None, noise_policy="random"
    ).eval()
    none = DDAEForImageClassification.from_diffusers(
        unet, layer="mid_block", num_labels=2, head_norm=None, noise_policy="none"
    ).eval()
    with torch.no_grad():
        assert not torch.equal(random(x).logits, random(x).logits)
        clean = capture_activations(unet, x, 10, ["mid_block"], stop_after="mid_block")["mid_block"].mean((2, 3))
        torch.testing.assert_close(none(x).logits, none.classifier(clean))


def test_loss_follows_problem_type(unet):
    x = images()
    clf = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=3)
    out = clf(x, labels=torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])))
    assert clf.config.problem_type == "single_label_classification"
    out.loss.backward()
    assert clf.classifier.weight.grad is not None and clf.denoiser.conv_in.weight.grad is not None

    multi = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=3)
    targets = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    out = multi(x, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))
    assert multi.config.problem_type == "multi_label_classification"

    reg = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=1)
    out = reg(x, labels=torch.tensor([0.5, 1.0, 2.0, 3.0]))
    expected = torch.nn.functional.mse_loss(out.logits.squeeze(), torch.tensor([0.5, 1, 2, 3]))
    torch.testing.assert_close(out.loss, expected)


def test_bad_inputs_raise_clear_errors(unet, model):
    with pytest.raises(ValueError, match="Unknown layer 'up_blocks.9'"):
        DDAEForImageClassification.from_diffusers(unet, layer="up_blocks.9", num_labels=2)
    with pytest.raises(ValueError, match="out of range"):
        DDAEForImageClassification.from_diffusers(unet, layer="mid_block", timestep=1000, num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        DDAEForImageClassification.from_diffusers(unet, layer="mid_block")
    with pytest.raises(ValueError, match="id2label has 3 classes but num_labels is 5"):
        DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=5, id2label=LABELS)
    with pytest.raises(ValueError, match="a latent model without its VAE"):
        DDAEForImageClassification.from_diffusers(
            make_tiny_dit(in_channels=4, out_channels=4), layer="transformer_blocks.0", num_labels=2
        )
    with pytest.raises(ValueError, match="VAE gives 4-channel latents but the DiTTransformer2DModel takes 3"):
        DDAEForImageClassification.from_diffusers(
            DDAEBackbone(make_tiny_dit(), vae=make_tiny_vae()), layer="transformer_blocks.0", num_labels=2
        )
    # samplers noise with the DDPM betas of their config, as the backbone does
    euler = DDAEForImageClassification.from_diffusers(
        DDAEBackbone(unet, EulerDiscreteScheduler(beta_schedule="scaled_linear")), layer="mid_block", num_labels=2
    )
    assert euler.config.scheduler_config["beta_schedule"] == "scaled_linear"
    zero_snr = DDAEBackbone(unet, DDIMScheduler(rescale_betas_zero_snr=True))
    rescaled = DDAEForImageClassification.from_diffusers(zero_snr, layer="mid_block", num_labels=2)
    torch.testing.assert_close(rescaled.noise_scheduler.alphas_cumprod, zero_snr.noise_axis.noiser.alphas_cumprod)
    with pytest.raises(ValueError, match="supports DDPM and EDM noise"):
        DDAEForImageClassification.from_diffusers(
            DDAEBackbone(unet, FlowMatchEulerDiscreteScheduler()), layer="mid_block", timestep=0.05, num_labels=2
        )
    ddim = DDAEBackbone(unet, DDIMScheduler())
    ddim = DDAEForImageClassification.from_diffusers(ddim, layer="mid_block", num_labels=2)
    assert ddim.config.scheduler_config["beta_schedule"] == "linear"
    with pytest.raises(ValueError, match="feature_layer 'nope'"):
        DDAEForImageClassification(DDAEConfig(backbone_config=dict(unet.config), feature_layer="nope", num_labels=2))
    with pytest.raises(ValueError, match="noise_policy"):
        DDAEConfig(noise_policy="sometimes")
    with pytest.raises(ValueError, match="images are 32x32 but the model takes 16x16"):
        model(images(size=32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        model(torch.full((2, 3, 16, 16), 255.0))


def test_image_processor_conversions(tmp_path):
    processor = DDAEImageProcessor(size=16)
    gray = Image.fromarray(np.full((20, 24), 255, dtype=np.uint8), mode="L")
    rgba = Image.fromarray(np.zeros((16, 16, 4), dtype=np.uint8), mode="RGBA")
    chw_float = torch.full((3, 40, 40), 0.5)
    out = processor([gray, rgba, np.zeros((16, 16, 3), dtype=np.uint8), chw_float], return_tensors="pt")
    pixels = out["pixel_values"]
    assert pixels.shape == (4, 3, 16, 16) and pixels.dtype == torch.float32
    assert torch.all(pixels[0] == 1.0) and torch.all(pixels[1] == -1.0) and torch.all(pixels[2] == -1.0)
    assert torch.allclose(pixels[3], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    assert processor(gray)["pixel_values"].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(torch.full((3, 8, 8), 3.0))
    with pytest.raises(TypeError, match="PIL images"):
        processor(["not an image"])
    processor.save_pretrained(tmp_path)
    assert DDAEImageProcessor.from_pretrained(tmp_path).size == {"height": 16, "width": 16}


def test_image_classification_pipeline(model, tmp_path):
    model.save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8))
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-5
    probs = model(DDAEImageProcessor(size=16)(image)["pixel_values"]).logits.softmax(-1)[0]
    assert predictions[0]["score"] == pytest.approx(probs.max().item(), abs=1e-6)


def write_probe_folder(folder, model_dir: str, num_labels: int = 3) -> dict:
    """A probe-engine output folder in the documented format (results.json + heads.safetensors)."""
    gen = torch.Generator().manual_seed(1)
    cells, heads = [], {}
    for layer, dim in [("mid_block", 32), ("up_blocks.0.resnets.1", 32)]:
        for t, acc in [(10, 0.4), (50, 0.3)]:
            acc = acc + (0.2 if layer == "up_blocks.0.resnets.1" and t == 10 else 0.0)
            cells.append({"layer": layer, "timestep": t, "feature_dim": dim, "linear_acc": acc, "knn_acc": acc - 0.1,
                          "lr": 1e-3, "val_acc": acc})
            key = f"{layer}@{t}"
            heads[f"{key}.weight"] = torch.randn(num_labels, dim, generator=gen)
            heads[f"{key}.bias"] = torch.randn(num_labels, generator=gen)
            heads[f"{key}.mean"] = torch.randn(dim, generator=gen)
            heads[f"{key}.var"] = torch.rand(dim, generator=gen) + 0.5
    results = {
        "model": model_dir, "dataset": "uoft-cs/cifar10", "train_split": "train", "eval_split": "test",
        "image_column": "img", "label_column": "label", "resolution": 16, "seed": 0, "pooling": "avg",
        "protocol": "cached", "normalization": "standardize", "num_labels": num_labels,
        "id2label": {str(i): LABELS[i] for i in range(num_labels)}, "cells": cells,
        "best": max(cells, key=lambda c: c["val_acc"]),
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)
    save_file(heads, os.path.join(folder, "heads.safetensors"))
    return heads


def test_from_probe_reproduces_the_probe_head(tiny_unet_pipeline_dir, tmp_path):
    heads = write_probe_folder(tmp_path / "probe", tiny_unet_pipeline_dir)
    model = DDAEForImageClassification.from_probe(tmp_path / "probe")
    assert (model.config.feature_layer, model.config.timestep) == ("up_blocks.0.resnets.1", 10)
    assert model.config.id2label == LABELS and model.config.head_norm == "batchnorm"
    x = images()
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    key = "up_blocks.0.resnets.1@10"
    eval_seed = ProbeResult.load(tmp_path / "probe").eval_noise_seed  # the probe's test noise
    assert model.config.noise_seed == eval_seed != 0
    feats = backbone.features(x, ["up_blocks.0.resnets.1"], [10], seed=eval_seed)["up_blocks.0.resnets.1", 10]
    standardized = (feats - heads[f"{key}.mean"]) / torch.sqrt(heads[f"{key}.var"] + 1e-5)
    expected = standardized @ heads[f"{key}.weight"].T + heads[f"{key}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)

    chosen = DDAEForImageClassification.from_probe(tmp_path / "probe", layer="mid_block", timestep=50)
    assert (chosen.config.feature_layer, chosen.config.timestep) == ("mid_block", 50)
    torch.testing.assert_close(chosen.classifier.weight.detach(), heads["mid_block@50.weight"])
    with pytest.raises(ValueError, match="no cell for layer='mid_block', timestep=7"):
        DDAEForImageClassification.from_probe(tmp_path / "probe", layer="mid_block", timestep=7)
    with pytest.raises(ValueError, match="not a probe output folder"):
        DDAEForImageClassification.from_probe(tmp_path)

    # The card of a probe export carries the grid heatmap and the accuracy.
    model.save_pretrained(tmp_path / "export")
    readme = (tmp_path / "export" / "README.md").read_text()
    assert "probe_grid.png" in readme and (tmp_path / "export" / "probe_grid.png").is_file()
    assert "value: 0.6" in readme


def test_from_probe_end_to_end(tiny_unet_pipeline_dir, tmp_path):
    """ddae-probe output -> from_probe: the classifier reproduces the probe's test accuracy exactly."""
    import datasets
    from conftest import CIFAR10_SAMPLE

    from ddae_diffusers.probing.cli import main as probe

    results = probe([
        "--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--train_split", "train[:128]",
        "--eval_split", "test[:64]", "--layers", "mid_block", "up_blocks.0.resnets.1", "--timesteps", "10", "50",
        "--epochs", "3", "--output_dir", str(tmp_path / "probe"),
    ])  # fmt: skip
    model = DDAEForImageClassification.from_probe(tmp_path / "probe")
    best = results["best"]
    assert (model.config.feature_layer, model.config.timestep) == (best["layer"], best["timestep"])
    test = datasets.load_dataset(CIFAR10_SAMPLE, split="test[:64]")
    # One batch: positions 0..63 are the dataset indices, so the eval noise equals the probe's.
    pixel_values = DDAEImageProcessor(size=16)(test["img"])["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    accuracy = (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()
    # Equal up to argmax near-ties (float rounding differs between the cached and the end-to-end path).
    top2 = logits.topk(2, dim=-1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())
    assert abs(accuracy - best["linear_acc"]) <= near_ties / len(test) + 1e-6
    assert near_ties <= 2


def test_frozen_backbone_stays_in_eval_mode(unet):
    model = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=2)
    model.train()
    assert model.denoiser.training and model.feature_norm.training
    model.denoiser.requires_grad_(False)
    model.train()
    assert not model.denoiser.training and model.feature_norm.training and model.classifier.training


def test_latent_classifier_carries_the_vae_encoder(dit_xl_layout_dir, tmp_path):
    from safetensors import safe_open
    from test_hub_ddae import load_without_package

    layer = "transformer_blocks.0"
    backbone = DDAEBackbone.from_pretrained(dit_xl_layout_dir)
    model = DDAEForImageClassification.from_diffusers(dit_xl_layout_dir, layer=layer, timestep=10, num_labels=3)
    assert model.config.image_size == 16 and model.vae_scale == 2 and model.config.vae_config["latent_channels"] == 4
    x = images(batch=3)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    # the same features as the capture core: VAE latents, noised at t=10, pooled
    expected = backbone.features(x, [layer], [10], seed=0)[layer, 10]
    torch.testing.assert_close(out.hidden_states[0].mean(dim=1), expected, rtol=1e-5, atol=1e-5)

    # frozen VAE: gradients reach the denoiser, not the encoder
    model.train()
    model(x, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert model.denoiser.pos_embed.proj.weight.grad is not None and not model.vae.training

    model.eval().save_pretrained(tmp_path / "latent")
    with torch.no_grad():
        logits = model(x).logits  # after the step (batchnorm statistics moved)
    with safe_open(tmp_path / "latent" / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any(k.startswith("vae.encoder.") for k in keys) and not any(k.startswith("vae.decoder") for k in keys)
    card = (tmp_path / "latent" / "README.md").read_text()
    encoder_params = sum(p.numel() for p in model.vae.parameters())
    assert f"VAE encoder {encoder_params:,}" in card and "decoder dropped" in card
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "latent")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, logits, rtol=0, atol=0)
    np.save(tmp_path / "pixels.npy", x.numpy())
    remote = load_without_package(tmp_path / "latent", tmp_path / "pixels.npy", tmp_path)
    np.testing.assert_allclose(remote, logits.numpy(), rtol=1e-5, atol=1e-6)
