"""Probe engine: heads, kNN, the resumable feature cache, the grid CLI, bad inputs, 2-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import CIFAR10_SAMPLE, REPO_ROOT, make_tiny_unet
from PIL import Image

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import images_to_tensor
from ddae_diffusers.probing.baselines import pixel_features, random_init
from ddae_diffusers.probing.cache import FeatureCache, View
from ddae_diffusers.probing.cli import main as probe_main
from ddae_diffusers.probing.engine import ProbeConfig, run_probe
from ddae_diffusers.probing.heads import (
    PAPER_RECIPE,
    ProbeRecipe,
    linear_probe_accuracy,
    train_heads,
)
from ddae_diffusers.probing.knn import knn_accuracy, knn_predict
from ddae_diffusers.probing.report import load_heads
from ddae_diffusers.probing.stats import unpack_correct

LAYERS = ["mid_block.resnets.1", "up_blocks.0.resnets.1", "up_blocks.1.resnets.1"]


def separable(num: int, dim: int = 48, classes: int = 5, seed: int = 0):
    """Gaussian blobs around well-separated centres, badly scaled per dimension."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.randint(0, classes, (num,), generator=g)
    x = centres[y] + 0.5 * torch.randn(num, dim, generator=g)
    return x * (torch.rand(dim, generator=g) * 50 + 0.1) + 20, y


# ------------------------------------------------------------------ heads and kNN
def test_linear_probe_accuracy_on_separable_features():
    x, y = separable(1200)
    assert linear_probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], epochs=20) >= 0.99


def test_grid_heads_on_separable_features_choose_lr_on_validation():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (1200,), generator=g)
    feats = {}
    for i in range(3):
        for t in (1, 2):
            centres = torch.randn(5, 16 * (i + 1), generator=g) * 4
            feats[f"layer{i}", t] = centres[y] + 0.5 * torch.randn(len(y), centres.shape[1], generator=g)
    train = {k: v[:900] for k, v in feats.items()}
    val = {k: v[900:1000] for k, v in feats.items()}
    test = {k: v[1000:] for k, v in feats.items()}
    recipe = ProbeRecipe(lrs=(1e-4, 1e-3, 1e-2), epochs=10)
    fits = train_heads(train, y[:900], 5, recipe, val, y[900:1000], seed=0)
    assert set(fits) == set(feats)
    for key, fit in fits.items():
        assert fit.head.accuracy(test[key], y[1000:]) >= 0.99
        assert len(fit.val_accs) == 3 and fit.val_acc == max(fit.val_accs)
        assert fit.lr == recipe.lrs[fit.val_accs.index(fit.val_acc)]
        assert fit.head.weight.shape == (5, train[key].shape[1]) and fit.head.mean.shape == (train[key].shape[1],)
    with pytest.raises(ValueError, match="validation"):
        train_heads(train, y[:900], 5, recipe)
    raw = train_heads(train, y[:900], 5, PAPER_RECIPE)
    assert all(fit.head.mean is None and fit.val_acc is None for fit in raw.values())


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, bank_y = torch.randn(200, 12, generator=g), torch.randint(0, 4, (200,), generator=g)
    query, query_y = torch.randn(50, 12, generator=g), torch.randint(0, 4, (50,), generator=g)
    expected = []
    for q in query:
        sims = [float(torch.dot(q, b) / (q.norm() * b.norm())) for b in bank]
        nearest = sorted(range(len(bank)), key=lambda i: -sims[i])[:20]
        votes = [0.0] * 4
        for i in nearest:
            votes[int(bank_y[i])] += float(np.exp(sims[i] / 0.07))
        expected.append(int(np.argmax(votes)))
    predicted = knn_predict(bank, bank_y, query, 4, chunk_size=7)
    assert predicted.tolist() == expected
    assert knn_accuracy(bank, bank_y, query, query_y) == pytest.approx(
        float(np.mean(np.array(expected) == query_y.numpy()))
    )


# ------------------------------------------------------------------ feature cache
@pytest.fixture(scope="module")
def backbone():
    return DDAEBackbone(make_tiny_unet())


