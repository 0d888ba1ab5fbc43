"""transformers' and diffusers' conventions, in the spirit of their common test mixins: save/load round trips,
missing keys, hidden states from the config, dtypes, optional components, image processor attributes, damaged
weights and classifiers saved by older versions."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_unet
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor
from transformers import logging as transformers_logging
from transformers.testing_utils import CaptureLogger

from ddae_diffusers import (
    DDAEBackbone,
    DDAEConfig,
    DDAEForImageClassification,
    DDAEImageProcessor,
    DDAEPipeline,
    capture_activations,
    example_noise,
)
from ddae_diffusers.image_processing_ddae import images_to_tensor

EXAMPLES = REPO_ROOT / "examples"
OLD_CLASSIFIERS = [EXAMPLES / "ddae-cifar10-cpu-linear", EXAMPLES / "ddae-cifar10-cpu-finetuned"]
# saved before the scheduler config was nested (the linear example has since been re-exported from the current grid)
OLD_FLAT_CONFIG_CLASSIFIERS = [EXAMPLES / "ddae-cifar10-cpu-finetuned"]
LAYER = "mid_block"


def images(batch: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def logits(model: DDAEForImageClassification, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


@pytest.fixture(scope="module")
def classifier() -> DDAEForImageClassification:
    return DDAEForImageClassification.from_diffusers(make_tiny_unet(), layer=LAYER, num_labels=3).eval()


@pytest.fixture
def saved(classifier, tmp_path) -> Path:
    classifier.save_pretrained(tmp_path / "clf")
    return tmp_path / "clf"


def drop_weights(folder: Path, startswith: tuple[str, ...]) -> None:
    """Rewrites ``folder/model.safetensors`` without the tensors whose names start with ``startswith``."""
    path = folder / "model.safetensors"
    kept = {k: v for k, v in load_file(path).items() if not k.startswith(startswith)}
    save_file(kept, path, metadata={"format": "pt"})


# ------------------------------------------------------------------ save / load round trips
@pytest.mark.parametrize(
    "scheduler",
    [DDIMScheduler(rescale_betas_zero_snr=True), EDMEulerScheduler(sigma_data=0.6), EDMDPMSolverMultistepScheduler()],
    ids=lambda s: type(s).__name__,
)
def test_round_trip_keeps_the_noise_schedule_and_the_logits(scheduler, tmp_path):
    backbone = DDAEBackbone(make_tiny_unet(), scheduler)
    model = DDAEForImageClassification.from_diffusers(backbone, layer=LAYER, num_labels=3)
    x = images()
    hidden = model(x, output_hidden_states=True).hidden_states[0].mean((2, 3))
    level = model.config.timestep
    features = backbone.features(x, [LAYER], [level], seed=model.config.noise_seed)[LAYER, level]
    torch.testing.assert_close(hidden, features, rtol=1e-5, atol=1e-5)  # noised as the backbone noises
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "beta_start" not in config and "sigma_data" not in config  # nested, not flattened
    assert config["scheduler_config"] == model.config.scheduler_config
    reloaded = DDAEForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.scheduler_config == model.config.scheduler_config
    assert reloaded.config.objective == model.config.objective
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=0)


def test_config_takes_a_scheduler_config_or_the_old_fields_but_not_both():
    edm = DDAEConfig(scheduler_config={"_class_name": "EDMEulerScheduler", "sigma_data": 0.6}, timestep=0.06)
    assert edm.objective == "edm" and edm.scheduler_config["sigma_data"] == 0.6
    assert isinstance(edm.noise_scheduler(), EDMEulerScheduler)
    old = DDAEConfig(objective="edm", sigma_data=0.6, beta_start=0.5, timestep=0.06)  # DDPM fields ignored
    assert old.scheduler_config == edm.scheduler_config and not hasattr(old, "sigma_data")
    assert DDAEConfig(beta_schedule="scaled_linear").scheduler_config["beta_schedule"] == "scaled_linear"
    with pytest.raises(ValueError, match="pass scheduler_config only"):
        DDAEConfig(scheduler_config={"_class_name": "DDPMScheduler"}, beta_start=1e-3)
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        DDAEConfig(scheduler_config={"_class_name": "NoSuchScheduler"})
    with pytest.raises(ValueError, match="supports DDPM and EDM noise"):
        DDAEConfig(scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"}, timestep=0.05)
    with pytest.raises(ValueError, match="out of range"):  # the level is checked against the scheduler
        DDAEConfig(scheduler_config={"_class_name": "DDPMScheduler", "num_train_timesteps": 100}, timestep=100)


# ------------------------------------------------------------------ classifiers saved by older versions
@pytest.mark.parametrize("folder", OLD_FLAT_CONFIG_CLASSIFIERS, ids=lambda p: p.name)
def test_old_saved_classifiers_load_with_identical_logits(folder):
    raw = json.loads((folder / "config.json").read_text())
    assert "scheduler_config" not in raw and raw["beta_schedule"] == "linear"  # the flattened fields
    model = DDAEForImageClassification.from_pretrained(folder).eval()
    assert model.config.scheduler_config["_class_name"] == "DDPMScheduler"
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas"):
        assert model.config.scheduler_config[key] == raw[key], key
    # the reference, by hand: the eval noise of (noise_seed, i) added by a DDPMScheduler built from the old fields,
    # the truncated denoiser's pooled feature, then the head
    old_scheduler = DDPMScheduler(**{k: raw[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                          "beta_schedule", "trained_betas")})  # fmt: skip
    x = images(4, size=raw["image_size"])
    layer, t = raw["feature_layer"], raw["timestep"]
    timesteps = torch.full((4,), t, dtype=torch.long)
    noisy = old_scheduler.add_noise(x, example_noise(x.shape[1:], range(4), raw["noise_seed"]), timesteps)
    with torch.no_grad():
        feature = capture_activations(model.denoiser, noisy, timesteps, [layer], stop_after=layer)[layer].mean((2, 3))
        expected = model.classifier(model.feature_norm(feature))
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_old_edm_config_loads_with_identical_logits(tmp_path):
    backbone = DDAEBackbone(make_tiny_unet(), EDMEulerScheduler(sigma_data=0.6))
    model = DDAEForImageClassification.from_diffusers(backbone, layer=LAYER, timestep=0.06, num_labels=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    scheduler = config.pop("scheduler_config")  # rewritten as an older version saved it
    config.update(objective="edm", sigma_min=scheduler["sigma_min"], sigma_max=scheduler["sigma_max"],
                  sigma_data=scheduler["sigma_data"], num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  beta_schedule="linear", trained_betas=None)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = DDAEForImageClassification.from_pretrained(tmp_path)
    assert old.config.objective == "edm" and old.config.scheduler_config["sigma_data"] == 0.6
    torch.testing.assert_close(logits(old, images()), logits(model, images()), rtol=0, atol=0)


# ------------------------------------------------------------------ missing keys: defined values and a warning
def load_reporting(folder: Path) -> tuple[DDAEForImageClassification, str]:
    """``from_pretrained(folder)`` and transformers' load report."""
    logger = transformers_logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        model = DDAEForImageClassification.from_pretrained(folder)
    return model.eval(), captured.out


