"""Generation scores on real components: torchmetrics' FID/KID code, a tiny real transformers ResNet as the feature
network, a tiny real DDAEPipeline, the embedded CIFAR-10 sample."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import CIFAR10_SAMPLE, make_tiny_unet, save_tiny_resnet
from diffusers import DDPMScheduler
from transformers import ResNetForImageClassification

from ddae_diffusers import DDAEPipeline
from ddae_diffusers.errors import UsageError
from ddae_diffusers.feature_networks import FeatureNetwork, load_feature_network
from ddae_diffusers.generation_cli import console_main
from ddae_diffusers.generation_metrics import compare_features, compare_images, features_of, score_pipeline


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> str:
    """A tiny real ResNetForImageClassification (3 labels, 16 features) with a 32x32 ViT-style image processor."""
    return save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="module")
def network(classifier_dir):
    return load_feature_network(classifier_dir)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-ddae")
    DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def pipe(pipe_dir):
    """A tiny DDAEPipeline with a counter of its denoiser's forwards (``pipe.forwards``)."""
    pipe = DDAEPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.forwards = 0

    def count(module, args, output):
        pipe.forwards += 1

    pipe.unet.register_forward_hook(count)
    return pipe


def random_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance of two feature sets written out with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU units make the covariances singular; sqrtm still converges
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# ---------------------------------------------------------------------------------------------- feature networks
def test_classifier_features_are_the_input_of_its_head(classifier_dir, network):
    """The captured vector is what the ResNet's classifier takes: its pooled output, flattened; logits follow."""
    model = ResNetForImageClassification.from_pretrained(classifier_dir).eval()
    images = random_images(4, 0, size=20)
    features = network(images)
    assert network.name.startswith("tiny-resnet")  # the folder's name
    assert network.fd_name == f"FD_{network.name}" and "FID" not in network.fd_name
    assert features.shape == (4, 16) and network.num_features == 16
    pixels = network.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)  # resized by its own processor
    with torch.no_grad():
        pooled = model.resnet(pixels).pooler_output.flatten(1)
        logits = model(pixel_values=pixels).logits
    torch.testing.assert_close(features, pooled)
    torch.testing.assert_close(model.classifier[-1](features), logits)