@pytest.fixture(scope="module")
def cifar24(cifar_small):
    return cifar_small.select(range(24))


def _extract(backbone, dataset, cache_dir, view=None, on_batch=None):
    view = view or View(0, 0, True)
    cache = FeatureCache(str(cache_dir), backbone, LAYERS, [10, 100], resolution=16, seed=3)
    return dict(cache.extract(dataset, "train", "img", view, batch_size=8, on_batch=on_batch, progress=False))


def test_cache_resume_after_interruption_is_identical(backbone, cifar24, tmp_path):
    reference = _extract(backbone, cifar24, tmp_path / "reference")
    assert set(reference) == {(layer, t) for layer in LAYERS for t in (10, 100)}
    assert all(v.dtype == torch.float16 and v.shape[0] == 24 for v in reference.values())

    written = []

    def interrupt(start, stop):
        written.append((start, stop))
        if len(written) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(backbone, cifar24, tmp_path / "resumed", on_batch=interrupt)
    resumed_batches = []
    resumed = _extract(backbone, cifar24, tmp_path / "resumed", on_batch=lambda a, b: resumed_batches.append((a, b)))
    assert resumed_batches == [(8, 16), (16, 24)]  # only what was missing
    for key in reference:
        assert torch.equal(reference[key], resumed[key])
    # a complete cache is reused without any forward
    again = []
    _extract(backbone, cifar24, tmp_path / "resumed", on_batch=lambda a, b: again.append((a, b)))
    assert again == []
    # a different view gets different features (fresh noise and crops)
    other = _extract(backbone, cifar24, tmp_path / "resumed", view=View(0, 1, True))
    assert not torch.equal(other[LAYERS[0], 10], reference[LAYERS[0], 10])


def test_cache_corruption_and_truncation_are_recomputed(backbone, cifar24, tmp_path):
    reference = _extract(backbone, cifar24, tmp_path)
    unit = next(p for p in sorted(os.listdir(tmp_path)) if "-t10-" in p)
    array_path = tmp_path / unit / "features.npy"

    row_bytes = np.load(array_path, mmap_mode="r").shape[1] * 2
    data = bytearray(array_path.read_bytes())
    offset = len(data) - 2 * row_bytes  # row 22, in the last batch
    data[offset : offset + 8] = b"\x7f" * 8
    array_path.write_bytes(bytes(data))
    recomputed = []
    repaired = _extract(backbone, cifar24, tmp_path, on_batch=lambda a, b: recomputed.append((a, b)))
    assert recomputed == [(16, 24)]
    for key in reference:
        assert torch.equal(reference[key], repaired[key])

    with open(array_path, "r+b") as f:
        f.truncate(os.path.getsize(array_path) // 2)
    recomputed.clear()
    repaired = _extract(backbone, cifar24, tmp_path, on_batch=lambda a, b: recomputed.append((a, b)))
    assert recomputed == [(0, 8), (8, 16), (16, 24)]
    for key in reference:
        assert torch.equal(reference[key], repaired[key])

    (tmp_path / unit / "progress.jsonl").write_text("{not json\n")
    recomputed.clear()
    _extract(backbone, cifar24, tmp_path, on_batch=lambda a, b: recomputed.append((a, b)))
    assert len(recomputed) == 3


def strip_logistic(cell) -> dict:
    return {name: value for name, value in asdict(cell).items() if not name.startswith("logistic")}


# ------------------------------------------------------------------ the grid end to end
PROBE_ARGS = [
    "--dataset", CIFAR10_SAMPLE, "--max_train_samples", "120", "--max_eval_samples", "60",
    "--layers", *LAYERS, "--timesteps", "10", "100", "--batch_size", "32", "--epochs", "8",
    "--lrs", "0.001", "0.01", "--seed", "1",
]


@pytest.fixture(scope="module")
def probe_run(tiny_unet_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    results = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(out), *PROBE_ARGS])
    return out, results