def test_missing_conv_in_is_initialised_and_reported(saved):
    drop_weights(saved, ("denoiser.conv_in.",))
    model, report = load_reporting(saved)
    assert "denoiser.conv_in.weight" in report and "MISSING" in report
    weight, bias = model.denoiser.conv_in.weight, model.denoiser.conv_in.bias
    bound = 1 / (weight[0].numel() ** 0.5)  # reset_parameters: uniform within 1/sqrt(fan_in)
    assert weight.abs().max() <= bound and bias.abs().max() <= bound and weight.std() > bound / 4
    assert torch.isfinite(logits(model, images())).all()


def test_missing_batchnorm_statistics_start_at_zero_mean_unit_variance(classifier, saved):
    drop_weights(saved, ("feature_norm.",))
    model, report = load_reporting(saved)
    assert "feature_norm.running_var" in report
    assert torch.equal(model.feature_norm.running_mean, torch.zeros_like(model.feature_norm.running_mean))
    assert torch.equal(model.feature_norm.running_var, torch.ones_like(model.feature_norm.running_var))
    assert model.feature_norm.num_batches_tracked.item() == 0
    kept = {k: v for k, v in classifier.state_dict().items() if not k.startswith("feature_norm.")}
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in kept.items())  # what was saved is untouched
    assert torch.isfinite(logits(model, images())).all()