def test_frechet_and_kernel_distances(network):
    """FD of a set with itself is 0 and matches scipy's formula on shifted sets; KID of identical sets is ~0."""
    a, b = random_images(64, 1), random_images(64, 2)
    same = compare_images(a, a, network, kid_subset_size=32)
    assert abs(same.fd) < 1e-4 and abs(same.kid_mean) < 0.02
    darker = (a.int() // 2).to(torch.uint8)  # a shifted distribution
    shifted = compare_images(a, darker, network, kid_subset_size=32)
    fresh = compare_images(a, b, network, kid_subset_size=32)  # a second draw of the same distribution
    assert shifted.fd > 10 * max(fresh.fd, 1e-6) and shifted.kid_mean > 10 * abs(fresh.kid_mean)
    fa, fb = features_of(network, a).double().numpy(), features_of(network, darker).double().numpy()
    assert shifted.fd == pytest.approx(frechet_reference(fa, fb), rel=1e-3, abs=1e-4)
    # KID subsets are seeded: the same call gives the same numbers
    again = compare_images(a, darker, network, kid_subset_size=32)
    assert (again.kid_mean, again.kid_std) == (shifted.kid_mean, shifted.kid_std)


def test_counts_are_checked(network):
    features = torch.randn(10, 16)
    with pytest.raises(UsageError, match="at least 2"):
        compare_features(features, features[:1])
    with pytest.raises(UsageError, match="subsets of 20"):
        compare_features(features, features, kid_subset_size=20)
    with pytest.raises(UsageError, match="same D"):
        compare_features(features, torch.randn(10, 8))


# ---------------------------------------------------------------------------------------------- pipelines
def test_score_pipeline_caches_reference_features(pipe, network, tmp_path):
    cache = tmp_path / "cache"
    kwargs = dict(num_samples=6, num_inference_steps=2, feature=network, num_reference=24, kid_subset_size=4,
                  batch_size=4, cache_dir=str(cache))  # fmt: skip
    network.images_seen = 0
    first = score_pipeline(pipe, CIFAR10_SAMPLE, **kwargs)
    assert not first.reference_from_cache and network.images_seen == 24 + 6
    assert first.num_samples == 6 and first.num_reference == 24 and first.fd > 0 and np.isfinite(first.kid_mean)
    assert first.fd_name == f"FD_{network.name}" and first.as_dict()[first.fd_name] == first.fd
    (path,) = cache.iterdir()
    assert "cifar10-sample-test" in path.name and "16px" in path.name  # the pipeline's resolution

    network.images_seen = 0
    second = score_pipeline(pipe, CIFAR10_SAMPLE, **kwargs)
    assert second.reference_from_cache and network.images_seen == 6  # only the samples
    assert (second.fd, second.kid_mean) == (first.fd, first.kid_mean)  # same seed, same samples

    # other rows, another resolution: other keys, computed again
    network.images_seen = 0
    other = score_pipeline(pipe, CIFAR10_SAMPLE, **{**kwargs, "num_reference": 20})
    assert not other.reference_from_cache and network.images_seen == 20 + 6
    score_pipeline(pipe, CIFAR10_SAMPLE, **kwargs, resolution=32)
    assert len(list(cache.iterdir())) == 3


class FeatureMaps(FeatureNetwork):
    """A real (tiny) network that returns feature maps, not vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.name, self.num_features, self.fingerprint = "maps", 4, "maps"
        self.fd_name, self.kd_name = "FD_maps", "KD_maps"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=1), "at least 2"),
        (dict(num_samples=6, kid_subset_size=8), "subsets of 8"),
        (dict(num_samples=6, image_column="pixels"), "not a column"),
        (dict(num_samples=6, split="nope"), "nope"),
        (dict(num_samples=6, feature="maps"), "feature vectors"),
    ],
)
def test_bad_input_fails_before_sampling(pipe, network, kwargs, message, tmp_path):
    kwargs = {"feature": network, "num_reference": 10, "cache_dir": None, **kwargs}
    if kwargs["feature"] == "maps":
        kwargs["feature"] = FeatureMaps()
    with pytest.raises(UsageError, match=message):
        score_pipeline(pipe, CIFAR10_SAMPLE, **kwargs)
    assert pipe.forwards == 0


def test_missing_inception_is_one_line_before_sampling(pipe, monkeypatch, capsys, pipe_dir):
    """Without torch-fidelity (None in sys.modules makes its import fail even where it is installed) the default
    FID network is refused with what to do, before the pipeline samples anything."""
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(UsageError, match="torch-fidelity.*--feature_model"):
        load_feature_network(None)
    with pytest.raises(UsageError, match="torch-fidelity"):
        score_pipeline(pipe, CIFAR10_SAMPLE, num_samples=4, num_reference=10, cache_dir=None)
    assert pipe.forwards == 0
    with pytest.raises(SystemExit) as exit_info:
        console_main(["--model", pipe_dir, "--dataset", CIFAR10_SAMPLE, "--num_samples", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddae-fid: error: FID needs the Inception-v3") and "\n" not in err


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="needs torch-fidelity installed")
def test_missing_inception_weights_file(tmp_path):
    with pytest.raises(UsageError, match="--inception_weights"):
        load_feature_network(None, inception_weights=str(tmp_path / "missing.pth"))


def test_cli_writes_scores(pipe_dir, classifier_dir, tmp_path, capsys):
    output = tmp_path / "scores.json"
    console_main([
        "--model", pipe_dir, "--dataset", CIFAR10_SAMPLE, "--num_samples", "5", "--num_reference", "12",
        "--feature_model", classifier_dir, "--scheduler", "ddim", "--num_inference_steps", "2",
        "--kid_subset_size", "4", "--cache_dir", str(tmp_path / "cache"), "--output", str(output),
    ])  # fmt: skip
    name = os.path.basename(classifier_dir)
    record = json.loads(output.read_text())
    assert record["fd_name"] == f"FD_{name}" and record[f"FD_{name}"] > 0 and record["num_samples"] == 5
    assert record["scheduler"] == "ddim" and f"KD_{name}_mean" in record and "FID" not in record
    assert capsys.readouterr().out.startswith(f"FD_{name} ")

    with pytest.raises(SystemExit) as exit_info:
        console_main(["--model", pipe_dir, "--dataset", CIFAR10_SAMPLE, "--feature_model", classifier_dir,
                      "--num_samples", "5", "--kid_subset_size", "6"])
    assert exit_info.value.code == 2
    assert "--kid_subset_size 6 is more than --num_samples 5" in capsys.readouterr().err