def test_probe_cli_writes_artefacts(probe_run):
    out, results = probe_run
    for name in ("results.json", "results.md", "heatmap.png", "knn_heatmap.png", "heads.safetensors"):
        assert (out / name).is_file(), name
    for name in ("heatmap.png", "knn_heatmap.png"):
        with Image.open(out / name) as image:
            image.load()
            assert image.format == "PNG" and image.size[0] > 100
    saved = json.loads((out / "results.json").read_text())
    assert saved["cells"] == results["cells"] and len(saved["cells"]) == 6
    assert saved["num_labels"] == 10 and saved["id2label"]["0"] == "airplane"
    assert saved["normalization"] == "standardize" and saved["protocol"] == "cached"
    assert saved["num_train"] + saved["num_val"] == 120 and saved["num_eval"] == 60
    best = saved["best"]
    assert best["val_acc"] == max(c["val_acc"] for c in saved["cells"])
    for cell in saved["cells"]:
        assert 0 <= cell["linear_acc"] <= 1 and 0 <= cell["knn_acc"] <= 1
        # the grid's lrs, and more where the chosen one sat at an edge
        assert {0.001, 0.01} <= set(cell["lrs"]) and cell["lr"] in cell["lrs"] and cell["lrs"] == sorted(cell["lrs"])
        assert len(cell["val_accs"]) == len(cell["lrs"]) and cell["val_acc"] == max(cell["val_accs"])
        for probe in ("linear", "knn"):
            low, high = cell[f"{probe}_ci95"]
            assert low <= cell[f"{probe}_acc"] <= high and high - low > 0.05  # 60 test images: wide intervals
        assert set(cell["knn_accs"]) == {"10", "20", "100", "200"} and cell["knn_accs"]["20"] == cell["knn_acc"]
    # logistic regression on the 3 best cells on validation, the best among them
    with_logistic = [c for c in saved["cells"] if c["logistic_acc"] is not None]
    assert len(with_logistic) == 3 and best["logistic_acc"] is not None and best["logistic_C"] > 0
    # per-image results of the best cell, packed; they give its accuracies back
    flags = unpack_correct(saved["correct"]["best.linear"], saved["num_eval"])
    assert flags.mean() == pytest.approx(best["linear_acc"])
    assert unpack_correct(saved["correct"]["best.knn"], 60).mean() == pytest.approx(best["knn_acc"])
    assert [c["what"] for c in saved["comparisons"]] == ["best cell: logistic regression vs linear head"]
    table = (out / "results.md").read_text().splitlines()
    first_row = table.index("## All cells") + 4
    assert table[first_row].startswith(f"| {best['layer']} | {best['timestep']} |")
    # the best cell of each part: the mid block and the decoder (up_blocks) are both in LAYERS
    assert any(line.startswith("| mid block: mid_block.resnets.1 |") for line in table)
    assert any(line.startswith("| decoder: up_blocks.") for line in table)


def test_installed_console_script_exits_zero(probe_run, tiny_unet_pipeline_dir):
    out, results = probe_run  # same output folder: the feature cache is reused, so this is quick
    script = Path(sys.executable).parent / "ddae-probe"
    done = subprocess.run(
        [str(script), "--model", tiny_unet_pipeline_dir, "--output_dir", str(out), *PROBE_ARGS],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best cell (on validation)" in done.stdout
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]


def test_saved_heads_are_batchnorm_plus_linear(probe_run, tiny_unet_pipeline_dir, cifar_small):
    out, results = probe_run
    heads = load_heads(str(out))
    assert set(heads) == {(c["layer"], c["timestep"]) for c in results["cells"]}
    best = results["best"]
    head = heads[best["layer"], best["timestep"]]
    # recompute the test accuracy from the saved head and freshly extracted eval features
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    cache = FeatureCache(str(out / "feature_cache"), backbone, LAYERS, [10, 100], 16, seed=1)
    evaluation = datasets.load_dataset(CIFAR10_SAMPLE, split="test").select(range(60))
    features = cache.extract(evaluation, "test", "img", View(1, 0, False), batch_size=60, progress=False)
    x = features[best["layer"], best["timestep"]].float()
    bn = torch.nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-5).eval()
    bn.running_mean.copy_(head.mean)
    bn.running_var.copy_(head.var)
    logits = torch.nn.functional.linear(bn(x), head.weight, head.bias)
    torch.testing.assert_close(logits, head.logits(x))
    accuracy = (logits.argmax(1) == torch.tensor(evaluation["label"])).float().mean().item()
    assert accuracy == pytest.approx(best["linear_acc"])


