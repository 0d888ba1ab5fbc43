"""``ddae-extract``: Parquet shards that ``datasets.load_dataset`` reads back as the backbone's (and the probe
cache's) features, resumable, sharded across processes, with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CIFAR10_SAMPLE
from device_harness import launch_two_processes

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import images_to_tensor, load_split
from ddae_diffusers.probing.cache import EVAL_VIEW, FeatureCache, View, ViewRole
from ddae_diffusers.probing.export import ExportConfig, console_main, resize_maps, run_export

LAYERS = ["mid_block.resnets.1", "up_blocks.1.resnets.1"]
LEVELS = [10, 100]
ROWS = 30  # per split: 60 images in all
SETTINGS = dict(max_samples=ROWS, layers=LAYERS, timesteps=LEVELS, batch_size=8, shard_rows=16, seed=2)


def no_forward(first, stop):
    raise AssertionError(f"rows {first}:{stop} were computed again")


def export(model: str, output_dir: Path, on_batch=None, **overrides) -> dict:
    config = ExportConfig(model=model, dataset=CIFAR10_SAMPLE, output_dir=str(output_dir), **{**SETTINGS, **overrides})
    return run_export(config, on_batch=on_batch, progress=False)


def shards(output_dir: Path) -> dict[str, float]:
    return {str(path.relative_to(output_dir)): path.stat().st_mtime_ns for path in output_dir.glob("*/part-*.parquet")}


def loaded(output_dir: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(str(output_dir)).with_format("numpy")


def columns(output_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {column: (N, ...) array}}`` as ``datasets.load_dataset`` reads the folder."""
    return {split: dataset[:] for split, dataset in loaded(output_dir).items()}


@pytest.fixture(scope="module")
def reference(tiny_unet_pipeline_dir, tmp_path_factory) -> Path:
    """A single-process export of both splits (the default: every labelled split)."""
    output_dir = tmp_path_factory.mktemp("export")
    export(tiny_unet_pipeline_dir, output_dir)
    return output_dir


def test_round_trip_equals_backbone_and_probe_cache(reference, tiny_unet_pipeline_dir):
    described = json.loads((reference / "extract_config.json").read_text())
    assert list(described["splits"]) == ["train", "test"]
    assert described["splits"]["train"]["view"] == {"role": "train", "index": 0, "augment": False}
    assert described["splits"]["test"]["view"] == {"role": "eval", "index": 0, "augment": False}
    assert [cell["key"] for cell in described["cells"]] == [f"{layer}@{t}" for layer in LAYERS for t in LEVELS]
    assert len(described["weights_fingerprint"]) == 64 and described["version"]
    names = [f"{split}/part-0000{i}.parquet" for split in ("test", "train") for i in (0, 1)]
    assert sorted(shards(reference)) == names

    data, features = columns(reference), loaded(reference)["train"].features
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    cache = FeatureCache(str(reference / "feature_cache"), backbone, LAYERS, LEVELS, resolution=16, seed=2)
    for split, view in (("train", View(ViewRole.TRAIN, 0, False)), ("test", EVAL_VIEW)):
        rows = data[split]
        source = load_split(CIFAR10_SAMPLE, split, ROWS)
        assert rows["example_id"].tolist() == list(range(ROWS))
        assert rows["label"].tolist() == source["label"]
        assert features["label"].names == source.features["label"].names
        pixels = images_to_tensor(source["img"], 16)
        direct = backbone.features(pixels, LAYERS, LEVELS, seed=view.noise_seed(2), example_ids=range(ROWS))
        # the probe's cache for the same settings holds the same rows, and is complete: no forward
        cached = cache.extract(source, split, "img", view, batch_size=8, on_batch=no_forward, progress=False)
        for layer in LAYERS:
            for t in LEVELS:
                column = torch.from_numpy(rows[f"{layer}@{t}"])
                assert column.dtype == torch.float32 and torch.isfinite(column).all()
                assert torch.equal(column, cached[layer, t].float())
                torch.testing.assert_close(column, direct[layer, t], atol=2e-3, rtol=2e-3)  # float16 storage
    assert not np.array_equal(data["train"]["mid_block.resnets.1@10"], data["test"]["mid_block.resnets.1@10"])


def test_rerun_reuses_everything_and_drops_stale_shards(reference, tiny_unet_pipeline_dir):
    before = shards(reference)
    export(tiny_unet_pipeline_dir, reference, on_batch=no_forward)
    assert shards(reference) == before  # not one shard rewritten
    # one split only: the other split's shards go (nothing computed), and come back from the cache
    export(tiny_unet_pipeline_dir, reference, on_batch=no_forward, split=["test"])
    assert sorted(shards(reference)) == ["test/part-00000.parquet", "test/part-00001.parquet"]
    assert list(loaded(reference)) == ["test"]
    export(tiny_unet_pipeline_dir, reference, on_batch=no_forward)
    assert sorted(shards(reference)) == sorted(before)


