"""DDAEPipeline on tiny real diffusers models and real folders: loading layouts, sampling, features,
classification, save/load round trips, Hub push (HTTP faked) and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import (
    CIFAR10_SAMPLE,
    REPO_ROOT,
    TINY_DIT_CONFIG,
    FakeHub,
    make_tiny_dit,
    make_tiny_unet,
    make_tiny_vae,
    write_json,
)
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

from ddae_diffusers import DDAEForImageClassification, DDAEPipeline
from ddae_diffusers.capture import capture_activations, example_noise


def random_pixels(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def unet_pipe() -> DDAEPipeline:
    return DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler())


@pytest.fixture(scope="module")
def classifier_pipe(unet_pipe) -> DDAEPipeline:
    classifier = DDAEForImageClassification.from_diffusers(
        unet_pipe.unet, layer="mid_block", timestep=10, id2label={0: "cat", 1: "dog", 2: "ship"}
    )
    torch.manual_seed(1)
    torch.nn.init.normal_(classifier.classifier.weight, std=1.0)  # a head that separates something
    return DDAEPipeline(unet=unet_pipe.unet, scheduler=unet_pipe.scheduler, classifier=classifier)


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_matches_ddpm_and_ddim_pipelines(unet_pipe):
    unet, scheduler = unet_pipe.unet, unet_pipe.scheduler
    ours = unet_pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np").images
    ref = DDPMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=2, num_inference_steps=4, generator=torch.manual_seed(3), output_type="np"
    ).images
    assert ours.shape == (2, 16, 16, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-6)

    ddim = DDIMScheduler.from_config(scheduler.config)
    pipe = DDAEPipeline(unet=unet, scheduler=ddim)
    ours = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(4), output_type="pt").images
    ref = DDIMPipeline(unet=unet, scheduler=ddim)(
        batch_size=2, num_inference_steps=5, generator=torch.manual_seed(4), output_type="np"
    ).images
    assert ours.shape == (2, 3, 16, 16) and 0 <= ours.min() and ours.max() <= 1
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-6)


def test_sampling_output_types_and_determinism(unet_pipe):
    pil = unet_pipe(batch_size=3, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(pil) == 3 and all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in pil)
    (np_images,) = unet_pipe(batch_size=3, num_inference_steps=2, generator=torch.manual_seed(0),
                             output_type="np", return_dict=False)
    np.testing.assert_array_equal(np.asarray(pil[1]), (np_images[1] * 255).round().astype(np.uint8))
    other = unet_pipe(batch_size=3, num_inference_steps=2, generator=torch.manual_seed(1), output_type="np").images
    assert not np.allclose(np_images, other)


def test_latent_dit_sampling_matches_dit_pipeline(dit_xl_layout_dir):
    pipe = DDAEPipeline.from_pretrained(dit_xl_layout_dir)
    ours = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    # DiTPipeline without guidance, given the null class (1000): the same unconditional sampler.
    ref = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler)(
        class_labels=[1000, 1000], guidance_scale=1.0, num_inference_steps=3, generator=torch.manual_seed(0),
        output_type="np",
    ).images
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- loading
def test_dit_xl_2_256_layout_loads_and_extracts(dit_xl_layout_dir, tmp_path):
    pipe = DDAEPipeline.from_pretrained(dit_xl_layout_dir)
    assert isinstance(pipe.transformer, DiTTransformer2DModel) and pipe.unet is None
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae is not None
    assert pipe.layer_names() == ["transformer_blocks.0", "transformer_blocks.1"]
    images = random_pixels(3, size=16)
    feats = pipe.extract_features(images, layers="transformer_blocks.1", timesteps=[5, 100], seed=7)
    assert set(feats) == {("transformer_blocks.1", 5), ("transformer_blocks.1", 100)}
    # By hand: VAE mean latent * scaling factor, noised with the DDIM config's betas, null class, token mean.
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = example_noise(latents.shape[1:], range(3), seed=7)
        ddpm = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        for t in (5, 100):
            noisy = ddpm.add_noise(latents, noise, torch.full((3,), t))
            act = capture_activations(pipe.transformer, noisy, t, ["transformer_blocks.1"])["transformer_blocks.1"]
            torch.testing.assert_close(feats["transformer_blocks.1", t], act.mean(dim=1), atol=1e-5, rtol=1e-4)
    # What we save, diffusers' DiTPipeline reads back (and so do we).
    pipe.save_pretrained(tmp_path / "saved")
    dit = DiTPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(dit.transformer.pos_embed.proj.weight, pipe.transformer.pos_embed.proj.weight)
    again = DDAEPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again.extract_features(images, "transformer_blocks.1", [5, 100], seed=7), feats)


def test_ddpm_pipeline_folder_from_training_and_flat_hub_layout(tiny_unet_pipeline_dir, tmp_path):
    # A DDPMPipeline folder: what train_unconditional.py writes for a UNet.
    pipe = DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir)
    reference = UNet2DModel.from_pretrained(tiny_unet_pipeline_dir, subfolder="unet")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[key], value)
    # The model and scheduler at the repo root, next to model_index.json, as some Hub DDPM repos ship them.
    flat = tmp_path / "flat"
    reference.save_pretrained(flat)
    DDPMScheduler().save_pretrained(flat)
    write_json(flat / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": "0.0.4",
                                          "scheduler": ["diffusers", "DDPMScheduler"],
                                          "unet": ["diffusers", "UNet2DModel"]})
    flat_pipe = DDAEPipeline.from_pretrained(flat)
    images = random_pixels(2)
    a = pipe.extract_features(images, ["up_blocks.0.resnets.1"], [10])
    b = flat_pipe.extract_features(images, ["up_blocks.0.resnets.1"], [10])
    torch.testing.assert_close(a, b)


def test_bare_model_folder_and_pixel_dit_training_output(tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "bare")
    pipe = DDAEPipeline.from_pretrained(tmp_path / "bare")
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.num_train_timesteps == 1000
    # train_unconditional.py's DiT output: transformer/ + scheduler/, model_index "_class_name": "DDAEPipeline".
    out = tmp_path / "dit-run"
    make_tiny_dit().save_pretrained(out / "transformer")
    DDPMScheduler().save_pretrained(out / "scheduler")
    write_json(out / "model_index.json", {"_class_name": "DDAEPipeline", "_diffusers_version": "0.42.1",
                                         "scheduler": ["diffusers", "DDPMScheduler"],
                                         "transformer": ["diffusers", "DiTTransformer2DModel"]})
    dit = DDAEPipeline.from_pretrained(out)
    assert dit.vae is None and dit.unet is None
    images = dit(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8)
    feats = dit.extract_features(images * 2 - 1, ["transformer_blocks.0"], [10])
    assert feats["transformer_blocks.0", 10].shape == (2, 16)


def run_train_unconditional(tmp_path: Path, model_config: str, resolution: int) -> Path:
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "training" / "train_unconditional.py"), "--dataset_name", CIFAR10_SAMPLE,
           "--max_train_samples", "16", "--resolution", str(resolution), "--model_config", model_config,
           "--max_train_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--logger", "none",
           "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2", "--output_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind", ["dit", pytest.param("unet", marks=pytest.mark.slow)])
def test_train_unconditional_outputs_load(kind, tmp_path):
    if kind == "dit":
        config = tmp_path / "dit.json"
        write_json(config, {"_class_name": "DiTTransformer2DModel", **TINY_DIT_CONFIG})
        out = run_train_unconditional(tmp_path, str(config), resolution=8)
    else:
        out = run_train_unconditional(tmp_path, "ddpm-tiny", resolution=32)
    for folder in (out, out / "best-probe"):
        pipe = DDAEPipeline.from_pretrained(folder)
        assert (pipe.transformer if kind == "dit" else pipe.unet) is not None
        images = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
        layer = pipe.layer_names()[-1]
        feats = pipe.extract_features(images, [layer], [10])
        assert feats[layer, 10].shape[0] == 2 and torch.isfinite(feats[layer, 10]).all()


# ---------------------------------------------------------------------------------------------- features
def test_features_from_pil_numpy_and_tensors_agree(unet_pipe):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    pil = [PIL.Image.fromarray(a) for a in arrays]
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    layers, steps = ["down_blocks.1", "up_blocks.1.resnets.1"], [0, 10]
    from_tensor = unet_pipe.extract_features(tensors, layers, steps)
    for other in (pil, arrays, list(arrays), arrays.astype(np.float32) / 255):
        torch.testing.assert_close(unet_pipe.extract_features(other, layers, steps), from_tensor)
    # Batching does not change the noise of an image, so not its features either.
    torch.testing.assert_close(unet_pipe.extract_features(tensors, layers, steps, batch_size=2), from_tensor)
    single = unet_pipe.extract_features(tensors[0], layers, steps)
    torch.testing.assert_close(single["down_blocks.1", 10], from_tensor["down_blocks.1", 10][:1])
    raw = unet_pipe.extract_features(tensors, ["mid_block"], [10], pooling=None)
    assert raw["mid_block", 10].shape == (5, 32, 8, 8)
    assert unet_pipe.extract_features(tensors, ["mid_block"], [10], seed=1)["mid_block", 10].ne(
        unet_pipe.extract_features(tensors, ["mid_block"], [10], seed=0)["mid_block", 10]).any()


def test_scheduler_swap_keeps_features(unet_pipe):
    images = random_pixels(2)
    before = unet_pipe.extract_features(images, ["mid_block"], [10, 500])
    pipe = DDAEPipeline(unet=unet_pipe.unet, scheduler=DDIMScheduler.from_config(unet_pipe.scheduler.config))
    pipe.scheduler.set_timesteps(7)  # a sampler's state must not change the forward process
    torch.testing.assert_close(pipe.extract_features(images, ["mid_block"], [10, 500]), before)


def test_real_cifar10_images(cifar_small):
    """A tiny 32px UNet on 64 real CIFAR-10 images (the 35.7M layout test below also reads real images)."""
    pipe = DDAEPipeline(unet=make_tiny_unet(sample_size=32))
    images = cifar_small["img"][:64]
    feats = pipe.extract_features(images, ["up_blocks.0.resnets.1", "mid_block"], [10], batch_size=24)
    x = feats["up_blocks.0.resnets.1", 10]
    assert x.shape == (64, 32) and torch.isfinite(x).all()
    assert x.std(dim=0).min() > 0  # every channel varies across real images
    # PIL images from the data set and the same pixels as a [-1, 1] tensor give the same features.
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    torch.testing.assert_close(pipe.extract_features(pixels, ["up_blocks.0.resnets.1"], [10])[
        "up_blocks.0.resnets.1", 10], x)


# ---------------------------------------------------------------------------------------------- classify
def test_classify_matches_classifier(classifier_pipe):
    images = random_pixels(6, seed=2)
    out = classifier_pipe.classify(images)
    logits = classifier_pipe.classifier(pixel_values=images).logits
    torch.testing.assert_close(out.logits, logits)
    assert out.label_ids.tolist() == logits.argmax(-1).tolist()
    assert out.labels == [["cat", "dog", "ship"][i] for i in out.label_ids]
    torch.testing.assert_close(out.scores, logits.softmax(-1).max(-1).values)
    pil = [PIL.Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
           for im in images]
    assert classifier_pipe.classify(pil).labels == classifier_pipe.classify(
        torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) / 127.5 - 1 for p in pil])).labels
    # Defaults of extract_features come from the classifier: its layer and timestep.
    feats = classifier_pipe.extract_features(images)
    assert list(feats) == [("mid_block", 10)]


# ---------------------------------------------------------------------------------------------- save / load
def test_round_trip_without_classifier_and_ddpm_pipeline_reads_it(unet_pipe, tmp_path):
    pipe = DDAEPipeline(unet=unet_pipe.unet, scheduler=DDIMScheduler.from_config(unet_pipe.scheduler.config))
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "DDAEPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    card = (tmp_path / "p" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and "ddae" in meta["tags"]

    loaded = DDAEPipeline.from_pretrained(tmp_path / "p")
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.classifier is None
    images = random_pixels(2)
    torch.testing.assert_close(loaded.extract_features(images, ["mid_block"], [10]),
                               pipe.extract_features(images, ["mid_block"], [10]))
    ddpm = DDPMPipeline.from_pretrained(tmp_path / "p")
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(ddpm.unet.state_dict()[key], value)
    # A README already there (e.g. a training card) is kept.
    (tmp_path / "p" / "README.md").write_text("my card")
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "README.md").read_text() == "my card"


def test_round_trip_with_classifier_in_a_fresh_process(classifier_pipe, tmp_path):
    folder = tmp_path / "with-classifier"
    classifier_pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["classifier"] == ["ddae_diffusers.modeling_ddae", "DDAEForImageClassification"]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(folder / "classifier"))
    images = random_pixels(4, seed=5)
    expected = classifier_pipe.classify(images)
    loaded = DDAEPipeline.from_pretrained(folder)
    torch.testing.assert_close(loaded.classify(images).logits, expected.logits)
    # diffusers 0.42 resolves custom components only from sys.modules: `import ddae_diffusers` must suffice.
    np.save(tmp_path / "images.npy", images.numpy())
    script = (
        "import sys, numpy, torch\nfrom ddae_diffusers import DDAEPipeline\n"
        "pipe = DDAEPipeline.from_pretrained(sys.argv[1])\n"
        "out = pipe.classify(torch.from_numpy(numpy.load(sys.argv[2])))\n"
        "print(type(pipe.classifier).__name__, ','.join(out.labels))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "images.npy")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "DDAEForImageClassification " + ",".join(expected.labels)


def test_classifier_from_a_separate_export(classifier_pipe, unet_pipe, tmp_path):
    classifier_pipe.classifier.save_pretrained(tmp_path / "export")
    pipe_dir = tmp_path / "pipe"
    unet_pipe.save_pretrained(pipe_dir)
    pipe = DDAEPipeline.from_pretrained(pipe_dir, classifier=str(tmp_path / "export"))
    images = random_pixels(3)
    torch.testing.assert_close(pipe.classify(images).logits, classifier_pipe.classify(images).logits)


def test_classifier_from_a_probe_result_folder(tiny_unet_pipeline_dir, cifar_small, tmp_path):
    from ddae_diffusers.probing.engine import ProbeConfig, run_probe

    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path / "probe"),
                         max_train_samples=64, max_eval_samples=32, layers=["mid_block"], timesteps=[10],
                         epochs=2, lrs=[1e-2])
    run_probe(config, progress=False)
    pipe = DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir, classifier=str(tmp_path / "probe"))
    assert pipe.classifier.config.feature_layer == "mid_block" and pipe.classifier.config.num_labels == 10
    images = cifar_small["img"][:8]
    out = pipe.classify(images)
    reference = DDAEForImageClassification.from_probe(tmp_path / "probe")
    pixels = pipe.preprocess(images, image_size=16)
    torch.testing.assert_close(out.logits, reference(pixel_values=pixels).logits)
    assert set(out.labels) <= set(cifar_small.features["label"].names)


def test_push_to_hub_uploads_folder_with_card(classifier_pipe, tmp_path):
    hub = FakeHub(tmp_path / "hub")
    with hub.patch():
        url = classifier_pipe.push_to_hub("me/ddae-tiny")
        classifier_pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/ddae-local")
    assert [c["repo_id"] for c in hub.commits] == ["me/ddae-tiny", "me/ddae-local"]
    files = {p: str(hub.commits[0]["folder"] / p) for p in hub.commits[0]["paths"]}
    files["README.md"] = Path(files["README.md"]).read_text()
    uploaded = {p: str(hub.commits[1]["folder"] / p) for p in hub.commits[1]["paths"]}
    uploaded["README.md"] = Path(uploaded["README.md"]).read_text()
    assert set(uploaded) == set(files) and 'from_pretrained("me/ddae-local")' in uploaded["README.md"]
    assert (tmp_path / "local" / "README.md").is_file()
    uploaded = files
    assert url.startswith("https://huggingface.co/me/ddae-tiny")
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "classifier/config.json", "classifier/model.safetensors",
            "README.md"} <= set(uploaded)
    card = uploaded["README.md"]
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-classification"
    assert {"ddae", "UNet2DModel"} <= set(meta["tags"])
    assert 'DDAEPipeline.from_pretrained("me/ddae-tiny")' in card and "mid_block" in card


# ---------------------------------------------------------------------------------------------- docs
def _doctest_code(text: str) -> list[tuple[str, str | None]]:
    """(source, expected output) pairs of a ``>>>`` example."""
    import doctest

    examples = doctest.DocTestParser().get_examples(text)
    return [(ex.source, ex.want.split("```")[0].strip() or None) for ex in examples]


def write_ddpm_cifar10_32_layout(folder: Path, **overrides) -> str:
    """The google/ddpm-cifar10-32 layout and configs (random weights); ``overrides`` shrink the UNet."""
    from ddae_diffusers.presets import PRESETS

    config = {**{k: v for k, v in PRESETS["ddpm-cifar10-32"].items() if k != "dropout"}, **overrides}
    torch.manual_seed(0)
    UNet2DModel.from_config(config).save_pretrained(folder / "unet")
    write_json(folder / "unet" / "config.json", {**config, "_diffusers_version": "0.0.4"})
    write_json(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
        "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
        "trained_betas": None, "variance_type": "fixed_large"})
    write_json(folder / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": "0.0.4",
                                             "scheduler": ["diffusers", "DDPMScheduler"],
                                             "unet": ["diffusers", "UNet2DModel"]})
    return str(folder)


@pytest.fixture(scope="module")
def ddpm_cifar10_32_dir(tmp_path_factory) -> str:
    """The exact google/ddpm-cifar10-32 configs: 35.7M random weights."""
    return write_ddpm_cifar10_32_layout(tmp_path_factory.mktemp("ddpm-cifar10-32"))


@pytest.fixture(scope="module")
def ddpm_cifar10_32_small_dir(tmp_path_factory) -> str:
    """The same layout, block types and layer names with narrow channels (1.5M), for fast example runs."""
    return write_ddpm_cifar10_32_layout(tmp_path_factory.mktemp("ddpm-cifar10-32-small"),
                                        block_out_channels=[32, 64, 64, 64], norm_num_groups=16)


def test_ddpm_cifar10_32_layout_and_docstring_example(ddpm_cifar10_32_dir, cifar_small, tmp_path):
    pipe = DDAEPipeline.from_pretrained(ddpm_cifar10_32_dir)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 35_746_307
    assert pipe.backbone.layer_info("up_blocks.1.resnets.2").shape == (256, 8, 8)  # the paper's out_6
    feats = pipe.extract_features(cifar_small["img"][:8], ["up_blocks.1.resnets.2"], [10])
    assert feats["up_blocks.1.resnets.2", 10].shape == (8, 256)
    # diffusers' own DDPMPipeline reads what we save.
    pipe.save_pretrained(tmp_path / "saved")
    ddpm = DDPMPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(ddpm.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert ddpm.scheduler.config.variance_type == "fixed_large"

    # The __call__ docstring example, pointed at this local copy of the google/ddpm-cifar10-32 layout.
    namespace: dict = {}
    for source, want in _doctest_code(DDAEPipeline.__call__.__doc__):
        source = source.replace('"google/ddpm-cifar10-32"', repr(ddpm_cifar10_32_dir))
        if want is None:
            exec(source, namespace)
        else:
            assert repr(eval(source, namespace)) == want.strip()
    assert len(namespace["images"]) == 2


def run_readme_pipeline_example(model_dir: str, cwd: Path) -> None:
    """Runs the two code blocks of docs/pipeline.md as written, with the Hub id -> ``model_dir``."""
    section = (REPO_ROOT / "docs" / "pipeline.md").read_text()
    blocks = [block.split("```")[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    namespace: dict = {}
    os.chdir(cwd)
    exec(compile(blocks[0].replace('"google/ddpm-cifar10-32"', repr(model_dir)), "README 1", "exec"), namespace)
    pipe = namespace["pipe"]
    width = pipe.backbone.layer_info("up_blocks.1.resnets.2").feature_dim
    assert namespace["feats"]["up_blocks.1.resnets.2", 10].shape == (4, width)
    assert (cwd / "ddae-cifar10" / "README.md").is_file()
    # The classifier folder the second block names: an export on the same UNet.
    DDAEForImageClassification.from_diffusers(pipe.unet, layer="up_blocks.1.resnets.2", timestep=10,
                                              id2label={i: f"class{i}" for i in range(10)}).save_pretrained(
        "ddae-cifar10-classifier")
    exec(compile(blocks[1], "README 2", "exec"), namespace)
    assert len(namespace["out"].labels) == 4
    assert (cwd / "ddae-cifar10-with-classifier" / "classifier" / "model.safetensors").is_file()


def test_readme_pipeline_example_runs(ddpm_cifar10_32_small_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_readme_pipeline_example(ddpm_cifar10_32_small_dir, tmp_path)


@pytest.mark.slow
def test_readme_pipeline_example_runs_on_the_exact_config(ddpm_cifar10_32_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_readme_pipeline_example(ddpm_cifar10_32_dir, tmp_path)


# ---------------------------------------------------------------------------------------------- errors
def test_constructor_errors(unet_pipe):
    with pytest.raises(ValueError, match="exactly one denoiser, got neither"):
        DDAEPipeline(scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="got both"):
        DDAEPipeline(unet=unet_pipe.unet, transformer=make_tiny_dit())
    with pytest.raises(TypeError, match="unet must be a UNet, got DiTTransformer2DModel: pass it as transformer="):
        DDAEPipeline(unet=make_tiny_dit())
    with pytest.raises(TypeError, match="must be a DDAEForImageClassification"):
        DDAEPipeline(unet=unet_pipe.unet, classifier=torch.nn.Linear(32, 3))
    with pytest.raises(TypeError, match="Unsupported denoiser AutoencoderKL"):
        DDAEPipeline(unet=make_tiny_vae())


def test_loading_errors(tmp_path, classifier_pipe):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a folder"):
        DDAEPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a folder"):
        DDAEPipeline.from_pretrained(tmp_path / "empty", classifier=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither model_index.json nor config.json"):
        DDAEPipeline.from_pretrained(tmp_path / "empty")
    # Refused from model_index.json alone, before any weight is read (there are none here).
    write_json(tmp_path / "sana" / "model_index.json", {"_class_name": "SanaPipeline",
                                                        "transformer": ["diffusers", "SanaTransformer2DModel"],
                                                        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]})
    with pytest.raises(TypeError, match="SanaTransformer2DModel transformer; DDAEPipeline supports UNet2DModel"):
        DDAEPipeline.from_pretrained(tmp_path / "sana")
    write_json(tmp_path / "two" / "model_index.json", {"unet": ["diffusers", "UNet2DModel"],
                                                       "transformer": ["diffusers", "DiTTransformer2DModel"]})
    with pytest.raises(ValueError, match="names unet and transformer"):
        DDAEPipeline.from_pretrained(tmp_path / "two")
    write_json(tmp_path / "vq" / "config.json", {"_class_name": "VQModel"})
    with pytest.raises(TypeError, match="holds a VQModel model"):
        DDAEPipeline.from_pretrained(tmp_path / "vq")
    classifier_pipe.classifier.save_pretrained(tmp_path / "export")
    with pytest.raises(TypeError, match="classifier="):
        DDAEPipeline.from_pretrained(tmp_path / "export")


def test_input_errors(unet_pipe):
    with pytest.raises(ValueError, match="has no classifier"):
        unet_pipe.classify(random_pixels(1))
    with pytest.raises(ValueError, match="images are 32x32 but the model takes 16x16"):
        unet_pipe.extract_features(random_pixels(2, size=32), ["mid_block"], [10])
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        unet_pipe.extract_features(random_pixels(2) * 3, ["mid_block"], [10])
    with pytest.raises(ValueError, match="Unknown layer 'mid_blok'.*Did you mean mid_block"):
        unet_pipe.extract_features(random_pixels(2), ["mid_blok"], [10])
    with pytest.raises(ValueError, match="out of range"):
        unet_pipe.extract_features(random_pixels(2), ["mid_block"], [1000])
    with pytest.raises(ValueError, match="Pass layers= and timesteps="):
        unet_pipe.extract_features(random_pixels(2))
    with pytest.raises(ValueError, match="output_type must be one of"):
        unet_pipe(output_type="latent")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        unet_pipe(batch_size=0)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer in 1..1000"):
        unet_pipe(num_inference_steps=2000)
    flow = DDAEPipeline(unet=unet_pipe.unet, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="integer, but this is a flow-matching model"):
        flow.extract_features(random_pixels(1), ["mid_block"], [10])
    sde = DDAEPipeline(unet=unet_pipe.unet, scheduler=ScoreSdeVeScheduler())
    with pytest.raises(TypeError, match="defines no beta schedule"):
        sde.extract_features(random_pixels(1), ["mid_block"], [10])


def test_classify_wrong_size(classifier_pipe):
    with pytest.raises(ValueError, match="images are 8x8 but the model takes 16x16"):
        classifier_pipe.classify(random_pixels(2, size=8))
