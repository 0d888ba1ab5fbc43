"""training/finetune.py: Trainer runs (frozen, full, LoRA) on real CIFAR-10 images with a tiny UNet."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import CIFAR10_SAMPLE, REPO_ROOT
from peft import PeftModel
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from transformers import AutoModelForImageClassification

from ddae_diffusers import DDAEForImageClassification, DDAEImageProcessor

LAYER = "up_blocks.0.resnets.1"


def load_finetune():
    spec = importlib.util.spec_from_file_location("ddae_finetune_script", REPO_ROOT / "training" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through sys.modules
    spec.loader.exec_module(module)
    return module


finetune = load_finetune()


def run(base: str, output_dir, *extra: str, train="train[:128]", eval_split="test[:64]") -> dict:
    return finetune.main([
        "--model_name_or_path", base, "--dataset_name", CIFAR10_SAMPLE, "--train_split", train,
        "--eval_split", eval_split, "--output_dir", str(output_dir), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--learning_rate", "1e-3",
        "--save_strategy", "no", "--use_cpu", "--seed", "0", "--disable_tqdm", "true", *extra,
    ])  # fmt: skip


def eval_accuracy(folder, cifar_eval) -> float:
    """Accuracy of a saved classifier on the eval images, computed outside the Trainer."""
    model = AutoModelForImageClassification.from_pretrained(folder)
    pixel_values = DDAEImageProcessor.from_pretrained(folder)(cifar_eval["img"])["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values).logits.argmax(-1).numpy()
    return accuracy_score(cifar_eval["label"], predictions)


@pytest.fixture(scope="module")
def cifar_eval():
    import datasets

    return datasets.load_dataset(CIFAR10_SAMPLE, split="test[:64]")


def test_accuracy_fallback_agrees_with_evaluate(tmp_path):
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    # The Hub metric is unreachable offline: the loader falls back to the local computation.
    fallback, source = finetune.load_accuracy("accuracy")
    assert source == "local"
    # evaluate itself, on a local metric script (one import per line, as evaluate's import scanner needs).
    script = tmp_path / "accuracy" / "accuracy.py"
    script.parent.mkdir()
    script.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class Accuracy(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='accuracy', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('int32'),\n"
        "                                        'references': datasets.Value('int32')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'accuracy': sum(int(p == r) for p, r in zip(predictions, references)) / len(references)}\n"
    )
    with_evaluate, source = finetune.load_accuracy(str(script))
    assert source == "evaluate"
    expected = accuracy_score(references, predictions)
    assert fallback(predictions, references) == pytest.approx(expected)
    assert with_evaluate(predictions, references) == pytest.approx(expected)


def test_linear_probe_through_trainer(tiny_unet_pipeline_dir, tmp_path, cifar_eval):
    source = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=10)
    metrics = run(tiny_unet_pipeline_dir, tmp_path, "--layer", LAYER, "--freeze_backbone")
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["train_loss"])
    trained = DDAEForImageClassification.from_pretrained(tmp_path)
    # Frozen backbone: identical weights; the head and the BatchNorm statistics moved.
    before, after = source.denoiser.state_dict(), trained.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(source.classifier.weight, trained.classifier.weight)
    assert trained.feature_norm.num_batches_tracked.item() == 4
    assert trained.config.id2label[0] == "airplane" and trained.config.num_labels == 10
    # The reported accuracy is that of the saved model.
    assert eval_accuracy(tmp_path, cifar_eval) == pytest.approx(metrics["eval_accuracy"])
    card = (tmp_path / "README.md").read_text()
    assert "frozen backbone" in card and f"value: {metrics['eval_accuracy']}" in card
    assert "lr 0.001 (linear, 0 warm-up steps), weight decay 0, batch 32, fp32, seed 0 |" in card
    assert f"| training time | {metrics['train_runtime']:.1f} s |" in card


def test_full_finetune_updates_backbone(tiny_unet_pipeline_dir, tmp_path):
    source = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=10)
    run(tiny_unet_pipeline_dir, tmp_path, "--layer", LAYER, "--eval_split", "", train="train[:32]")
    trained = DDAEForImageClassification.from_pretrained(tmp_path)
    assert not torch.equal(source.denoiser.conv_in.weight, trained.denoiser.conv_in.weight)


def largest_change(before: torch.nn.Module, after: torch.nn.Module) -> float:
    return max((a - b).abs().max().item() for a, b in zip(after.parameters(), before.parameters(), strict=True))


def test_backbone_learns_at_its_lr_ratio(tiny_unet_pipeline_dir, tmp_path):
    source = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=10)
    metrics = run(tiny_unet_pipeline_dir, tmp_path, "--layer", LAYER, "--eval_split", "", "--backbone_lr_ratio",
                  "0.001", train="train[:64]")
    trained = DDAEForImageClassification.from_pretrained(tmp_path)
    backbone_change = largest_change(source.denoiser, trained.denoiser)
    head_change = largest_change(source.classifier, trained.classifier)
    # Adam moves each weight by about lr per step: 2 steps at 1e-3 for the head, at 1e-6 for the backbone
    assert 0 < backbone_change < 1e-5 < 1e-4 < head_change, (backbone_change, head_change)
    assert metrics["epoch"] == 1
    assert "backbone lr x0.001" in (tmp_path / "README.md").read_text()


def test_head_warmup_keeps_the_backbone_frozen_then_trains_it(tiny_unet_pipeline_dir, tmp_path):
    source = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=10)
    for epochs, out in (("1", tmp_path / "frozen"), ("0.5", tmp_path / "half")):
        run(tiny_unet_pipeline_dir, out, "--layer", LAYER, "--eval_split", "", "--head_warmup_epochs", epochs,
            "--per_device_train_batch_size", "16", train="train[:64]")
    frozen, half = (DDAEForImageClassification.from_pretrained(tmp_path / name) for name in ("frozen", "half"))
    assert largest_change(source.denoiser, frozen.denoiser) == 0 < largest_change(source.classifier, frozen.classifier)
    assert largest_change(source.denoiser, half.denoiser) > 0  # trained after the first half epoch
    assert "head alone for the first 1 epochs" in (tmp_path / "frozen" / "README.md").read_text()


def test_lora_adapters_save_reload_and_merge(tiny_unet_pipeline_dir, tmp_path, cifar_eval):
    metrics = run(tiny_unet_pipeline_dir, tmp_path, "--layer", LAYER, "--lora_r", "4", "--lora_alpha", "8",
                  train="train[:64]")
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["modules_to_save"]) == {"classifier", "feature_norm"}
    # Adapters only on the kept (truncated) backbone.
    adapter_keys = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter_keys)
    assert not any("up_blocks.1" in k for k in adapter_keys)
    assert not any("group_norm" in k for k in adapter_keys)  # only the head's own norm is fully trained

    base = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=10)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForImageClassification.from_pretrained(tmp_path)
    pixel_values = DDAEImageProcessor(size=16)(cifar_eval["img"][:16])["pixel_values"]
    with torch.no_grad():
        adapter_logits = reloaded(pixel_values=pixel_values).logits
        merged_logits = merged(pixel_values).logits
        remerged_logits = reloaded.merge_and_unload()(pixel_values).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remerged_logits, merged_logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert eval_accuracy(tmp_path, cifar_eval) == pytest.approx(metrics["eval_accuracy"])


def test_bad_arguments_fail_before_training(tiny_unet_pipeline_dir, tmp_path, cifar_small):
    three_classes = DDAEForImageClassification.from_diffusers(tiny_unet_pipeline_dir, layer=LAYER, num_labels=3)
    three_classes.save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match="3 classes but the data set has 10"):
        run(str(tmp_path / "three"), tmp_path / "out1")
    with pytest.raises(ValueError, match="--layer is required"):
        run(tiny_unet_pipeline_dir, tmp_path / "out2")
    with pytest.raises(ValueError, match="--resolution 32 does not match"):
        run(tiny_unet_pipeline_dir, tmp_path / "out3", "--layer", LAYER, "--resolution", "32")
    with pytest.raises(ValueError, match="Unknown layer"):
        run(tiny_unet_pipeline_dir, tmp_path / "out4", "--layer", "up_blocks.7")
    with pytest.raises(ValueError, match="exclusive"):
        run(tiny_unet_pipeline_dir, tmp_path / "out5", "--layer", LAYER, "--lora_r", "4", "--freeze_backbone")
    with pytest.raises(ValueError, match="--backbone_lr_ratio must be > 0"):
        run(tiny_unet_pipeline_dir, tmp_path / "out7", "--layer", LAYER, "--backbone_lr_ratio", "0")
    with pytest.raises(ValueError, match="drop --backbone_lr_ratio"):
        run(tiny_unet_pipeline_dir, tmp_path / "out8", "--layer", LAYER, "--freeze_backbone",
            "--head_warmup_epochs", "1")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    cifar_small.select(range(8)).remove_columns("label").to_parquet(str(unlabeled / "train.parquet"))
    with pytest.raises(ValueError, match="no label column"):
        finetune.main(["--model_name_or_path", tiny_unet_pipeline_dir, "--layer", LAYER, "--dataset_name",
                       str(unlabeled), "--eval_split", "", "--output_dir", str(tmp_path / "out6"), "--use_cpu"])
    assert not any(os.scandir(tmp_path / "out1"))


@pytest.mark.slow
def test_two_process_lora_run(tiny_unet_pipeline_dir, tmp_path, cifar_eval):
    """accelerate launch with 2 CPU processes (gloo): the loss is not rescaled by the process count."""
    import subprocess

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", str(REPO_ROOT / "training" / "finetune.py"),
        "--model_name_or_path", tiny_unet_pipeline_dir, "--layer", LAYER, "--dataset_name", CIFAR10_SAMPLE,
        "--train_split", "train[:128]", "--eval_split", "test[:64]", "--output_dir", str(tmp_path),
        "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--save_strategy", "no",
        "--lora_r", "4", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "all_results.json").read_text())
    # A random tiny backbone: about log(10) = 2.30; the 2x-rescaling bug gave 4.6.
    assert 1.5 < metrics["train_loss"] < 3.0 and 1.5 < metrics["eval_loss"] < 3.0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert eval_accuracy(tmp_path, cifar_eval) == pytest.approx(metrics["eval_accuracy"])


def test_default_lora_targets_on_dit():
    from conftest import make_tiny_dit

    model = DDAEForImageClassification.from_diffusers(make_tiny_dit(), layer="transformer_blocks.0", num_labels=3)
    peft_model = finetune.add_lora(model, finetune.ModelArguments(model_name_or_path="-", lora_r=2))
    lora_modules = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all("transformer_blocks.0." in name for name in lora_modules)
    out = peft_model(pixel_values=torch.rand(2, 3, 8, 8) * 2 - 1, labels=torch.tensor([0, 2]))
    out.loss.backward()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_B" in name for name in trainable) and any("classifier" in name for name in trainable)
    head_or_lora = ("lora_", "classifier", "feature_norm")
    assert all(any(part in name for part in head_or_lora) for name in trainable)


def test_finetune_from_probe_folder(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.probing.cli import main as probe

    results = probe([
        "--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--train_split", "train[:64]",
        "--eval_split", "test[:32]", "--layers", "mid_block", LAYER, "--timesteps", "10", "--epochs", "2",
        "--output_dir", str(tmp_path / "probe"),
    ])  # fmt: skip
    run(str(tmp_path / "probe"), tmp_path / "run", "--freeze_backbone", train="train[:32]", eval_split="test[:32]")
    trained = DDAEForImageClassification.from_pretrained(tmp_path / "run")
    assert trained.config.feature_layer == results["best"]["layer"]
    assert trained.config.head_norm == "batchnorm"  # the probe's standardisation
    card = (tmp_path / "run" / "README.md").read_text()
    assert "## Probe grid" in card and (tmp_path / "run" / "probe_grid.png").is_file()


def test_latent_finetune_keeps_the_vae_frozen_unless_asked(dit_xl_layout_dir, tiny_unet_pipeline_dir, tmp_path):
    layer = "transformer_blocks.1"
    source = DDAEForImageClassification.from_diffusers(dit_xl_layout_dir, layer=layer, num_labels=10)
    run(dit_xl_layout_dir, tmp_path / "frozen", "--layer", layer, "--eval_split", "", train="train[:32]")
    frozen = DDAEForImageClassification.from_pretrained(tmp_path / "frozen")
    assert frozen.config.freeze_vae and not any(p.requires_grad for p in frozen.vae.parameters())
    torch.testing.assert_close(frozen.vae.state_dict(), source.vae.state_dict(), rtol=0, atol=0)
    assert not torch.equal(frozen.denoiser.pos_embed.proj.weight, source.denoiser.pos_embed.proj.weight)

    run(dit_xl_layout_dir, tmp_path / "vae", "--layer", layer, "--train_vae", "--eval_split", "", train="train[:32]")
    trained = DDAEForImageClassification.from_pretrained(tmp_path / "vae")
    assert not trained.config.freeze_vae
    assert not torch.equal(trained.vae.encoder.conv_in.weight, source.vae.encoder.conv_in.weight)
    with pytest.raises(ValueError, match="--train_vae needs a latent model"):
        run(tiny_unet_pipeline_dir, tmp_path / "pixel", "--layer", "mid_block", "--train_vae")


def test_lora_on_a_latent_model_adapts_the_denoiser_only(dit_xl_layout_dir):
    model = DDAEForImageClassification.from_diffusers(dit_xl_layout_dir, layer="transformer_blocks.1", num_labels=3)
    peft_model = finetune.add_lora(model, finetune.ModelArguments(model_name_or_path="-", lora_r=2))
    lora_modules = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert lora_modules and all(".denoiser.transformer_blocks." in name for name in lora_modules)
    assert not any(p.requires_grad for p in model.vae.parameters())