def test_resume_after_a_killed_run(reference, tiny_unet_pipeline_dir, tmp_path):
    computed = []

    def killed(first, stop):
        computed.append((first, stop))
        if len(computed) == 5:  # in the test split: train's shards are written, test's first batch cached
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(tiny_unet_pipeline_dir, tmp_path, on_batch=killed)
    assert sorted(shards(tmp_path)) == ["train/part-00000.parquet", "train/part-00001.parquet"]
    (tmp_path / "train" / "part-00001.parquet").write_bytes(b"cut short")
    computed.clear()
    export(tiny_unet_pipeline_dir, tmp_path, on_batch=lambda first, stop: computed.append((first, stop)))
    assert computed == [(8, 16), (16, 24), (24, 30)]  # only the test rows the cache lacked
    expected, resumed = columns(reference), columns(tmp_path)
    for split in ("train", "test"):
        assert list(expected[split]) == list(resumed[split])
        for name, values in expected[split].items():
            assert np.array_equal(values, resumed[split][name]), name


def test_dense_maps(tiny_unet_pipeline_dir, tmp_path):
    described = export(tiny_unet_pipeline_dir, tmp_path, split=["test"], max_samples=12, timesteps=[10], dense_size=8)
    shapes = {cell["key"]: cell["shape"] for cell in described["cells"]}
    assert shapes == {"mid_block.resnets.1@10": [32, 8, 8], "up_blocks.1.resnets.1@10": [16, 8, 8]}
    schema = pq.read_schema(tmp_path / "test" / "part-00000.parquet")
    assert json.loads(schema.field("mid_block.resnets.1@10").metadata[b"shape"]) == [32, 8, 8]
    assert loaded(tmp_path)["test"].features["up_blocks.1.resnets.1@10"].feature.dtype == "float16"
    data = columns(tmp_path)["test"]
    backbone = DDAEBackbone.from_pretrained(tiny_unet_pipeline_dir)
    source = load_split(CIFAR10_SAMPLE, "test", 12)
    maps = backbone.features(images_to_tensor(source["img"], 16), LAYERS, [10], pooling="spatial",
                             seed=EVAL_VIEW.noise_seed(2), example_ids=range(12))  # fmt: skip
    for layer in LAYERS:  # the mid block is 8x8 already; the decoder's 16x16 maps are resized
        stored = torch.from_numpy(data[f"{layer}@10"].astype(np.float32)).view(12, -1, 8, 8)
        torch.testing.assert_close(stored, resize_maps(maps[layer, 10], 8), atol=5e-3, rtol=2e-3)
    assert not (tmp_path / "feature_cache").exists()  # dense maps resume from their shards
    export(tiny_unet_pipeline_dir, tmp_path, on_batch=no_forward, split=["test"], max_samples=12, timesteps=[10],
           dense_size=8)  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layers", "mid_block.nope"], "Unknown layer 'mid_block.nope'"),
        (["--split", "nope"], "Could not load split 'nope'"),
        (["--split", "train[:5]"], "not a plain split name"),
        (["--dense_size", "0"], "--dense_size must be >= 1"),
        (["--timesteps", "10", "--sigma_index", "3"], "not both"),
        (["--sigma_index", "3"], "this is a DDPM model"),
        (["--label_column", "img"], "not integer class labels"),
        (["--output_dir", "{file}"], "is not writable"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tiny_unet_pipeline_dir, tmp_path, capsys, flags, message):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "out"
    flags = [flag.replace("{file}", str(tmp_path / "a-file")) for flag in flags]
    argv = ["--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--max_samples", "8",
            "--output_dir", str(out), *flags]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        console_main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("ddae-extract: error: ") and message in error[0], error
    assert not list(out.glob("*/part-*.parquet")) and not list(out.glob("feature_cache/*/features.npy"))


def test_two_processes_equal_one(reference, tiny_unet_pipeline_dir, tmp_path):
    argv = ["-m", "ddae_diffusers.probing.export", "--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE,
            "--max_samples", str(ROWS), "--layers", *LAYERS, "--timesteps", *map(str, LEVELS), "--batch_size", "8",
            "--shard_rows", "16", "--seed", "2", "--output_dir", str(tmp_path)]  # fmt: skip
    done = launch_two_processes(*argv, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "extract_config.json").read_text())["num_processes"] == 2
    assert sorted(shards(tmp_path)) == sorted(shards(reference))
    for name in shards(reference):
        assert pq.read_table(reference / name).equals(pq.read_table(tmp_path / name)), name
    assert os.path.isdir(tmp_path / "feature_cache")


def test_nothing_non_finite_is_written(tiny_unet_pipeline_dir, tmp_path, monkeypatch):
    from ddae_diffusers.errors import UsageError
    from ddae_diffusers.probing import export as export_module

    # maps beyond float16's range would be stored as inf: the shard is refused, not written
    huge = lambda maps, size: torch.full((*maps.shape[:2], size, size), 1e6)  # noqa: E731
    monkeypatch.setattr(export_module, "resize_maps", huge)
    with pytest.raises(UsageError, match="not finite"):
        export(tiny_unet_pipeline_dir, tmp_path, split=["test"], max_samples=8, timesteps=[10], dense_size=8)
    assert not shards(tmp_path)