def test_a_checkpoint_with_only_the_head_gives_finite_logits(saved):
    drop_weights(saved, ("denoiser.", "feature_norm."))
    model, report = load_reporting(saved)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert [name for name, tensor in tensors.items() if not torch.isfinite(tensor.float()).all()] == []
    assert torch.isfinite(logits(model, images())).all()


# ------------------------------------------------------------------ hidden states from the config
def test_output_hidden_states_follows_the_config_and_the_keyword_overrides_it(classifier, saved):
    x = images()
    assert classifier(x).hidden_states is None
    model = DDAEForImageClassification.from_pretrained(saved, output_hidden_states=True).eval()
    with torch.no_grad():
        out = model(x)
        assert out.hidden_states is not None and out.hidden_states[0].shape == (3, 32, 8, 8)
        assert model(x, output_hidden_states=False).hidden_states is None
        model.config.return_dict = False
        assert len(model(x)) == 2  # (logits, hidden_states)
        assert classifier(x, output_hidden_states=True).hidden_states is not None


# ------------------------------------------------------------------ dtypes and devices
def test_every_loading_path_takes_dtype_and_torch_dtype(tiny_unet_pipeline_dir, saved, tmp_path):
    from test_modeling_ddae import write_probe_folder

    write_probe_folder(tmp_path / "probe", tiny_unet_pipeline_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch_dtype is accepted without a deprecation warning
        for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": torch.bfloat16}):
            assert DDAEForImageClassification.from_pretrained(saved, **kwargs).dtype == torch.bfloat16
            for source in (tiny_unet_pipeline_dir, make_tiny_unet()):
                model = DDAEForImageClassification.from_diffusers(source, layer=LAYER, num_labels=2, **kwargs)
                assert model.dtype == torch.bfloat16
            assert DDAEForImageClassification.from_probe(tmp_path / "probe", **kwargs).dtype == torch.bfloat16
            for source in (saved, tmp_path / "probe"):
                pipe = DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir, classifier=str(source), **kwargs)
                assert pipe.unet.dtype == pipe.classifier.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pass only dtype"):
        DDAEForImageClassification.from_pretrained(saved, dtype=torch.bfloat16, torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        DDAEForImageClassification.from_diffusers(make_tiny_unet(), layer=LAYER, num_labels=2, dtype="bf16")


def test_bfloat16_move_and_load_agree_with_float32(classifier, saved):
    x = images()
    reference = logits(classifier, x)
    moved = DDAEForImageClassification.from_pretrained(saved).to(torch.bfloat16)
    loaded = DDAEForImageClassification.from_pretrained(saved, dtype=torch.bfloat16)
    assert moved.dtype == loaded.dtype == torch.bfloat16
    assert moved.noise_scheduler.alphas_cumprod.dtype == torch.float32  # the noise stays float32
    torch.testing.assert_close(logits(loaded, x), logits(moved, x), rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded, x).float(), reference, rtol=0.05, atol=0.05)
    drop_weights(saved, ("denoiser.conv_in.",))  # a missing key in bfloat16 is initialised too
    half = DDAEForImageClassification.from_pretrained(saved, dtype=torch.bfloat16)
    weight = half.denoiser.conv_in.weight.float()
    bound = 1 / (weight[0].numel() ** 0.5)  # reset_parameters: uniform within 1/sqrt(fan_in)
    assert half.denoiser.conv_in.weight.dtype == torch.bfloat16 and weight.abs().max() <= bound * 1.01
    assert weight.std() > bound / 4 and torch.isfinite(logits(half, x)).all()


