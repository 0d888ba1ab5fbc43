"""Noise-conditional classification and guidance by the model's own head: real tiny diffusers models, real training."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import CIFAR10_SAMPLE, REPO_ROOT, make_tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler
from transformers import AutoModelForImageClassification, pipeline

from ddae_diffusers import DDAEBackbone, DDAEForImageClassification, DDAEPipeline
from ddae_diffusers.errors import UsageError
from ddae_diffusers.noise_conditional import (
    accuracy_by_level,
    noise_conditional_classifier,
    train_noise_conditional_head,
)

LAYER = "down_blocks.1.resnets.0"


def bright_dark(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 3, 16, 16) images in [-1, 1]: class 1 bright, class 0 dark, with texture; (count,) labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    level = torch.where(labels == 1, 0.6, -0.6).view(-1, 1, 1, 1)
    images = (level + 0.3 * torch.randn(count, 3, 16, 16, generator=generator)).clamp(-1, 1)
    return images, labels


@pytest.fixture(scope="module")
def trained() -> DDAEForImageClassification:
    """A noise-conditional head on a tiny random UNet, trained to tell bright from dark images."""
    model = noise_conditional_classifier(
        DDAEBackbone(make_tiny_unet(), DDPMScheduler()), LAYER, id2label={0: "dark", 1: "bright"}, head_hidden_dim=32
    )
    images, labels = bright_dark(128)
    fit = train_noise_conditional_head(model, images, labels, levels_per_image=8, epochs=15, learning_rate=3e-3)
    assert fit.rows == 1024 and fit.final_loss == fit.final_loss  # finite
    return model


def test_the_head_classifies_low_noise_well_and_pure_noise_at_chance(trained):
    images, labels = bright_dark(64, seed=1)
    rows = accuracy_by_level(trained, images, labels, levels=[0, 300, 999])
    accuracy = {row["level"]: row["accuracy"] for row in rows}
    assert accuracy[0] >= 0.95
    assert accuracy[999] <= 0.75 < accuracy[0]
    assert all(row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] for row in rows)


def test_one_level_per_image_equals_one_call_per_level(trained):
    images, _ = bright_dark(4)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    levels = torch.tensor([0, 10, 400, 900])
    together = trained(images, noise=noise, timestep=levels).logits
    apart = torch.cat(
        [trained(images[i : i + 1], noise=noise[i : i + 1], timestep=int(t)).logits for i, t in enumerate(levels)]
    )
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0], trained(images[:1], noise=noise[:1], timestep=900).logits[0])


def test_logits_of_a_noisy_sample_equal_the_forward_that_noised_it(trained):
    images, _ = bright_dark(3)
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    noisy = DDPMScheduler().add_noise(images, noise, torch.full((3,), 250))
    torch.testing.assert_close(
        trained.logits_of_noisy(noisy, 250), trained(images, noise=noise, timestep=250).logits, rtol=1e-4, atol=1e-5
    )


def test_edm_levels_are_sigmas_and_noisy_samples_are_preconditioned():
    model = noise_conditional_classifier(DDAEBackbone(make_tiny_unet(), EDMEulerScheduler()), LAYER, num_labels=3)
    images, _ = bright_dark(2)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        model.logits_of_noisy(images + 2.0 * noise, 2.0), model(images, noise=noise, timestep=2.0).logits
    )
    with pytest.raises(UsageError, match="is an integer, but this is an EDM model"):
        model(images, timestep=10)


@pytest.mark.parametrize(
    ("timestep", "message"),
    [(1000, "out of range"), (0.5, "is a float"), (torch.tensor([1, 2, 3]), "shape \\(3,\\) for 2 images")],
)
def test_bad_levels_are_one_line_errors(trained, timestep, message):
    with pytest.raises(UsageError, match=message):
        trained(bright_dark(2)[0], timestep=timestep)


def test_saved_head_loads_through_auto_classes_and_the_pipeline(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.head_type == "noise_conditional" and loaded.noise_conditioning is not None
    images, _ = bright_dark(2)
    for level in (None, 500):
        torch.testing.assert_close(loaded(images, timestep=level).logits, trained(images, timestep=level).logits)
    card = (tmp_path / "README.md").read_text()
    assert "noise-conditional MLP" in card and "a head told the noise level" in card
    bright = ((torch.ones(16, 16, 3) * 230).byte().numpy())
    prediction = pipeline("image-classification", model=str(tmp_path))(bright)
    assert prediction[0]["label"] == "bright"


@pytest.fixture(scope="module")
def guided_pipe(trained) -> DDAEPipeline:
    # no clipping of the predicted image: the tiny random UNet's predictions would be clipped to the range's ends
    pipe = DDAEPipeline(unet=trained_unet(trained), scheduler=DDIMScheduler(clip_sample=False), classifier=trained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_unet(model: DDAEForImageClassification):
    """The full tiny UNet the classifier was truncated from (same seed, so the same weights)."""
    unet = make_tiny_unet()
    state = model.denoiser.state_dict()
    assert all(torch.equal(value, unet.state_dict()[key]) for key, value in state.items())
    return unet


def test_guidance_scale_zero_is_unguided_sampling(guided_pipe):
    def sample(**kwargs):
        return guided_pipe(num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt", **kwargs).images

    torch.testing.assert_close(sample(batch_size=4), sample(class_labels=1, batch_size=4, guidance_scale=0.0))


def test_guidance_moves_samples_toward_the_requested_class(guided_pipe, trained):
    def sample(label):
        return guided_pipe(
            class_labels=[label] * 8, guidance_scale=100.0, num_inference_steps=10, generator=torch.manual_seed(0),
            output_type="pt",
        ).images  # fmt: skip

    bright, dark = sample("bright"), sample(0)
    assert bright.mean() > dark.mean() + 0.05
    probability = trained(bright * 2 - 1, timestep=0).logits.softmax(-1)[:, 1].mean()
    assert probability > trained(dark * 2 - 1, timestep=0).logits.softmax(-1)[:, 1].mean()


def test_guided_edm_sampling_runs_and_differs_from_unguided():
    model = noise_conditional_classifier(DDAEBackbone(make_tiny_unet(), EDMEulerScheduler()), LAYER, num_labels=2)
    pipe = DDAEPipeline(unet=make_tiny_unet(), scheduler=EDMEulerScheduler(), classifier=model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    plain = pipe(generator=torch.manual_seed(0), **kwargs).images
    guided = pipe(generator=torch.manual_seed(0), class_labels=1, guidance_scale=5.0, **kwargs).images
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)


def linear_classifier():
    backbone = DDAEBackbone(make_tiny_unet(), DDPMScheduler())
    return DDAEForImageClassification.from_diffusers(backbone, LAYER, num_labels=2)


@pytest.mark.parametrize(
    ("change", "call", "message"),
    [
        ({"classifier": None}, {"class_labels": 1}, "needs a noise-conditional DDAE classifier, got NoneType"),
        ({"classifier": "linear"}, {"class_labels": 1}, "got a linear-head classifier"),
        ({}, {"class_labels": 2}, r"class label 2 is not a class of the classifier: use ids 0..1"),
        ({}, {"class_labels": "cat"}, "class label 'cat' is not a class"),
        ({}, {"class_labels": [0, 1, 1], "batch_size": 2}, "Got 3 class_labels for batch_size 2"),
        ({}, {"class_labels": 1, "guidance_scale": -1.0}, "finite number >= 0"),
        ({}, {"guidance_scale": 3.0}, "guidance_scale needs class_labels"),
        ({"scheduler": DDIMScheduler(beta_schedule="squaredcos_cap_v2")}, {"class_labels": 1}, "schedule differs"),
        ({"scheduler": EulerDiscreteScheduler()}, {"class_labels": 1}, "swap in DDIMScheduler"),
        ({"scheduler": EDMEulerScheduler()}, {"class_labels": 1}, "trained on DDPM noise but the scheduler samples"),
    ],
)
def test_bad_guidance_is_a_one_line_error_before_sampling(guided_pipe, trained, change, call, message):
    classifier = change.get("classifier", trained)
    pipe = DDAEPipeline(
        unet=guided_pipe.unet,
        scheduler=change.get("scheduler", DDIMScheduler()),
        classifier=linear_classifier() if classifier == "linear" else classifier,
    )
    calls = []
    pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(UsageError, match=message):
        pipe(num_inference_steps=3, **call)
    assert calls == []


def load_script():
    spec = importlib.util.spec_from_file_location(
        "train_noise_conditional", REPO_ROOT / "training" / "train_noise_conditional.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_script_writes_the_table_plot_and_model(tmp_path):
    script = load_script()
    folder = tmp_path / "ddpm"
    DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    out = tmp_path / "out"
    result = script.main([
        "--model_name_or_path", str(folder), "--layer", LAYER, "--dataset_name", CIFAR10_SAMPLE,
        "--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "2", "--eval_levels", "0", "500",
        "--with_random_init", "--output_dir", str(out),
    ])  # fmt: skip
    assert json.loads((out / "accuracy_by_level.json").read_text()) == json.loads(json.dumps(result))
    assert [row["level"] for row in result["curves"]["DDAE"]["levels"]] == [0, 500]
    assert set(result["curves"]) == {"DDAE", "random init"} and len(result["paired_tests"]) == 2
    assert "| t | sigma (VE) | DDAE | random init |" in (out / "accuracy_by_level.md").read_text()
    assert (out / "accuracy_by_level.png").stat().st_size > 0
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_labels == 10 and model.config.training_summary["accuracy_by_level"].keys() == {"0", "500"}


def test_training_script_refuses_a_bad_layer_before_loading_data(tmp_path, monkeypatch):
    script = load_script()
    folder = tmp_path / "ddpm"
    DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    monkeypatch.setattr(script, "load_split", lambda *args: pytest.fail("the data were loaded"))
    with pytest.raises(UsageError, match="nope"):
        script.main(["--model_name_or_path", str(folder), "--layer", "nope", "--dataset_name", CIFAR10_SAMPLE,
                     "--output_dir", str(tmp_path / "x")])  # fmt: skip