def test_same_seed_same_grid(probe_run, tiny_unet_pipeline_dir, tmp_path):
    _, first = probe_run
    second = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path), *PROBE_ARGS])
    assert second["cells"] == first["cells"]


def test_online_protocol_runs_the_paper_recipe(tiny_unet_pipeline_dir, tmp_path):
    config = ProbeConfig(
        model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path), max_train_samples=48,
        max_eval_samples=32, layers=LAYERS[1:], timesteps=[10], protocol="online", seed=2,
    )
    results = run_probe(config, progress=False)
    assert results["protocol"] == "online" and results["epochs"] == 15 and results["lrs"] == [1e-3]
    assert results["normalization"] == "none" and results["head_batch_size"] == 128
    assert len(results["cells"]) == 2 and all(0 <= c["linear_acc"] <= 1 for c in results["cells"])
    assert (tmp_path / "heatmap.png").is_file()
    assert "up_blocks.1.resnets.1@10.mean" not in load_heads_keys(tmp_path)


def test_random_init_baseline(probe_run, tiny_unet_pipeline_dir):
    out, trained = probe_run
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    state = torch.get_rng_state()
    # the fixture's weights come from seed 0 (make_tiny_unet), so use other seeds
    fresh, again, other = random_init(backbone, 1), random_init(backbone, 1), random_init(backbone, 2)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert type(fresh.denoiser) is type(backbone.denoiser) and fresh.denoiser.config == backbone.denoiser.config
    assert fresh.scheduler is backbone.scheduler
    pairs = list(zip(backbone.denoiser.parameters(), fresh.denoiser.parameters(), again.denoiser.parameters(),
                     other.denoiser.parameters(), strict=True))
    assert all(torch.equal(b, c) for _, b, c, _ in pairs)  # same seed, same weights
    assert not all(torch.equal(a, b) for a, b, _, _ in pairs)  # not the loaded weights
    assert not all(torch.equal(b, d) for _, b, _, d in pairs)  # another seed, other weights
    # the same cache folder as the trained run: features are keyed by the weights, so nothing is reused
    results = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(out / "random"),
                          "--cache_dir", str(out / "feature_cache"), "--random_init", *PROBE_ARGS])
    assert results["random_init"] is True
    assert [c["knn_acc"] for c in results["cells"]] != [c["knn_acc"] for c in trained["cells"]]
    assert "(random init, seed 1)" in (out / "random" / "results.md").read_text().splitlines()[0]


def test_pixel_baseline(cifar_small, tiny_unet_pipeline_dir, tmp_path):
    images = cifar_small.select(range(40))
    plain = pixel_features(images, "img", View(1, 0, False), 16, seed=0, batch_size=16, progress=False)
    torch.testing.assert_close(plain, images_to_tensor(images["img"], 16).flatten(1))
    cropped = pixel_features(images, "img", View(0, 0, True), 16, seed=0, batch_size=7, progress=False)
    assert cropped.shape == (40, 3 * 16 * 16) and not torch.equal(cropped, plain)

    config = ProbeConfig(
        model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path), max_train_samples=200,
        max_eval_samples=100, layers=LAYERS[:1], timesteps=[10], pixel_baseline=True, epochs=10,
    )
    results = run_probe(config, progress=False)
    pixels = results["baselines"]["pixels"]
    assert pixels["feature_dim"] == 3 * 16 * 16 and pixels["lr"] in config.lrs
    assert 0.15 < pixels["linear_acc"] <= 1 and 0.1 < pixels["knn_acc"] <= 1  # 10 classes: chance is 0.1
    assert json.loads((tmp_path / "results.json").read_text())["baselines"] == results["baselines"]
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if "baseline: pixels" in line)
    assert f"{100 * pixels['linear_acc']:.2f}" in row