# ------------------------------------------------------------------ optional components
def test_pipeline_without_scheduler_uses_the_ddpm_default(tiny_unet_pipeline_dir):
    reference = DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir)
    x = images()
    expected = reference.extract_features(x, [LAYER], [10])[LAYER, 10]
    pipe = DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir)
    pipe.scheduler = None
    assert pipe.scheduler is None
    torch.testing.assert_close(pipe.extract_features(x, [LAYER], [10])[LAYER, 10], expected, rtol=0, atol=0)
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    default = DDAEPipeline(unet=pipe.unet, scheduler=DDPMScheduler())
    expected_images = default(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt")
    torch.testing.assert_close(out, expected_images.images, rtol=0, atol=0)


def test_text_conditioned_pipeline_without_scheduler_names_the_fix():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"no default matches a text-conditioned model: pass its own, scheduler="):
        DDAEPipeline(unet=unet)
    pipe = DDAEPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear"))
    pipe.scheduler = None
    with pytest.raises(ValueError, match="set pipe.scheduler"):
        pipe.extract_features(torch.zeros(1, 3, 64, 64), [LAYER], [10])


# ------------------------------------------------------------------ image processor
def test_processor_size_is_a_dict_with_mean_and_std(tmp_path):
    processor = DDAEImageProcessor(size=16)
    assert processor.size == {"height": 16, "width": 16}
    assert processor.image_mean == processor.image_std == [0.5, 0.5, 0.5]
    # transformers' image-classification recipe
    size = (
        processor.size["shortest_edge"]
        if "shortest_edge" in processor.size
        else (processor.size["height"], processor.size["width"])
    )
    assert size == (16, 16)
    shortest = DDAEImageProcessor(size={"shortest_edge": 16})
    assert shortest.size == {"shortest_edge": 16} and "shortest_edge" in shortest.size
    image = Image.fromarray((np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8))
    expected = images_to_tensor([image], 16)  # the pixel values are those of before
    for p in (processor, shortest, DDAEImageProcessor(size={"height": 16, "width": 16})):
        assert torch.equal(p(image)["pixel_values"], expected)
    assert torch.equal(DDAEImageProcessor()(image, size=16)["pixel_values"], expected)
    # (x / 255 - mean) / std, as the recipe's Normalize(image_mean, image_std) computes it
    crop = np.array(image.resize((22, 16), Image.BILINEAR).crop((3, 0, 19, 16)))
    normalized = (torch.from_numpy(crop).permute(2, 0, 1) / 255 - processor.image_mean[0]) / processor.image_std[0]
    torch.testing.assert_close(expected[0], normalized.float(), rtol=0, atol=1e-6)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 16, "width": 16} and saved["image_mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="not square"):
        DDAEImageProcessor(size={"height": 16, "width": 32})
    with pytest.raises(ValueError, match="image_mean=0.5"):
        DDAEImageProcessor(image_mean=[0.485, 0.456, 0.406])


@pytest.mark.parametrize("folder", OLD_CLASSIFIERS, ids=lambda p: p.name)
def test_old_int_size_processors_load(folder):
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == 32  # an old int size
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, DDAEImageProcessor)
    assert processor.size == {"height": 32, "width": 32} and processor.image_mean == [0.5, 0.5, 0.5]
    image = Image.fromarray((np.random.default_rng(1).random((40, 36, 3)) * 255).astype(np.uint8))
    assert torch.equal(processor(image)["pixel_values"], images_to_tensor([image], 32))


# ------------------------------------------------------------------ damaged weights: one line naming the file
def empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("fault", [empty, truncate_half])
def test_damaged_weights_are_one_line_naming_the_file(fault, saved, tiny_unet_pipeline_dir, tmp_path):
    fault(saved / "model.safetensors")
    expected = f"Cannot load the classifier '{saved}': {saved / 'model.safetensors'} is truncated or corrupt"
    with pytest.raises(ValueError, match="save or download it again") as error:
        DDAEForImageClassification.from_pretrained(saved)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="is truncated or corrupt"):
        DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir, classifier=str(saved))
