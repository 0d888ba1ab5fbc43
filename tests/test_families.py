"""Every diffusers denoiser family on tiny local folders in the layouts of its Hub repositories: Stable Diffusion
1.5 / 2.1 / XL UNets, PixArt-Sigma, SD3 and Flux transformers, through DDAEBackbone, DDAEPipeline and ddae-probe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CIFAR10_SAMPLE
from hub_layouts import LAYOUTS, RESOLUTIONS

from ddae_diffusers import DDAEBackbone, DDAEPipeline
from ddae_diffusers.capture import capture_activations, example_noise
from ddae_diffusers.families import pack_flux_latents
from ddae_diffusers.noise import FlowMatchNoise
from ddae_diffusers.probing.cli import main as probe_main

# (layout, family, noise axis, two layers: a mid-network one and a deeper one)
CASES = {
    "sd15": ("UNet2DConditionModel", "ddpm", ["mid_block", "up_blocks.1.resnets.0"]),
    "sd21": ("UNet2DConditionModel", "ddpm", ["mid_block", "up_blocks.1.resnets.0"]),
    "sdxl": ("UNet2DConditionModel", "ddpm", ["mid_block", "up_blocks.1.resnets.0"]),
    "pixart_sigma": ("PixArtTransformer2DModel", "ddpm", ["transformer_blocks.0", "transformer_blocks.1"]),
    "sd3": ("SD3Transformer2DModel", "flow", ["transformer_blocks.0", "transformer_blocks.1"]),
    "flux": ("FluxTransformer2DModel", "flow", ["transformer_blocks.0", "single_transformer_blocks.0"]),
}
LEVEL = {"ddpm": 10, "flow": 0.05}


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hub-layouts")
    return {name: write(root / name) for name, write in LAYOUTS.items()}


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_features_of_every_family(name, layouts):
    family, objective, layers = CASES[name]
    size = RESOLUTIONS[name]
    backbone = DDAEBackbone.from_pretrained(layouts[name])
    assert backbone.family.name == family and backbone.objective == objective and backbone.vae is not None
    encoder_calls = count_calls(backbone.text_components["text_encoder"])
    names = backbone.layer_names()
    assert set(layers) <= set(names) and names == backbone.check_layers(names)  # execution order
    level = LEVEL[objective]
    x = pixels(4, size)

    pooled = backbone.features(x, layers, [level], seed=3)
    dense = backbone.features(x, layers, [level], seed=3, pooling="spatial")
    for layer in layers:
        info = backbone.layer_info(layer)
        assert pooled[layer, level].shape == (4, info.feature_dim)
        maps = dense[layer, level]
        assert maps.ndim == 4 and maps.shape[:2] == (4, info.feature_dim)
        # pooling the dense map gives the pooled feature: tokens land on their grid, nothing is lost
        torch.testing.assert_close(maps.mean(dim=(2, 3)), pooled[layer, level], rtol=1e-4, atol=1e-5)
    up = backbone.features(x[:1], layers[:1], [level], seed=3, pooling="spatial", upsample=True)[layers[0], level]
    assert up.shape[-2:] == (size, size)

    # deterministic and independent of the batch size
    halves = [backbone.features(x[i : i + 2], layers, [level], seed=3, example_ids=[i, i + 1]) for i in (0, 2)]
    for layer in layers:
        torch.testing.assert_close(torch.cat([h[layer, level] for h in halves]), pooled[layer, level],
                                   rtol=1e-4, atol=1e-5)
    # the empty prompt's embedding is computed once per backbone, with the pipeline's own text encoder
    assert encoder_calls[0] == 1


@pytest.mark.parametrize("name", list(CASES))
def test_early_exit_equals_the_full_forward(name, layouts):
    _, objective, layers = CASES[name]
    backbone = DDAEBackbone.from_pretrained(layouts[name])
    with torch.no_grad():
        clean = backbone._encode(pixels(2, RESOLUTIONS[name]))
        noise = example_noise(clean.shape[1:], [0, 1], 0)
        noisy, t = backbone.noise_axis.network_inputs(clean, noise, LEVEL[objective])
        conditioning = backbone.conditioning
        names = backbone.layer_names()
        full = capture_activations(backbone.denoiser, noisy, t, names, conditioning=conditioning)
        for layer in layers:
            early = capture_activations(backbone.denoiser, noisy, t, [layer], stop_after=layer,
                                        conditioning=conditioning)
            torch.testing.assert_close(early[layer], full[layer], rtol=0, atol=0)


def test_classifier_refuses_text_conditioned_models(layouts):
    from ddae_diffusers import DDAEForImageClassification

    with pytest.raises(ValueError, match="supports unconditional denoisers .* a UNet2DConditionModel is text-cond"):
        DDAEForImageClassification.from_diffusers(layouts["sd15"], layer="mid_block", num_labels=2)


def test_prompts_and_precomputed_conditioning(layouts):
    backbone = DDAEBackbone.from_pretrained(layouts["sdxl"])
    x, layer = pixels(2, RESOLUTIONS["sdxl"]), "mid_block"
    empty = backbone.features(x, [layer], [10])[layer, 10]
    assert set(backbone.conditioning) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert backbone.conditioning["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    cat = backbone.set_prompt("a photo of a cat").features(x, [layer], [10])[layer, 10]
    assert not torch.allclose(cat, empty)
    # the same embeddings passed by hand give the same features, without the text encoders
    bare = DDAEBackbone(backbone.denoiser, backbone.scheduler, backbone.vae,
                        conditioning=backbone.encode_prompt("a photo of a cat"))
    torch.testing.assert_close(bare.features(x, [layer], [10])[layer, 10], cat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no text encoders"):
        DDAEBackbone(backbone.denoiser, backbone.scheduler, backbone.vae).features(x, [layer], [10])
    with pytest.raises(ValueError, match="needs \\['encoder_hidden_states'\\]"):
        bare.set_conditioning({"text_embeds": torch.zeros(1, 32)})


def test_noise_ensemble_is_deterministic_and_batch_independent(layouts):
    backbone = DDAEBackbone.from_pretrained(layouts["sd15"])
    x, layer = pixels(4, 32), "mid_block"
    single = backbone.features(x, [layer], [100], seed=1)[layer, 100]
    ensemble = backbone.features(x, [layer], [100], seed=1, ensemble=3)[layer, 100]
    again = torch.cat([backbone.features(x[i : i + 1], [layer], [100], seed=1, ensemble=3, example_ids=[i])[layer, 100]
                       for i in range(4)])
    torch.testing.assert_close(again, ensemble, rtol=1e-4, atol=1e-5)
    draws = [backbone.features(x, [layer], [100], seed=s)[layer, 100] for s in (1, *_ensemble_seeds(1, 2))]
    torch.testing.assert_close(ensemble, torch.stack(draws).mean(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(single, ensemble)
    with pytest.raises(ValueError, match="ensemble must be an integer >= 1"):
        backbone.features(x, [layer], [100], ensemble=0)
    with pytest.raises(ValueError, match="pass pooling='spatial'"):
        backbone.features(x, [layer], [100], upsample=True)


def _ensemble_seeds(seed: int, extra: int) -> list[int]:
    from ddae_diffusers.capture import derive_seed

    return [derive_seed(seed, 7, k) for k in range(1, extra + 1)]


def test_flow_matching_noise_goes_through_scale_noise(layouts):
    backbone = DDAEBackbone.from_pretrained(layouts["sd3"])
    axis = backbone.noise_axis
    assert isinstance(axis, FlowMatchNoise) and backbone.scheduler.config.shift == 3.0
    clean, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    noisy, t = axis.network_inputs(clean, noise, 0.2)
    torch.testing.assert_close(noisy, 0.8 * clean + 0.2 * noise)  # the level is the sigma the network sees
    assert t.tolist() == [200.0, 200.0] and axis.ve_sigma(0.2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="must be a float in \\(0, 1\\)"):
        axis.check_levels([1.5])


def test_flux_packing_and_token_grid():
    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    tokens = pack_flux_latents(latents)
    assert tokens.shape == (2, 6, 64)
    # token (row 1, column 2) holds the 2x2 patch at latent rows 2-3, columns 4-5, channel-major
    torch.testing.assert_close(tokens[:, 1 * 3 + 2].view(2, 16, 2, 2), latents[:, :, 2:4, 4:6])


@pytest.mark.parametrize("name", ["sd21", "pixart_sigma", "flux"])
def test_pipeline_extracts_features(name, layouts):
    _, objective, layers = CASES[name]
    pipe = DDAEPipeline.from_pretrained(layouts[name])
    assert pipe.text_encoder is not None and pipe.tokenizer is not None
    level = LEVEL[objective]
    x = pixels(3, RESOLUTIONS[name])
    feats = pipe.extract_features(x, layers, [level], batch_size=2, pooling="spatial")
    expected = DDAEBackbone.from_pretrained(layouts[name]).features(x, layers, [level], pooling="spatial")
    for layer in layers:
        torch.testing.assert_close(feats[layer, level], expected[layer, level], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="generates with unconditional denoisers only"):
        pipe(num_inference_steps=2)


@pytest.mark.parametrize("name", list(CASES))
def test_probe_grid_on_every_family(name, layouts, tmp_path):
    _, objective, layers = CASES[name]
    levels = ["10", "100"] if objective == "ddpm" else ["0.05", "0.3"]
    results = probe_main([
        "--model", layouts[name], "--dataset", CIFAR10_SAMPLE, "--max_train_samples", "60", "--max_eval_samples",
        "30", "--layers", *layers, "--timesteps", *levels, "--batch_size", "30", "--epochs", "2", "--lrs", "0.01",
        "--output_dir", str(tmp_path / "probe"),
    ])  # fmt: skip
    saved = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert len(saved["cells"]) == 4 and saved["objective"] == objective and saved["resolution"] == 32
    assert results.best.layer in layers


def test_probe_prompt_and_push_refusal(layouts, tmp_path, tiny_unet_pipeline_dir):
    from conftest import FakeHub

    args = ["--dataset", CIFAR10_SAMPLE, "--max_train_samples", "40", "--max_eval_samples", "20", "--layers",
            "mid_block", "--timesteps", "10", "--epochs", "1", "--lrs", "0.01"]  # fmt: skip
    cache = ["--cache_dir", str(tmp_path / "cache")]
    empty = probe_main(["--model", layouts["sd15"], "--output_dir", str(tmp_path / "empty"), *cache, *args])
    cat = probe_main(["--model", layouts["sd15"], "--output_dir", str(tmp_path / "cat"), "--prompt", "a cat", *cache,
                      *args])  # fmt: skip
    # the prompt is part of the feature cache key (one eval and one train unit per prompt) and of the config; the
    # VAE latents of each split do not depend on it: both prompts share them
    assert cat.config["prompt"] == "a cat" and empty.config["prompt"] is None
    assert len(list((tmp_path / "cache").glob("[et]*-v0-t10-*/features.npy"))) == 4
    assert len(list((tmp_path / "cache").glob("latents-*/features.npy"))) == 2
    with pytest.raises(ValueError, match="UNet2DModel is not text-conditioned: it takes no prompt"):
        probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "x"), "--prompt", "a", *args])
    hub = FakeHub(tmp_path / "hub")
    with hub.patch(), pytest.raises(ValueError, match="this UNet2DConditionModel cannot be one"):
        probe_main(["--model", layouts["sd15"], "--output_dir", str(tmp_path / "p"), "--push_to_hub", *args])
    assert not hub.repos  # refused before the repository is created


def test_offloaded_and_bf16_conditional_models(layouts):
    backbone = DDAEBackbone.from_pretrained(layouts["sd15"])
    x, layer = pixels(2, 32), "up_blocks.1.resnets.0"
    plain = backbone.features(x, [layer], [10])[layer, 10]
    cpu = torch.device("cpu")
    backbone.denoiser.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                           num_blocks_per_group=1)
    torch.testing.assert_close(backbone.features(x, [layer], [10])[layer, 10], plain, rtol=1e-5, atol=1e-6)
    half = backbone.features(x, [layer], [10], dtype=torch.bfloat16)[layer, 10]
    assert half.dtype == torch.float32 and torch.allclose(half, plain, rtol=0.1, atol=0.1)
    pipe = DDAEPipeline.from_pretrained(layouts["sd15"])
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's hooks move each model in and out for its forward
    offloaded = pipe.extract_features(x, [layer], [10])[layer, 10]
    torch.testing.assert_close(offloaded, plain, rtol=1e-5, atol=1e-6)


def guide_snippet() -> str:
    from conftest import REPO_ROOT

    guide = (REPO_ROOT / "docs" / "features.md").read_text()
    block = guide.split("<!-- snippet: every-denoiser -->", 1)[1].split("<!-- end snippet -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_guide_snippet_runs_on_every_family(name, layouts):
    code = guide_snippet().replace('"stabilityai/stable-diffusion-xl-base-1.0"', repr(layouts[name]))
    namespace = {"pixel_values": pixels(2, RESOLUTIONS[name])}
    exec(compile(code, "docs/features.md", "exec"), namespace)
    backbone, layer = namespace["backbone"], namespace["layer"]
    dim, side = backbone.layer_info(layer).feature_dim, RESOLUTIONS[name]
    assert layer == backbone.default_layer() and namespace["feats"].shape == (2, dim)
    assert namespace["dense"].shape == (2, dim, side, side)
    empty = backbone.encode_prompt("")["encoder_hidden_states"]
    assert not torch.equal(backbone.conditioning["encoder_hidden_states"], empty)  # the dog prompt is in use


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_several_levels_in_one_forward_give_the_same_features(name, layouts):
    backbone = DDAEBackbone.from_pretrained(layouts[name])
    _, objective, layers = CASES[name]
    levels = [10, 100, 400] if objective == "ddpm" else [0.05, 0.3, 0.7]
    x = pixels(3, RESOLUTIONS[name])
    assert backbone.layers  # the catalogue's trace, before counting
    calls = [0]  # forwards started (a pre-hook: the early exit skips the denoiser's forward hooks)
    backbone.denoiser.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    one_by_one = backbone.features(x, layers, levels, seed=2)
    assert calls[0] == 3
    for per_forward, forwards in ((3, 1), (2, 2)):
        stacked = backbone.features(x, layers, levels, seed=2, levels_per_forward=per_forward)
        assert calls[0] == 3 + forwards
        calls[0] = 3
        for key, value in one_by_one.items():
            torch.testing.assert_close(stacked[key], value, rtol=1e-4, atol=1e-5)
    # per-example conditioning (batch B) is repeated for each stacked level
    per_example = {key: torch.cat([value] * 3) for key, value in backbone.encode_prompt("a cat").items()
                   if key != "txt_ids"} | {k: v for k, v in backbone.conditioning.items() if k == "txt_ids"}
    backbone.set_conditioning(per_example)
    torch.testing.assert_close(backbone.features(x, layers, levels, levels_per_forward=3)[layers[0], levels[1]],
                               backbone.features(x, layers, levels)[layers[0], levels[1]], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="levels_per_forward must be an integer >= 1"):
        backbone.features(x, layers, levels, levels_per_forward=0)