def load_heads_keys(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "heads.safetensors"), "pt") as f:
        return set(f.keys())


# ------------------------------------------------------------------ bad inputs: errors before any extraction
def _parquet_dataset(folder, columns: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    datasets.Dataset.from_dict(columns).cast_column("img", datasets.Image()).to_parquet(
        os.path.join(folder, "train.parquet")
    )
    datasets.Dataset.from_dict(columns).cast_column("img", datasets.Image()).to_parquet(
        os.path.join(folder, "test.parquet")
    )
    return str(folder)


@pytest.fixture(scope="module")
def odd_datasets(cifar_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    images = list(cifar_small.select(range(8))["img"])
    return {
        "unlabelled": _parquet_dataset(root / "unlabelled", {"img": images}),
        "float_labels": _parquet_dataset(root / "float", {"img": images, "label": [0.5] * 8}),
        "one_class": _parquet_dataset(root / "one", {"img": images, "label": [3] * 8}),
    }


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown_layer", "Unknown layer"),
        ("unknown_timestep", "(?i)timestep"),
        ("unlabelled", "label"),
        ("float_labels", "integer class labels"),
        ("one_class", "at least two"),
        ("bad_resolution", "resolution"),
        ("unwritable_output", "--output_dir"),
        ("unwritable_cache", "--cache_dir"),
        ("pixels_online", "--pixel_baseline"),
    ],
)
def test_bad_inputs_fail_before_extraction(case, match, tiny_unet_pipeline_dir, odd_datasets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    kwargs = dict(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path / "out"),
                  cache_dir=str(tmp_path / "cache"), max_train_samples=16, max_eval_samples=8, timesteps=[10])
    kwargs.update({
        "unknown_layer": {"layers": ["up_blocks.7.resnets.0"]},
        "unknown_timestep": {"timesteps": [10, 1000]},
        "unlabelled": {"dataset": odd_datasets["unlabelled"]},
        "float_labels": {"dataset": odd_datasets["float_labels"]},
        "one_class": {"dataset": odd_datasets["one_class"]},
        "bad_resolution": {"resolution": 32},
        "unwritable_output": {"output_dir": str(blocker / "out")},
        "unwritable_cache": {"cache_dir": str(blocker / "cache")},
        "pixels_online": {"pixel_baseline": True, "protocol": "online"},
    }[case])

    def no_extraction(start, stop):
        raise AssertionError("extraction started")

    with pytest.raises(ValueError, match=match):
        run_probe(ProbeConfig(**kwargs), on_batch=no_extraction, progress=False)
    cache = tmp_path / "cache"
    assert not cache.exists() or os.listdir(cache) == []


# ------------------------------------------------------------------ distributed
def test_two_process_run_equals_single_process(probe_run, tiny_unet_pipeline_dir, tmp_path):
    _, single = probe_run
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ddae_diffusers.probing.cli", "--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path),
        *PROBE_ARGS,
    ]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = json.loads((tmp_path / "results.json").read_text())
    assert distributed["num_processes"] == 2
    assert distributed["cells"] == single["cells"]


