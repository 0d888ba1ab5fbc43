"""EDM models end to end on tiny real UNets: preconditioning, training loss, one noise axis, features,
classifier and pipeline round trips, sampling, and clear errors for levels in the wrong units."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import CIFAR10_SAMPLE, make_tiny_unet
from ddae_diffusers.pipelines import DDAEPipeline
from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from ddae_diffusers import DDAEBackbone, DDAEForImageClassification
from ddae_diffusers.noise import DDPMNoise, EDMNoise, noise_axis, noise_level
from ddae_diffusers.pretraining.training_step import edm_loss, train_step
from ddae_diffusers.probing.cli import main as probe_main

SIGMA_DATA = 0.5
LAYER = "up_blocks.0.resnets.1"


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def edm_pipeline_dir(tmp_path) -> str:
    folder = tmp_path / "edm"
    DDAEPipeline(unet=make_tiny_unet(), scheduler=EDMEulerScheduler()).save_pretrained(folder)
    return str(folder)


def test_preconditioning_and_loss_follow_the_edm_formulas():
    """c_in, c_noise, c_skip, c_out and the loss weight of Karras et al. (2022), sigma_data 0.5."""
    unet, axis = make_tiny_unet(), EDMNoise(EDMEulerScheduler())
    x, n = images(), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.002, 0.06, 1.0, 80.0])
    s = sigmas.view(-1, 1, 1, 1)
    total = s**2 + SIGMA_DATA**2
    noisy = x + s * n
    inputs, c_noise = axis.precondition(noisy, sigmas)
    torch.testing.assert_close(inputs, noisy / total.sqrt())
    torch.testing.assert_close(c_noise, sigmas.log() / 4)
    with torch.no_grad():
        raw = unet(noisy / total.sqrt(), sigmas.log() / 4).sample
        denoised = SIGMA_DATA**2 / total * noisy + s * SIGMA_DATA / total.sqrt() * raw
        expected = ((total / (s * SIGMA_DATA) ** 2) * (denoised - x) ** 2).mean()
        torch.testing.assert_close(edm_loss(unet, axis, x, n, sigmas, {}), expected)
    # the features' input is the same c_in (x + sigma eps) and c_noise
    got, t = axis.network_inputs(x, n, 0.06)
    torch.testing.assert_close(got, (x + 0.06 * n) / math.sqrt(0.06**2 + SIGMA_DATA**2))
    torch.testing.assert_close(t, torch.full((4,), math.log(0.06) / 4))


def test_training_sigmas_are_log_normal():
    torch.manual_seed(0)
    log_sigma = EDMNoise(EDMEulerScheduler()).draw_training_levels(200_000, torch.device("cpu")).log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.01 and abs(log_sigma.std().item() - 1.2) < 0.01


def test_one_noise_axis():
    """DDPM levels get their VE sigma from alphas_cumprod; EDM schedule indices match the rho-schedule formula."""
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha = np.cumprod(1 - betas)
    ddpm = DDPMNoise(DDPMScheduler())
    for t in (0, 10, 400):
        assert ddpm.ve_sigma(t) == pytest.approx(math.sqrt((1 - alpha[t]) / alpha[t]), rel=1e-4)
        assert ddpm.log_snr(t) == pytest.approx(math.log(alpha[t] / (1 - alpha[t])), rel=1e-4)
    assert ddpm.ve_sigma(10) == pytest.approx(0.0469, abs=5e-4)  # the "about 0.047"

    edm = EDMNoise(EDMEulerScheduler())
    ramp = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)][::-1]
    for index in (1, 3, 4, 5, 18):
        assert edm.sigma_at_index(index) == pytest.approx(ramp[index - 1], rel=1e-3)
    assert [round(edm.sigma_at_index(i), 3) for i in (3, 4, 5)] == [0.023, 0.06, 0.14]
    assert edm.ve_sigma(0.06) == 0.06 and edm.log_snr(0.06) == pytest.approx(-2 * math.log(0.06))
    assert edm.default_probe_level() == edm.sigma_at_index(4)
    assert isinstance(noise_axis(EDMDPMSolverMultistepScheduler()), EDMNoise)
    assert noise_level("10") == 10 and noise_level("0.06") == 0.06 and noise_level("1.0") == 1.0


def test_edm_model_overfits_a_fixed_batch():
    """The training step with an EDM scheduler drives the weighted loss on one fixed batch and noise down."""
    accelerator = Accelerator(cpu=True)
    model = make_tiny_unet().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    batch, scheduler, losses = images(8), EDMEulerScheduler(), []
    for _ in range(40):
        generator = torch.Generator().manual_seed(0)  # same noise and sigmas every step
        losses.append(train_step(accelerator, model, optimizer, lr_scheduler, scheduler, batch, generator).item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_edm_features_are_deterministic_and_batch_independent():
    backbone = DDAEBackbone(make_tiny_unet(), EDMEulerScheduler())
    assert backbone.objective == "edm"
    x, layers = images(6), ["mid_block", LAYER]
    whole = backbone.features(x, layers, [0.02, 0.5], seed=3)
    again = backbone.features(x, layers, [0.02, 0.5], seed=3)
    halves = [backbone.features(x[i : i + 3], layers, [0.02, 0.5], seed=3, example_ids=range(i, i + 3))
              for i in (0, 3)]
    for key, value in whole.items():
        assert value.shape == (6, backbone.layer_info(key[0]).feature_dim)
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), value)
    other_noise = backbone.features(x, layers, [0.5], seed=4)
    assert not torch.allclose(other_noise[LAYER, 0.5], whole[LAYER, 0.5])
    # a different sigma is a different input: features change
    assert not torch.allclose(whole[LAYER, 0.02], whole[LAYER, 0.5])


def test_round_trip_keeps_the_objective(edm_pipeline_dir, tmp_path):
    backbone = DDAEBackbone.from_pretrained(edm_pipeline_dir)
    assert backbone.objective == "edm" and isinstance(backbone.scheduler, EDMEulerScheduler)
    pipe = DDAEPipeline.from_pretrained(edm_pipeline_dir)
    assert pipe.backbone.objective == "edm"
    x = images()
    expected = backbone.features(x, [LAYER], [0.06])[LAYER, 0.06]
    torch.testing.assert_close(pipe.extract_features(x, [LAYER], [0.06])[LAYER, 0.06], expected)

    model = DDAEForImageClassification.from_diffusers(edm_pipeline_dir, layer=LAYER, num_labels=3)
    assert (model.config.objective, model.config.timestep) == ("edm", backbone.noise_axis.default_probe_level())
    model = DDAEForImageClassification.from_diffusers(edm_pipeline_dir, layer=LAYER, timestep=0.06, num_labels=3)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states[0].mean((2, 3))
    torch.testing.assert_close(hidden, expected)  # the classifier noises and preconditions as extraction does
    model.save_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    scheduler = config["scheduler_config"]
    assert (scheduler["_class_name"], config["timestep"], scheduler["sigma_data"]) == ("EDMEulerScheduler", 0.06, 0.5)
    loaded = DDAEForImageClassification.from_pretrained(tmp_path / "clf").eval()
    assert isinstance(loaded.noise_scheduler, EDMEulerScheduler) and loaded.config.objective == "edm"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    with_classifier = DDAEPipeline.from_pretrained(edm_pipeline_dir, classifier=str(tmp_path / "clf"))
    assert len(with_classifier.classify(x).labels) == 4
    assert "sigma=0.06" in with_classifier.model_card().content


@pytest.mark.parametrize("scheduler_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_sampling_equals_a_hand_loop(scheduler_class):
    unet = make_tiny_unet()
    pipe = DDAEPipeline(unet=unet, scheduler=scheduler_class())
    pipe.set_progress_bar_config(disable=True)
    images_out = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(7), output_type="pt").images

    scheduler = scheduler_class()
    scheduler.set_timesteps(5)
    sample = torch.randn(2, 3, 16, 16, generator=torch.manual_seed(7)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(scheduler.scale_model_input(sample, t), t.expand(2)).sample
            sample = scheduler.step(output, t, sample).prev_sample
    torch.testing.assert_close(images_out, (sample / 2 + 0.5).clamp(0, 1))
    assert images_out.shape == (2, 3, 16, 16) and torch.isfinite(images_out).all()


def test_default_sampling_steps_follow_the_objective(monkeypatch):
    pipe = DDAEPipeline(unet=make_tiny_unet(), scheduler=EDMEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    calls = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1) or type(pipe.unet).forward(
        pipe.unet, *a, **k))
    pipe(batch_size=1, generator=torch.manual_seed(0), output_type="np")
    assert len(calls) == 18


@pytest.mark.parametrize(
    ("scheduler", "level", "message"),
    [
        (EDMEulerScheduler(), 10, "is an integer, but this is an EDM model"),
        (EDMEulerScheduler(), 0.0, "must be > 0"),
        (EDMEulerScheduler(), -0.5, "must be > 0"),
        (EDMEulerScheduler(), 100.0, r"outside this model's range \[0.002, 80\]"),
        (EDMEulerScheduler(), 0.001, "outside this model's range"),
        (EDMEulerScheduler(), float("nan"), "not a finite sigma"),
        (DDPMScheduler(), 0.06, "is a float, but this is a DDPM model"),
        (DDPMScheduler(), 1000, "out of range"),
    ],
)
def test_levels_in_the_wrong_units_are_refused_before_any_work(scheduler, level, message):
    unet = make_tiny_unet()
    calls = []
    unet.register_forward_pre_hook(lambda *a: calls.append(1))
    backbone = DDAEBackbone(unet, scheduler)
    assert backbone.layer_names()  # the catalogue's own trace, before counting
    calls.clear()
    with pytest.raises(ValueError, match=message):
        backbone.features(images(), [LAYER], [level])
    assert calls == []
    with pytest.raises(ValueError, match=message):
        DDAEForImageClassification.from_diffusers(DDAEBackbone(make_tiny_unet(), scheduler), layer=LAYER,
                                                  timestep=level, num_labels=2)


def test_probe_grid_on_an_edm_model(edm_pipeline_dir, tmp_path):
    """ddae-probe: EDM sigmas by schedule index, the shared axis in the report, and a classifier from the probe."""
    out = tmp_path / "probe"
    results = probe_main([
        "--model", edm_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--max_train_samples", "60",
        "--max_eval_samples", "20", "--train_split", "train", "--eval_split", "test", "--resolution", "16",
        "--layers", "mid_block", LAYER, "--sigma_index", "3", "4", "--epochs", "3", "--output_dir", str(out),
    ])
    assert results.objective == "edm" and results.timesteps == [0.02293, 0.05995]
    assert [lv["ve_sigma"] for lv in results.noise_levels] == [0.02293, 0.05995]
    report = (out / "results.md").read_text()
    assert "| layer | sigma |" in report and "Noise levels on one axis" in report and (out / "heatmap.png").is_file()
    model = DDAEForImageClassification.from_probe(out, timestep=0.05995)
    assert model.config.objective == "edm" and model.config.timestep == 0.05995

    with pytest.raises(ValueError, match="is an integer, but this is an EDM model"):
        probe_main(["--model", edm_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--timesteps", "10",
                    "--output_dir", str(tmp_path / "bad")])
    ddpm = tmp_path / "ddpm"
    DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(ddpm)
    with pytest.raises(ValueError, match="this is a DDPM model"):
        probe_main(["--model", str(ddpm), "--dataset", CIFAR10_SAMPLE, "--sigma_index", "4",
                    "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "results.json").exists()
