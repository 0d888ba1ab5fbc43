"""Half-precision weights, CPU offload and device placement of the capture core, the classifier and the pipeline.

No accelerator here: fp16/bf16 weights run for real on the CPU where values matter; the meta device stands in for an
accelerator where they do not (mixing CPU and meta tensors fails as CPU and CUDA do); offload uses accelerate's own
hooks, executing on the CPU (values) or on the meta device (which device inputs go to).
"""

from __future__ import annotations

import copy
import warnings
from unittest import mock

import pytest
import torch
from accelerate import cpu_offload, cpu_offload_with_hook
from conftest import TINY_LATENT_DIT, TINY_VAE_CONFIG, make_tiny_dit, make_tiny_unet
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from hub_layouts import RESOLUTIONS, write_sd15_layout

import ddae_diffusers.capture as capture
from ddae_diffusers import DDAEBackbone, DDAEForImageClassification, DDAEPipeline
from ddae_diffusers.capture import capture_activations, encode_latents, pool_activation, trace_forward
from ddae_diffusers.noise import noise_axis

LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0.resnets.1"]
DIT_LAYER = "transformer_blocks.1"
CPU, META = torch.device("cpu"), torch.device("meta")


def pixels(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_vae(force_upcast: bool = True, overflow: bool = False) -> AutoencoderKL:
    """The tiny VAE; ``overflow`` scales its first convolution so that its activations pass float16's 65504 (the
    encoder's last group norm brings the latents back to the usual scale: float32 encodes them fine)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG, force_upcast=force_upcast).eval()
    if overflow:
        with torch.no_grad():
            vae.encoder.conv_in.weight.mul_(1e5)
            vae.encoder.conv_in.bias.mul_(1e5)
    return vae


def assert_features_close(got: dict, expected: dict, tolerance: float) -> None:
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
        torch.testing.assert_close(value, expected[key], rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> str:
    return write_sd15_layout(tmp_path_factory.mktemp("sd15"))


# ------------------------------------------------------------------------------------------ half-precision weights
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_denoiser_features(dtype):
    x = pixels(3)
    expected = DDAEBackbone(make_tiny_unet()).features(x, LAYERS, [10, 100])
    got = DDAEBackbone(make_tiny_unet().to(dtype)).features(x, LAYERS, [10, 100])
    assert_features_close(got, expected, 0.05)
    pipe = DDAEPipeline(unet=make_tiny_unet().to(dtype))
    assert_features_close(pipe.extract_features(x, LAYERS, [10, 100], batch_size=2), expected, 0.05)


@pytest.mark.parametrize(
    ("denoiser_dtype", "vae_dtype", "force_upcast"),
    [
        (torch.float16, torch.float32, True),  # the catalogue fed the fp16 dummy to the fp32 VAE
        (torch.float32, torch.float16, False),  # fp32 pixels into an fp16 VAE
        (torch.float32, torch.float16, True),  # fp16 VAE asking for float32: run in float32
    ],
)
def test_latent_models_with_mixed_dtypes(denoiser_dtype, vae_dtype, force_upcast):
    x = pixels(2)
    reference = DDAEBackbone(make_tiny_dit(**TINY_LATENT_DIT), vae=make_vae(force_upcast))
    backbone = DDAEBackbone(
        make_tiny_dit(**TINY_LATENT_DIT).to(denoiser_dtype), vae=make_vae(force_upcast).to(vae_dtype)
    )
    assert [info.shape for info in backbone.layers] == [info.shape for info in reference.layers]
    expected = reference.features(x, [DIT_LAYER], [10], pooling="spatial")
    assert_features_close(backbone.features(x, [DIT_LAYER], [10], pooling="spatial"), expected, 0.05)
    assert backbone.vae.dtype == vae_dtype and backbone.denoiser.dtype == denoiser_dtype


def test_conditioned_half_denoiser_with_float32_vae_and_text_encoder(sd15_dir):
    x, layer = pixels(2, RESOLUTIONS["sd15"]), "up_blocks.1.resnets.0"
    expected = DDAEBackbone.from_pretrained(sd15_dir).features(x, [layer], [10])
    backbone = DDAEBackbone.from_pretrained(sd15_dir)
    backbone.denoiser.half()  # VAE and CLIP stay float32: latents and prompt embeddings are cast for the forward
    assert_features_close(backbone.features(x, [layer], [10]), expected, 0.05)
    assert backbone.conditioning["encoder_hidden_states"].dtype == torch.float32  # cached as encoded


# ------------------------------------------------------------------------------------------ the VAE's float32 needs
def test_force_upcast_vae_encodes_in_float32_under_float16_autocast():
    x = pixels(2)
    vae = make_vae(force_upcast=True, overflow=True)
    with torch.no_grad():
        expected = encode_latents(vae, x)
        with torch.autocast("cpu", dtype=torch.float16):
            latents = encode_latents(vae, x)
    assert torch.isfinite(expected).all()
    assert torch.isfinite(latents).all()  # not NaN: autocast is off inside the VAE
    torch.testing.assert_close(latents, expected)
    backbone = DDAEBackbone(make_tiny_dit(**TINY_LATENT_DIT), vae=vae)
    assert_features_close(
        backbone.features(x, [DIT_LAYER], [10], dtype=torch.float16), backbone.features(x, [DIT_LAYER], [10]), 0.05
    )


def test_float16_vae_with_force_upcast_runs_in_float32_and_stays_float16():
    x = pixels(2)
    half = make_vae(force_upcast=True, overflow=True).half()
    full = copy.deepcopy(half).float()  # the same weights, exactly
    weights = {name: (p, p.data_ptr()) for name, p in half.named_parameters()}
    with torch.no_grad():
        expected = encode_latents(full, x)
        latents = encode_latents(half, x)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    assert half.dtype == torch.float16  # the user's module is left as it was
    assert all(p is weights[name][0] and p.data_ptr() == weights[name][1] for name, p in half.named_parameters())
    # gradients still reach the float16 weights (an unfrozen VAE in fine-tuning)
    encode_latents(half, x).sum().backward()
    assert half.encoder.conv_in.weight.grad.dtype == torch.float16


# ------------------------------------------------------------------------------------------ noise in float32
@pytest.mark.parametrize(
    ("dtype", "t", "std"),
    [(torch.float16, 10, 0.0468), (torch.bfloat16, 10, 0.0468), (torch.bfloat16, 0, 0.0100)],
)
def test_classifier_noises_in_float32_then_casts(dtype, t, std):
    model = DDAEForImageClassification.from_diffusers(
        make_tiny_unet().to(dtype), "mid_block", timestep=t, num_labels=2
    )
    seen = []
    model.denoiser.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = pixels(16)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(pixel_values=x, noise=eps)
    timesteps = torch.full((16,), t, dtype=torch.long)
    expected = DDPMScheduler().add_noise(x, eps, timesteps)
    assert seen[0].dtype == dtype
    torch.testing.assert_close(seen[0], expected.to(dtype), rtol=0, atol=0)  # noised in fp32, cast once
    alpha = float(DDPMScheduler().alphas_cumprod[t])
    measured = float((seen[0].float() - alpha**0.5 * x).std() / eps.std())
    assert measured == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize(
    ("scheduler", "level"),
    [(DDPMScheduler(), 10), (EDMEulerScheduler(), 0.06), (FlowMatchEulerDiscreteScheduler(shift=3.0), 0.2)],
)
def test_noise_axes_noise_in_float32(scheduler, level):
    axis = noise_axis(scheduler)
    clean, noise = pixels(2), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected, t_expected = axis.network_inputs(clean, noise, level)
    for dtype in (torch.float16, torch.bfloat16):
        noisy, t = axis.network_inputs(clean.to(dtype), noise.to(dtype), level)
        assert noisy.dtype == torch.float32 and torch.equal(t, t_expected)
        torch.testing.assert_close(noisy, expected, rtol=0, atol=0.01)


def test_flow_matching_noise_takes_its_sigma_without_a_lookup_per_example():
    axis = noise_axis(FlowMatchEulerDiscreteScheduler(shift=3.0))
    clean, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    lookup = mock.patch.object(
        FlowMatchEulerDiscreteScheduler,
        "index_for_timestep",
        side_effect=AssertionError("a nonzero().item() device sync per example"),
    )
    with lookup:
        noisy, t = axis.network_inputs(clean, noise, 0.2)
        axis.network_inputs(clean, noise, 0.2)
    torch.testing.assert_close(noisy, 0.8 * clean + 0.2 * noise)
    assert t.tolist() == [200.0] * 4


# ------------------------------------------------------------------------------------------ CPU offload
def test_offloaded_weights_run_on_the_hooks_execution_device():
    """accelerate's cpu_offload leaves the weights on the meta device and runs each module on its execution device
    (the CPU here): inputs, the catalogue's dummy and autocast must target that device."""
    x = pixels(2)
    plain = DDAEBackbone(make_tiny_unet())
    expected = plain.features(x, LAYERS, [10])
    expected_bf16 = plain.features(x, LAYERS, [10], dtype=torch.bfloat16)
    unet = make_tiny_unet()
    cpu_offload(unet, execution_device=CPU)
    assert next(unet.parameters()).device == META
    backbone = DDAEBackbone(unet)
    assert backbone.device == CPU
    assert_features_close(backbone.features(x, LAYERS, [10]), expected, 1e-5)
    assert_features_close(backbone.features(x, LAYERS, [10], dtype=torch.bfloat16), expected_bf16, 1e-5)
    assert not torch.equal(expected_bf16["mid_block", 10], expected["mid_block", 10])  # autocast did run
    pipe = DDAEPipeline(unet=unet)
    assert_features_close(pipe.extract_features(x, LAYERS, [10]), expected, 1e-5)


def test_model_offload_execution_device_decides_placement():
    """enable_model_cpu_offload's hook keeps the weights on the CPU and moves them to its execution device (the meta
    device standing in for an accelerator) for each forward: the backbone's device is that one."""
    unet = make_tiny_unet()
    cpu_offload_with_hook(unet, execution_device=META)
    assert unet.device == CPU
    backbone = DDAEBackbone(unet)
    assert backbone.device == META
    assert backbone.check_images(pixels(2)).device == META
    assert capture.dummy_input(unet).device == META
    assert DDAEPipeline(unet=unet).backbone.device == META


def test_extract_features_validates_on_the_cpu_and_sends_batches_to_the_device():
    """The images are checked where they are; only one batch at a time goes to the device (meta here)."""
    pipe = DDAEPipeline(unet=make_tiny_unet())
    backbone = pipe.backbone
    assert backbone.layers  # traced on the CPU
    pipe.unet.to(META)
    sent = []

    def features(batch, layers, timesteps, **kwargs):
        sent.append((batch.device, batch.shape[0]))
        return {(layers[0], timesteps[0]): torch.zeros(batch.shape[0], 32)}

    with mock.patch.object(backbone, "features", features):
        out = pipe.extract_features(pixels(5), ["mid_block"], [10], batch_size=2)
        assert sent == [(META, 2), (META, 2), (META, 1)]  # never the whole set at once
        assert out["mid_block", 10].shape == (5, 32)
        with pytest.raises(ValueError, match="must be in \\[-1, 1\\]"):
            pipe.extract_features(pixels(5) * 3, ["mid_block"], [10], batch_size=2)
    assert len(sent) == 3


# ------------------------------------------------------------------------------------------ catalogue and prompts
def test_catalogue_pass_runs_under_the_requested_autocast():
    backbone = DDAEBackbone(make_tiny_unet())
    autocast = []
    backbone.denoiser.register_forward_pre_hook(lambda *args: autocast.append(torch.is_autocast_enabled("cpu")))
    backbone.features(pixels(2), ["mid_block"], [10], dtype=torch.bfloat16)
    assert autocast == [True, True]  # the catalogue's trace, then the features' forward


def test_to_keeps_text_encoders_once_the_conditioning_exists(sd15_dir):
    fresh = DDAEBackbone.from_pretrained(sd15_dir).to(META)  # no conditioning yet: the encoders go along
    assert fresh.text_components["text_encoder"].device == META
    backbone = DDAEBackbone.from_pretrained(sd15_dir)
    encoder = backbone.text_components["text_encoder"]
    assert backbone.conditioning["encoder_hidden_states"].device == CPU
    backbone.to(META)
    assert backbone.denoiser.device == META and backbone.vae.device == META
    assert encoder.device == CPU  # left where it is
    assert all(value.device == META for value in backbone.conditioning.values())
    backbone.set_prompt("a photo of a cat")  # encoded on the encoder's device, kept on the backbone's
    assert encoder.device == CPU and backbone.conditioning["encoder_hidden_states"].device == META


# ------------------------------------------------------------------------------------------ pooling in the hooks
def test_hooks_pool_each_block_output():
    unet, x = make_tiny_unet(), pixels(2)
    with torch.no_grad():
        raw = capture_activations(unet, x, 10, LAYERS, stop_after=LAYERS[-1])
        pooled = capture_activations(unet, x, 10, LAYERS, stop_after=LAYERS[-1], pooling="avg")
        mapped = trace_forward(unet, x, 10, LAYERS, pooling=lambda a: a[:, :1]).outputs
    for layer in LAYERS:
        torch.testing.assert_close(pooled[layer], pool_activation(raw[layer]), rtol=0, atol=0)
        torch.testing.assert_close(mapped[layer], raw[layer][:, :1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown hook pooling 'spatial'"):
        trace_forward(unet, x, 10, LAYERS, pooling="spatial")


def test_features_pool_inside_the_forward():
    """Average pooling happens in each block's hook, before the deeper blocks run, with the same features."""
    backbone, x = DDAEBackbone(make_tiny_unet()), pixels(3)
    raw = backbone.features(x, LAYERS, [10, 50], pooling=None, levels_per_forward=2)
    events = []
    backbone.denoiser.get_submodule(LAYERS[-1]).register_forward_pre_hook(lambda *args: events.append("deepest"))

    def pool(activation, pooling="avg"):
        events.append("pool")
        return pool_activation(activation, pooling)

    with mock.patch.object(capture, "pool_activation", pool):
        pooled = backbone.features(x, LAYERS, [10, 50], levels_per_forward=2)
    assert events == ["pool", "pool", "deepest", "pool"]  # one forward for both levels
    for key, value in raw.items():
        torch.testing.assert_close(pooled[key], pool_activation(value), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ loading in a dtype
def test_loaders_take_dtype_and_torch_dtype(tiny_unet_pipeline_dir, dit_xl_layout_dir, tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "bare")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch_dtype is accepted without a deprecation warning
        assert (
            DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir, dtype=torch.float16).denoiser.dtype == torch.float16
        )
        latent = DDAEBackbone.from_pretrained(dit_xl_layout_dir, torch_dtype=torch.bfloat16)
        assert latent.denoiser.dtype == latent.vae.dtype == torch.bfloat16
        for kwargs in ({"dtype": torch.float16}, {"torch_dtype": torch.float16}):
            assert DDAEPipeline.from_pretrained(str(tmp_path / "bare"), **kwargs).unet.dtype == torch.float16
            assert DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir, **kwargs).unet.dtype == torch.float16
    assert isinstance(DDAEPipeline.from_pretrained(str(tmp_path / "bare")).unet, UNet2DModel)
    with pytest.raises(ValueError, match="pass only dtype"):
        DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir, dtype="fp16")


def test_text_conditioned_model_loads_in_half_precision(sd15_dir):
    x, layer = pixels(2, RESOLUTIONS["sd15"]), "up_blocks.1.resnets.0"
    expected = DDAEBackbone.from_pretrained(sd15_dir).features(x, [layer], [10])
    backbone = DDAEBackbone.from_pretrained(sd15_dir, dtype=torch.bfloat16)
    assert {backbone.denoiser.dtype, backbone.vae.dtype, backbone.text_components["text_encoder"].dtype} == {
        torch.bfloat16
    }
    assert_features_close(backbone.features(x, [layer], [10]), expected, 0.1)