def test_train_view_zero_is_clean_and_extra_views_are_augmented(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.probing.engine import train_views

    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path / "k3"),
                         max_train_samples=60, max_eval_samples=30, layers=LAYERS[:1], timesteps=[10], epochs=2,
                         lrs=[0.01], train_views=3, pixel_baseline=True)
    assert train_views(config) == [View(0, 0, False), View(0, 1, True), View(0, 2, True)]
    results = run_probe(config, progress=False)
    assert [(v["split"], v["index"], v["images"]) for v in results.views] == [
        ("test", 0, "clean"), ("train", 0, "clean"),
        ("train", 1, "random crop (4-pixel padding) + horizontal flip"),
        ("train", 2, "random crop (4-pixel padding) + horizontal flip"),
    ]  # fmt: skip
    assert "## Views" in (tmp_path / "k3" / "results.md").read_text()
    # view 0's cached features are those of the clean train images, with the view's fixed noise
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    train = datasets.load_dataset(CIFAR10_SAMPLE, split="train").select(range(60))
    cache = FeatureCache(str(tmp_path / "k3" / "feature_cache"), backbone, LAYERS[:1], [10], 16, seed=0)
    cached = cache.extract(train, "train", "img", View(0, 0, False), batch_size=60, progress=False)[LAYERS[0], 10]
    clean = backbone.features(images_to_tensor(train["img"], 16), LAYERS[:1], [10],
                              seed=View(0, 0, False).noise_seed(0))[LAYERS[0], 10]
    torch.testing.assert_close(cached.float(), clean, rtol=1e-3, atol=1e-3)  # fp16 cache
    # augmentation off: extra views differ from view 0 by their noise only
    off = ProbeConfig(**{**config.__dict__, "train_augment": "none", "output_dir": str(tmp_path / "off")})
    assert train_views(off) == [View(0, 0, False), View(0, 1, False), View(0, 2, False)]
    with pytest.raises(ValueError, match="--train_augment must be one of"):
        run_probe(ProbeConfig(**{**config.__dict__, "train_augment": "mixup"}), progress=False)


def test_fused_probes_concatenate_cells_and_are_chosen_on_validation(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.probing.fused import fused_candidates

    results = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path), *PROBE_ARGS,
                          "--fused_probes"])  # fmt: skip
    cells = results.cells
    candidates = fused_candidates(cells)
    ranked = sorted(cells, key=lambda c: (-c.val_acc, -c.linear_acc))
    assert candidates["top2"] == [(c.layer, c.timestep) for c in ranked[:2]]
    assert set(candidates) == {"top2", "top3", "top5", f"{ranked[0].layer}@all", f"all@{ranked[0].timestep}"}
    fused = results.fused
    assert [f["name"] for f in fused] and fused == sorted(fused, key=lambda f: (-f["val_acc"], -f["linear_acc"]))
    dims = {c.key: c.feature_dim for c in cells}
    for entry in fused:
        assert entry["feature_dim"] == sum(dims[key] for key in entry["cells"])
        assert 0 <= entry["linear_acc"] <= 1 and entry["lr"] in entry["lrs"] and {0.001, 0.01} <= set(entry["lrs"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["fused"] == fused and "## Fused probes" in (tmp_path / "results.md").read_text()
    mlp = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "mlp"), *PROBE_ARGS,
                      "--fused_probes", "--fused_head", "mlp"])  # fmt: skip
    assert [f["name"] for f in mlp.fused] and all(0 <= f["linear_acc"] <= 1 for f in mlp.fused)
    assert "One mlp head" in (tmp_path / "mlp" / "results.md").read_text()
    with pytest.raises(ValueError, match="--fused_probes runs on the feature cache"):
        probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "x"), *PROBE_ARGS,
                    "--fused_probes", "--protocol", "online"])  # fmt: skip


