"""Pictures of the features (ddae_diffusers.visualize) on tiny real models of every family and on the shipped
reference classifier: PCA maps fitted jointly, self-correspondence, neighbours from the probe's feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR10_SAMPLE, REPO_ROOT
from hub_layouts import LAYOUTS, RESOLUTIONS
from PIL import Image

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import load_split, pixels_of
from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.cli import main as probe_main
from ddae_diffusers.visualize import (
    correspondences,
    dataset_features,
    fit_pca,
    load_model,
    nearest_neighbours,
    pca_maps,
)

LINEAR_CLASSIFIER = str(REPO_ROOT / "examples" / "ddae-cifar10-cpu-linear")


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def unet(tiny_unet_pipeline_dir) -> DDAEBackbone:
    return DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)


@pytest.fixture(scope="module")
def train40():
    """The first 40 training images of the embedded sample, loaded as ddae-probe loads them."""
    return load_split(CIFAR10_SAMPLE, "train", 40)


def test_fit_pca_gives_the_principal_axes():
    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator))[0]
    x = (torch.randn(500, 6, generator=generator) * torch.tensor([5.0, 3.0, 2.0, 0.5, 0.3, 0.1])) @ rotation + 7
    mean, axes = fit_pca(x)
    torch.testing.assert_close(mean, x.mean(0))
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    # the top three right singular vectors, in order, up to sign; signed by their largest entry
    torch.testing.assert_close((axes.T @ vh[:3].T).abs(), torch.eye(3), atol=1e-4, rtol=0)
    assert (axes.gather(0, axes.abs().argmax(0, keepdim=True)) > 0).all()


def test_pca_maps_are_fitted_jointly_over_the_images(unet):
    a, b = pixels(2, 16, seed=1)
    batch = torch.stack([a, b, a])
    layers, levels = ["down_blocks.1.resnets.0", "up_blocks.1.resnets.0"], [0, 100]
    maps = pca_maps(unet, batch, layers, levels, seed=3)
    assert isinstance(maps.figure, Image.Image) and maps.figure.width > maps.figure.height
    dense = unet.features(batch, layers, levels, pooling="spatial", seed=3, example_ids=[0, 0, 0])
    for layer in layers:
        for level in levels:
            rgb = maps.rgb[layer, level]
            c, h, w = dense[layer, level].shape[1:]
            assert rgb.shape == (3, h, w, 3) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
            np.testing.assert_array_equal(rgb[0], rgb[2])  # identical images, identical maps
            assert np.abs(rgb[0] - rgb[1]).mean() > 0.05
            # one projection for all images of the cell: recomputed from the returned mean, axes and range
            cell = (layer, level)
            vectors = dense[layer, level].permute(0, 2, 3, 1).reshape(-1, c)
            scaled = ((vectors - maps.mean[cell]) @ maps.components[cell] - maps.low[cell]) / (
                maps.high[cell] - maps.low[cell])
            np.testing.assert_allclose(scaled.clamp(0, 1).reshape(3, h, w, 3).numpy(), rgb, atol=1e-4)
    # the fit depends on every image of the batch: a alone gets other colours than a next to b
    alone = pca_maps(unet, a[None], layers[:1], levels[:1], seed=3, figure=False)
    assert not np.allclose(alone.rgb[layers[0], 0][0], maps.rgb[layers[0], 0][0], atol=1e-3)


def test_correspondence_of_an_image_with_itself_is_the_identity(unet):
    image = pixels(1, 16, seed=2)[0]
    points = np.array([[x, y] for x in (0, 5, 11, 15) for y in (1, 8, 14)])
    result = correspondences(unet, image, image, points, "up_blocks.1.resnets.0", 10, ensemble=2)
    np.testing.assert_array_equal(result.points_b, points)
    np.testing.assert_allclose(result.similarities, 1.0, atol=1e-5)
    assert result.maps.shape == (len(points), 16, 16) and isinstance(result.figure, Image.Image)
    # another image: the matches are the argmax of the returned similarity maps
    other = correspondences(unet, image, pixels(1, 16, seed=5)[0], points[:1], "up_blocks.1.resnets.0", 10)
    x, y = other.points_b[0]
    assert other.maps[0][y, x] == other.maps[0].max() == pytest.approx(other.similarities[0])


def test_neighbours_of_training_images_include_themselves(unet, train40):
    rows = [3, 17, 30]
    queries = [train40[r]["img"] for r in rows]
    result = nearest_neighbours(unet, queries, train40, "mid_block", 10, k=4, query_ids=rows)
    assert result.source == "computed" and result.indices.shape == result.similarities.shape == (3, 4)
    assert result.indices[:, 0].tolist() == rows
    np.testing.assert_allclose(result.similarities[:, 0], 1.0, atol=1e-5)
    assert (np.diff(result.similarities, axis=1) <= 1e-6).all()  # best first
    assert result.pixel_indices[:, 0].tolist() == rows  # the raw-pixel baseline finds them too
    np.testing.assert_allclose(result.pixel_similarities[:, 0], 1.0, atol=1e-5)
    assert result.label_names[result.labels[rows[0]]] in {"airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck"}
    assert isinstance(result.figure, Image.Image)
    bank, _ = dataset_features(unet, train40, "mid_block", 10)
    given = nearest_neighbours(unet, queries, train40, "mid_block", 10, k=4, query_ids=rows, bank=bank, figure=False)
    assert given.source == "given"
    np.testing.assert_array_equal(given.indices, result.indices)
    np.testing.assert_array_equal(given.pixel_indices, result.pixel_indices)
    with pytest.raises(UsageError, match="bank must be the"):
        nearest_neighbours(unet, queries, train40, "mid_block", 10, bank=bank[:5])
    pixels_only = nearest_neighbours(unet, queries, train40, k=2, space="pixels", figure=False)
    assert pixels_only.source == "pixels" and pixels_only.indices[:, 0].tolist() == rows


def test_neighbours_read_the_probe_feature_cache(tiny_unet_pipeline_dir, unet, train40, tmp_path):
    cache = tmp_path / "cache"
    probe_main([
        "--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--max_train_samples", "40",
        "--max_eval_samples", "20", "--layers", "mid_block", "up_blocks.1.resnets.0", "--timesteps", "10",
        "--epochs", "1", "--lrs", "0.01", "--output_dir", str(tmp_path / "probe"), "--cache_dir", str(cache),
    ])  # fmt: skip
    before = sorted(p.name for p in cache.iterdir())
    queries = [train40[r]["img"] for r in (5, 9)]
    cached = nearest_neighbours(unet, queries, train40, "up_blocks.1.resnets.0", 10, k=5, query_ids=[5, 9],
                                cache_dir=str(cache), figure=False)  # fmt: skip
    computed = nearest_neighbours(unet, queries, train40, "up_blocks.1.resnets.0", 10, k=5, query_ids=[5, 9],
                                  figure=False)  # fmt: skip
    assert cached.source == "cache" and computed.source == "computed"
    assert sorted(p.name for p in cache.iterdir()) == before  # read only
    assert cached.indices[:, 0].tolist() == [5, 9]
    np.testing.assert_allclose(cached.similarities, computed.similarities, atol=2e-3)  # float16 in the cache
    # a level the probe did not extract is computed, stored as a unit, then read back from it
    bank, source = dataset_features(unet, train40, "mid_block", 100, cache_dir=str(cache))
    again, source_again = dataset_features(unet, train40, "mid_block", 100, cache_dir=str(cache))
    assert (source, source_again) == ("computed", "cache")
    assert bank.shape == (40, unet.layer_info("mid_block").shape[0])
    torch.testing.assert_close(again, bank)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("visualize-layouts")
    return {name: write(root / name) for name, write in LAYOUTS.items()}


@pytest.mark.parametrize("name", [*LAYOUTS, "pixel_dit"])
def test_every_family(name, request, train40):
    if name == "pixel_dit":
        folder, size = request.getfixturevalue("tiny_dit_pipeline_dir"), 8
    else:
        folder, size = request.getfixturevalue("layouts")[name], RESOLUTIONS[name]
    backbone = DDAEBackbone.from_pretrained(folder)
    layer, level = backbone.layer_names()[0], backbone.noise_axis.default_probe_level()
    x = pixels(2, size, seed=4)
    maps = pca_maps(backbone, torch.cat([x, x[:1]]), [layer], [level])
    grid = backbone.features(x, [layer], [level], pooling="spatial")[layer, level].shape[-2:]
    assert maps.rgb[layer, level].shape == (3, *grid, 3)  # token families: their token grid
    # identical images, the same map (up to the float rounding of batched attention kernels)
    np.testing.assert_allclose(maps.rgb[layer, level][0], maps.rgb[layer, level][2], atol=1e-6)
    points = np.array([[0, 0], [size // 2, size // 3], [size - 1, size - 1]])
    same = correspondences(backbone, x[0], x[0], points, layer, level)
    np.testing.assert_allclose(same.similarities, 1.0, atol=1e-5)
    # each point's own pixel is a best match (bilinear upsampling of a coarser grid repeats the border values, so
    # a neighbour may tie with it); at the token grid's resolution the match is exact
    for i, (x_a, y_a) in enumerate(points):
        assert same.maps[i][y_a, x_a] == pytest.approx(same.maps[i].max(), abs=1e-6)
    bank = train40.select(range(8))
    query = [bank[2]["img"]] if backbone.image_size else pixels_of([bank[2]["img"]], size)
    near = nearest_neighbours(backbone, query, bank, layer, level, k=3, query_ids=[2], figure=False)
    assert near.indices[0, 0] == 2 and near.similarities[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_classifier_folder_predicts_and_draws(train40):
    model = load_model(LINEAR_CLASSIFIER)
    assert model.classifier is not None and model.backbone.layer_names()[-1] == "mid_block.resnets.1"
    images = [train40[r]["img"] for r in range(4)]
    predictions = model.predict(images, top=3)
    assert len(predictions) == 4 and all(len(p) == 3 for p in predictions)
    for top in predictions:
        probabilities = [p for _, p in top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    maps = pca_maps(model.backbone, images[:2], ["down_blocks.1.resnets.0", "mid_block.resnets.1"], [0, 10])
    assert maps.rgb["mid_block.resnets.1", 10].shape == (2, 8, 8, 3)
    with pytest.raises(UsageError, match="Unknown layer 'up_blocks.0.resnets.0'"):
        pca_maps(model.backbone, images[:1], ["up_blocks.0.resnets.0"], [0])  # pruned in the classifier
    plain = load_model(str(REPO_ROOT / "examples" / "ddae-cifar10-cpu"))
    assert plain.classifier is None and "up_blocks.2.resnets.1" in plain.backbone.layer_names()
    with pytest.raises(UsageError, match="is not a classifier"):
        plain.predict(images[:1])


def count_forwards(backbone: DDAEBackbone) -> list[int]:
    calls = [0]
    backbone.denoiser.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda b, d: pca_maps(b, pixels(1, 16), ["up_blocks.9"], [10]), "Unknown layer 'up_blocks.9'"),
        (lambda b, d: pca_maps(b, pixels(1, 16) * 3, None, [10]), r"must be in \[-1, 1\]"),
        (lambda b, d: pca_maps(b, pixels(1, 16), None, [5000]), "5000"),
        (lambda b, d: pca_maps(b, ["not an image"], None, [10]), "must be PIL images"),
        (lambda b, d: pca_maps(b, pixels(1, 16), None, [10], ensemble=0), "ensemble must be an integer >= 1"),
        (lambda b, d: correspondences(b, pixels(1, 16)[0], pixels(1, 16)[0], [[16, 0]]), "must lie in the 16x16"),
        (lambda b, d: correspondences(b, pixels(1, 16)[0], pixels(1, 16)[0], [1, 2]), r"\(P, 2\) array"),
        (lambda b, d: nearest_neighbours(b, pixels(1, 16), d, k=41), "at most 40"),
        (lambda b, d: nearest_neighbours(b, pixels(1, 16), d, space="clip"), "Unknown space 'clip'"),
        (lambda b, d: nearest_neighbours(b, pixels(2, 16), d, query_ids=[1]), "1 query_ids for 2 queries"),
        (lambda b, d: nearest_neighbours(b, pixels(1, 16), [1, 2]), "datasets.Dataset"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_forward(call, match, unet, train40):
    unet.layer_names()  # the catalogue is traced once per backbone, before
    calls = count_forwards(unet)
    with pytest.raises(UsageError, match=match) as error:
        call(unet, train40)
    assert "\n" not in str(error.value) and calls[0] == 0


def test_load_model_refuses_what_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UsageError):
        load_model(str(tmp_path))
    with pytest.raises(UsageError, match="is not a folder"):
        load_model(str(Path(tmp_path) / "missing" / "deeper" / "folder"))
    with pytest.raises(UsageError, match="Give a model folder"):
        load_model(" ")
