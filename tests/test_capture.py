"""The capture core on tiny real diffusers models: catalogue, hooked features, noise, loading, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_VAE_CONFIG, make_tiny_dit, make_tiny_unet, make_tiny_vae
from diffusers import DDPMScheduler, DiTPipeline, UNet1DModel
from diffusers.hooks import HookRegistry, ModelHook

from ddae_diffusers import DDAEBackbone, build_denoiser, example_noise
from ddae_diffusers.capture import candidate_layers, capture_activations
from ddae_diffusers.data import images_to_tensor


def random_images(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def unet_backbone() -> DDAEBackbone:
    return DDAEBackbone(make_tiny_unet())


def test_catalogue_matches_module_tree_and_full_forward(unet_backbone):
    unet = unet_backbone.denoiser
    names = candidate_layers(unet)
    # Trace every candidate independently with plain hooks on a full forward.
    order, shapes = [], {}

    def make_hook(name):
        def hook(module, inputs, output):
            order.append(name)
            shapes[name] = tuple((output[0] if isinstance(output, tuple) else output).shape[1:])

        return hook

    handles = [unet.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    with torch.no_grad():
        unet(torch.zeros(2, 3, 16, 16), torch.tensor([5, 5]))
    for h in handles:
        h.remove()

    catalogue = unet_backbone.layers
    assert [info.name for info in catalogue] == order
    assert sorted(order) == sorted(names)
    assert {info.name: info.shape for info in catalogue} == shapes
    assert [info.index for info in catalogue] == list(range(len(order)))
    expected = {"down_blocks.0", "down_blocks.1.attentions.0", "mid_block", "up_blocks.0.resnets.1",
                "up_blocks.0.attentions.1", "up_blocks.1", "up_blocks.1.resnets.0"}
    assert expected <= set(order)
    assert unet_backbone.layer_info("mid_block").shape == (32, 8, 8)
    assert unet_backbone.layer_info("mid_block").feature_dim == 32
    # Execution order: encoder before mid block before decoder.
    assert order.index("down_blocks.1") < order.index("mid_block") < order.index("up_blocks.0.resnets.0")


def test_hooked_features_equal_hand_run_partial_forward(unet_backbone):
    unet = unet_backbone.denoiser
    images = random_images(3)
    t = 25
    noise = example_noise(images.shape[1:], range(3), seed=7)
    noisy = unet_backbone.scheduler.add_noise(images, noise, torch.full((3,), t))

    with torch.no_grad():  # hand-run partial forward of UNet2DModel up to the mid block
        emb = unet.time_embedding(unet.time_proj(torch.full((3,), t)))
        hidden = unet.conv_in(noisy)
        for block in unet.down_blocks:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        mid = unet.mid_block(hidden, emb)

    feats = unet_backbone.features(images, ["mid_block"], [t], pooling=None, seed=7)
    torch.testing.assert_close(feats["mid_block", t], mid, rtol=1e-5, atol=1e-5)
    pooled = unet_backbone.features(images, ["mid_block"], [t], seed=7)
    torch.testing.assert_close(pooled["mid_block", t], mid.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_early_exit_equals_full_forward(unet_backbone):
    unet = unet_backbone.denoiser
    noisy = random_images(2)
    layers = ["down_blocks.1", "mid_block", "up_blocks.0.resnets.1"]
    calls = []
    handle = unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        early = capture_activations(unet, noisy, 10, layers, stop_after="up_blocks.0.resnets.1")
        assert not calls, "the forward should stop before conv_out"
        full = capture_activations(unet, noisy, 10, layers, stop_after=None)
        assert calls, "without stop_after the forward runs to the end"
    handle.remove()
    for name in layers:
        torch.testing.assert_close(early[name], full[name])


def test_features_dict_keys_shapes_and_dtype(unet_backbone):
    feats = unet_backbone.features(random_images(4), ["up_blocks.0.resnets.1", "mid_block"], [0, 10, 999])
    assert set(feats) == {(layer, t) for layer in ["up_blocks.0.resnets.1", "mid_block"] for t in [0, 10, 999]}
    assert feats["mid_block", 10].shape == (4, 32)
    assert feats["up_blocks.0.resnets.1", 0].shape == (4, 32)
    assert all(v.dtype == torch.float32 for v in feats.values())
    # Different timesteps really see different inputs.
    assert not torch.allclose(feats["mid_block", 0], feats["mid_block", 999])


def test_batch_size_invariance_and_seed_determinism(unet_backbone):
    images = random_images(8)
    layers, timesteps = ["down_blocks.1", "up_blocks.1.resnets.1"], [10, 100]
    whole = unet_backbone.features(images, layers, timesteps, seed=3)
    first = unet_backbone.features(images[:3], layers, timesteps, seed=3, example_ids=range(3))
    rest = unet_backbone.features(images[3:], layers, timesteps, seed=3, example_ids=range(3, 8))
    for key in whole:
        torch.testing.assert_close(torch.cat([first[key], rest[key]]), whole[key], rtol=1e-4, atol=1e-5)
    again = unet_backbone.features(images, layers, timesteps, seed=3)
    other = unet_backbone.features(images, layers, timesteps, seed=4)
    for key in whole:
        assert torch.equal(again[key], whole[key])
        assert not torch.allclose(other[key], whole[key])


def test_example_noise_depends_only_on_seed_and_id():
    a = example_noise((3, 4, 4), [5, 9], seed=1)
    b = example_noise((3, 4, 4), [9], seed=1)
    torch.testing.assert_close(a[1], b[0])
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(example_noise((3, 4, 4), [5], seed=2)[0], a[0])


def test_bf16_autocast_close_to_fp32(unet_backbone):
    images = random_images(4)
    fp32 = unet_backbone.features(images, ["mid_block"], [10])["mid_block", 10]
    bf16 = unet_backbone.features(images, ["mid_block"], [10], dtype=torch.bfloat16)["mid_block", 10]
    assert bf16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert cosine.min() > 0.99


def test_pixel_dit_features_and_catalogue():
    dit = make_tiny_dit()
    backbone = DDAEBackbone(dit)
    assert backbone.layer_names() == ["transformer_blocks.0", "transformer_blocks.1"]
    assert backbone.layer_info("transformer_blocks.1").shape == (16, 16)
    images = random_images(2, size=8)
    feats = backbone.features(images, ["transformer_blocks.0"], [10], pooling=None, seed=0)
    tokens = feats["transformer_blocks.0", 10]
    assert tokens.shape == (2, 16, 16)
    pooled = backbone.features(images, ["transformer_blocks.0"], [10], seed=0)["transformer_blocks.0", 10]
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_latent_dit_with_tiny_vae_encodes_first(tmp_path):
    dit = make_tiny_dit(in_channels=4, out_channels=4)
    vae = make_tiny_vae()
    scheduler = DDPMScheduler()
    DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler).save_pretrained(tmp_path)
    backbone = DDAEBackbone.from_pretrained(str(tmp_path))
    assert backbone.vae is not None and backbone.vae_scale == 2
    assert backbone.image_size == 16 and backbone.image_channels == 3
    images = random_images(2, size=16)
    feats = backbone.features(images, ["transformer_blocks.1"], [50], pooling=None, seed=1)

    with torch.no_grad():  # reference: encode, scale, noise, run the transformer with the null class
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        noisy = scheduler.add_noise(latents, example_noise(latents.shape[1:], range(2), 1), torch.tensor([50, 50]))
        out = capture_activations(dit, noisy, 50, ["transformer_blocks.1"])
    torch.testing.assert_close(feats["transformer_blocks.1", 50], out["transformer_blocks.1"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="takes 16x16"):
        backbone.features(random_images(2, size=8), ["transformer_blocks.1"], [50])

    # facebook/DiT-XL-2-256 records the legacy class name, which diffusers remaps on load.
    for path in (tmp_path / "model_index.json", tmp_path / "transformer" / "config.json"):
        config = json.loads(path.read_text())
        if "transformer" in config:
            config["transformer"] = ["diffusers", "Transformer2DModel"]
        else:
            config["_class_name"] = "Transformer2DModel"
        path.write_text(json.dumps(config))
    legacy = DDAEBackbone.from_pretrained(str(tmp_path))
    assert type(legacy.denoiser).__name__ == "DiTTransformer2DModel"
    again = legacy.features(images, ["transformer_blocks.1"], [50], pooling=None, seed=1)
    torch.testing.assert_close(again["transformer_blocks.1", 50], feats["transformer_blocks.1", 50])


def test_from_pretrained_pipeline_and_bare_model_folders(tiny_unet_pipeline_dir, tmp_path):
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    assert isinstance(backbone.scheduler, DDPMScheduler)
    reference = make_tiny_unet()
    for (name, p), (_, q) in zip(backbone.denoiser.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name

    reference.save_pretrained(tmp_path / "bare")
    bare = DDAEBackbone.from_pretrained(str(tmp_path / "bare"))
    assert isinstance(bare.scheduler, DDPMScheduler) and bare.num_train_timesteps == 1000
    images = random_images(2)
    a = backbone.features(images, ["mid_block"], [10])
    b = bare.features(images, ["mid_block"], [10])
    torch.testing.assert_close(a["mid_block", 10], b["mid_block", 10])


def test_ddpm_cifar10_preset_is_the_35_7m_architecture():
    unet = build_denoiser("ddpm-cifar10-32")
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    backbone = DDAEBackbone(unet)
    assert backbone.layer_info("up_blocks.1.resnets.2").shape == (256, 8, 8)  # the paper's out_6


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": ["mid_blok"]}, ValueError, "Did you mean mid_block"),
        ({"layers": []}, ValueError, "No layers"),
        ({"timesteps": [1000]}, ValueError, "0..999"),
        ({"timesteps": [-1]}, ValueError, "out of range"),
        ({"timesteps": [10.5]}, ValueError, "integer"),
        ({"images": torch.rand(2, 1, 16, 16)}, ValueError, "1 channels but the model takes 3"),
        ({"images": torch.rand(2, 3, 32, 32)}, ValueError, "32x32 but the model takes 16x16"),
        ({"images": torch.rand(2, 3, 16, 16) * 255}, ValueError, "DDAEImageProcessor"),
        ({"images": torch.zeros(0, 3, 16, 16)}, ValueError, "non-empty"),
        ({"images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}, TypeError, "floats in \\[-1, 1\\]"),
        ({"images": np.zeros((2, 16, 16, 3), dtype=np.uint8)}, TypeError, "DDAEImageProcessor"),
        ({"pooling": "max"}, ValueError, "Unknown pooling"),
    ],
)
def test_bad_input_raises_before_any_forward(unet_backbone, kwargs, error, match):
    calls = []
    handle = unet_backbone.denoiser.conv_in.register_forward_hook(lambda *args: calls.append(1))
    assert unet_backbone.layers  # the catalogue trace runs once, before we count
    calls.clear()
    arguments = {"images": random_images(2), "layers": ["mid_block"], "timesteps": [10], **kwargs}
    try:
        with pytest.raises(error, match=match):
            unet_backbone.features(**arguments)
    finally:
        handle.remove()
    assert not calls


def test_unsupported_denoiser_class_names_supported_ones(tmp_path):
    supported = "UNet2DModel, DiTTransformer2DModel, UNet2DConditionModel, PixArtTransformer2DModel, " \
        "SD3Transformer2DModel, FluxTransformer2DModel"
    one_d = UNet1DModel(block_out_channels=(8, 16), down_block_types=("DownBlock1D", "DownBlock1D"),
                        up_block_types=("UpBlock1D", "UpBlock1D"), mid_block_type="UNetMidBlock1D")
    with pytest.raises(TypeError, match=f"UNet1DModel: ddae_diffusers supports {supported}"):
        DDAEBackbone(one_d)
    one_d.save_pretrained(tmp_path / "bare")
    with pytest.raises(TypeError, match=f"UNet1DModel model; ddae_diffusers supports {supported}"):
        DDAEBackbone.from_pretrained(str(tmp_path / "bare"))
    # a pipeline whose denoiser class is not supported: refused from model_index.json, before any weight is read
    (tmp_path / "sana").mkdir()
    (tmp_path / "sana" / "model_index.json").write_text(json.dumps(
        {"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]}
    ))
    with pytest.raises(TypeError, match=f"SanaTransformer2DModel transformer; ddae_diffusers supports {supported}"):
        DDAEBackbone.from_pretrained(str(tmp_path / "sana"))
    with pytest.raises(TypeError, match="supports"):
        DDAEBackbone(make_tiny_vae())


def test_folder_without_diffusers_config(tmp_path):
    with pytest.raises(ValueError, match="no diffusers config"):
        DDAEBackbone.from_pretrained(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "text_encoder": ["a", "b"]}))
    with pytest.raises(ValueError, match="no 'unet' or 'transformer'"):
        DDAEBackbone.from_pretrained(str(tmp_path))


def test_vae_config_fixture_is_consistent():
    assert TINY_VAE_CONFIG["latent_channels"] == 4


# ---------------------------------------------------------------------------- real data
def test_real_cifar10_features(cifar_small):
    assert len(cifar_small) == 256
    pixel_values = images_to_tensor(cifar_small["img"], resolution=32)
    assert pixel_values.shape == (256, 3, 32, 32)
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    backbone = DDAEBackbone(make_tiny_unet(sample_size=32))
    feats = backbone.features(pixel_values, ["up_blocks.0.resnets.1", "mid_block"], [10], dtype=torch.bfloat16)
    for value in feats.values():
        assert value.shape[0] == 256 and torch.isfinite(value).all()
    # Real images give distinct features per image.
    assert feats["mid_block", 10].std(dim=0).mean() > 0


def test_one_trace_gives_outputs_call_order_and_modules_reached(unet_backbone):
    from ddae_diffusers.capture import trace_forward

    denoiser = unet_backbone.denoiser
    names = unet_backbone.layer_names()
    x = random_images(1)
    full = trace_forward(denoiser, x, 10, names[::-1], record_reached=True)
    assert full.order == names and not full.stopped_early  # call order, whatever order they were asked in
    assert {"conv_in", "conv_out", "mid_block"} <= full.reached
    early = trace_forward(denoiser, x, 10, ["mid_block"], stop_after="mid_block", record_reached=True)
    assert early.stopped_early and "conv_out" not in early.reached and "conv_in" in early.reached
    assert torch.equal(early.outputs["mid_block"], full.outputs["mid_block"])


class CountingHook(ModelHook):
    """A diffusers hook that counts its pre- and post-forward calls."""

    def __init__(self):
        super().__init__()
        self.pre = self.post = 0

    def pre_forward(self, module, *args, **kwargs):
        self.pre += 1
        return args, kwargs

    def post_forward(self, module, output):
        self.post += 1
        return output


def test_early_exit_is_skipped_under_diffusers_hooks():
    """An exception through a HookRegistry wrapper would skip its post_forward: then the forward runs whole."""
    layer = "up_blocks.0.resnets.0"
    images = random_images(2)
    plain = DDAEBackbone(make_tiny_unet()).features(images, [layer], [10])[layer, 10]
    hooked = make_tiny_unet()
    hook = CountingHook()
    HookRegistry.check_if_exists_or_initialize(hooked.up_blocks[0]).register_hook(hook, "count")
    features = DDAEBackbone(hooked).features(images, [layer], [10])[layer, 10]
    assert hook.pre == hook.post >= 1  # every entry through the wrapper also left it (catalogue trace + capture)
    assert torch.equal(features, plain)
    offloaded = make_tiny_unet()
    cpu = torch.device("cpu")
    offloaded.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                   num_blocks_per_group=1)
    assert torch.allclose(DDAEBackbone(offloaded).features(images, [layer], [10])[layer, 10], plain, atol=1e-6)


def test_a_family_is_one_entry():
    from ddae_diffusers.families import DENOISER_CLASSES, FAMILIES, family_named, family_of

    assert list(FAMILIES) == list(DENOISER_CLASSES) == [
        "UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel", "PixArtTransformer2DModel",
        "SD3Transformer2DModel", "FluxTransformer2DModel",
    ]  # fmt: skip
    assert family_named("Transformer2DModel") is family_of(make_tiny_dit()) is FAMILIES["DiTTransformer2DModel"]
    assert family_of(make_tiny_unet()).layer_candidates(make_tiny_unet()) == candidate_layers(make_tiny_unet())
    with pytest.raises(TypeError, match="supports UNet2DModel, DiTTransformer2DModel"):
        family_named("UNet1DModel")