def test_halving_finishes_the_best_level_with_fewer_forwards(tiny_unet_pipeline_dir, tmp_path, monkeypatch):
    from ddae_diffusers.probing.halving import rung_plan

    assert rung_plan(7, 3) == [7, 3] and rung_plan(4, 2) == [4, 2] and rung_plan(1, 3) == []
    forwards = []
    features = DDAEBackbone.features

    def counted(self, pixels, layers, timesteps, **kwargs):
        forwards.append(pixels.shape[0] * len(timesteps))
        return features(self, pixels, layers, timesteps, **kwargs)

    monkeypatch.setattr(DDAEBackbone, "features", counted)
    grid = ["--dataset", CIFAR10_SAMPLE, "--max_train_samples", "200", "--max_eval_samples", "60", "--layers", *LAYERS,
            "--timesteps", "10", "50", "200", "400", "--batch_size", "32", "--epochs", "8", "--lrs", "0.001", "0.01",
            "--seed", "1", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    halving = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "halving"), *grid,
                          "--search", "halving", "--halving_eta", "2"])  # fmt: skip
    search = halving.search
    assert [len(rung["levels"]) for rung in search["rungs"]] == [4, 2] and len(search["finished"]) == 1
    assert [rung["fit_rows"] for rung in search["rungs"]] == [45, 90]  # 180 fit rows / 4, / 2
    for rung in search["rungs"]:  # each rung keeps the levels whose best cell is best on validation
        ranked = sorted(rung["levels"], key=lambda lv: -lv["val_acc"])
        assert sorted(rung["kept"]) == sorted(lv["level"] for lv in ranked[: len(ranked) // 2])
    assert search["finished"][0] in search["rungs"][1]["kept"] and halving.timesteps == search["finished"]
    assert {(c.layer, c.timestep) for c in halving.cells} == {(layer, search["finished"][0]) for layer in LAYERS}
    # counted on the real forwards (the prepare-time shape check is one image at one level)
    assert sum(forwards) - 1 == search["forwards"] < search["exhaustive_forwards"] == (200 + 60) * 4
    assert "## Search: successive halving" in (tmp_path / "halving" / "results.md").read_text()

    # the exhaustive grid on the same cache reuses every row halving computed, and agrees on the finished level
    forwards.clear()
    exhaustive = probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "full"), *grid])
    assert sum(forwards) - 1 == search["exhaustive_forwards"] - search["forwards"]
    finished = {c.layer: c for c in exhaustive.cells if c.timestep == search["finished"][0]}
    for cell in halving.cells:  # logistic regression runs on the 3 best cells of each grid: other cells
        assert strip_logistic(cell) == strip_logistic(finished[cell.layer])
    with pytest.raises(ValueError, match="--halving_eta >= 2"):
        probe_main(["--model", tiny_unet_pipeline_dir, "--output_dir", str(tmp_path / "x"), *grid,
                    "--search", "halving", "--halving_eta", "1"])  # fmt: skip


def test_search_auto_halves_large_grids_only(tmp_path):
    from ddae_diffusers.probing.engine import HALVING_FROM_ROWS, search_method

    auto = ProbeConfig(model="m", dataset="d", output_dir=str(tmp_path))
    assert auto.search == "auto"
    assert search_method(auto, HALVING_FROM_ROWS, 7) == "halving"
    assert search_method(auto, HALVING_FROM_ROWS - 1, 7) == "exhaustive"
    assert search_method(auto, 10 * HALVING_FROM_ROWS, 2) == "exhaustive"  # two levels: nothing to halve
    online = ProbeConfig(model="m", dataset="d", output_dir=str(tmp_path), protocol="online")
    assert search_method(online, 10 * HALVING_FROM_ROWS, 7) == "exhaustive"
    exhaustive = ProbeConfig(model="m", dataset="d", output_dir=str(tmp_path), search="exhaustive")
    assert search_method(exhaustive, 10 * HALVING_FROM_ROWS, 7) == "exhaustive"


def test_results_written_before_intervals_still_load(probe_run, tmp_path):
    import shutil

    from ddae_diffusers.errors import UsageError
    from ddae_diffusers.probing.comparisons import compare_runs
    from ddae_diffusers.probing.report import markdown_table
    from ddae_diffusers.probing.result import ProbeResult

    out, _ = probe_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    data = json.loads((old / "results.json").read_text())
    new_cell_fields = ("lrs", "linear_ci95", "knn_ci95", "knn_accs", "logistic_acc", "logistic_ci95", "logistic_C",
                       "logistic_val_acc", "alignment", "uniformity")  # fmt: skip
    for cell in [*data["cells"], data["best"]]:
        for name in new_cell_fields:
            cell.pop(name)
    for name in ("few_shot", "correct", "comparisons"):
        data.pop(name)
    (old / "results.json").write_text(json.dumps(data))
    result = ProbeResult.load(old)
    assert result.best.linear_ci95 is None and result.correct == {} and result.comparisons == []
    assert "linear acc (%) [95% CI]" in markdown_table(result.to_dict())  # reported without intervals
    with pytest.raises(UsageError, match="run ddae-probe again with this version"):
        compare_runs(result, ProbeResult.load(out))
