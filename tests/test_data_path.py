"""The extraction data path: loader workers, the writer thread, labels in one read, device-aware defaults.

Whatever feeds the denoiser (0 or 2 loader processes) and however the rows reach the disk (a writer thread, or
one batch at a time), the features and every byte of the cache are the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from conftest import CIFAR10_SAMPLE, make_tiny_unet

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.data import images_to_tensor, pixels_of
from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.cache import CacheUnit, FeatureCache, View, extraction_plan

LAYERS = ["mid_block", "up_blocks.0.resnets.1"]
TIMESTEPS = [10, 100]
AUGMENTED = View(0, 1, True)  # crop + flip per example id: the pixels depend on more than the images


@pytest.fixture(scope="module")
def backbone():
    return DDAEBackbone(make_tiny_unet())


@pytest.fixture(scope="module")
def cifar40():
    return datasets.load_dataset(CIFAR10_SAMPLE, split="train[:40]")


def cache(folder: Path, backbone) -> FeatureCache:
    return FeatureCache(str(folder), backbone, LAYERS, TIMESTEPS, resolution=16, seed=3)


def extract(folder: Path, backbone, dataset, **kwargs) -> dict:
    table = cache(folder, backbone).extract(dataset, "train", "img", AUGMENTED, batch_size=8, progress=False, **kwargs)
    return dict(table)


def cache_files(folder: Path) -> dict[str, str]:
    """``{path in the cache: SHA-256}`` of every unit file (features, progress records, meta)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and ".locks" not in path.parts}  # fmt: skip


def assert_same_features(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------ loader workers
def test_pixels_of_is_images_to_tensor_bit_for_bit(cifar40):
    images = cifar40[:12]["img"]
    odd = [images[0].convert("L"), images[1].convert("RGBA"), images[2].resize((20, 40))]
    for resolution in (32, 16, 24):
        assert torch.equal(pixels_of(images + odd, resolution), images_to_tensor(images + odd, resolution))


def test_two_loader_workers_give_the_same_features_and_cache_files(backbone, cifar40, tmp_path):
    in_process = extract(tmp_path / "w0", backbone, cifar40, num_workers=0)
    workers = extract(tmp_path / "w2", backbone, cifar40, num_workers=2)
    assert_same_features(in_process, workers)
    files = cache_files(tmp_path / "w0")
    assert len(files) == 3 * len(TIMESTEPS) and files == cache_files(tmp_path / "w2")
    # scattered rows (read by index, not a slice) too
    rows = [3, 17, 18, 30, 2]
    subset = [extract(tmp_path / f"rows{w}", backbone, cifar40, rows=rows, num_workers=w) for w in (0, 2)]
    assert_same_features(*subset)
    for key, value in subset[0].items():
        assert torch.equal(value, in_process[key][rows])


# ------------------------------------------------------------------ the writer thread
def synchronous_extraction(folder: Path, backbone, dataset) -> None:
    """The old order, without loader or writer: decode, compute, then write and record each unit, batch by batch."""
    feature_cache = cache(folder, backbone)
    units = feature_cache.units(dataset, "train", AUGMENTED, "img")
    for unit in units:
        unit.open()
    for todo, batches in extraction_plan(units, 8):
        for ids in batches:
            pixels = AUGMENTED.pixels(dataset[ids[0] : ids[-1] + 1]["img"], ids, 16, 3)
            features = backbone.features(pixels, LAYERS, TIMESTEPS, seed=AUGMENTED.noise_seed(3), example_ids=ids)
            for i in todo:
                t = units[i].key["timestep"]
                units[i].write(ids, {layer: features[layer, t] for layer in LAYERS})


def test_writer_thread_writes_the_bytes_of_the_synchronous_order(backbone, cifar40, tmp_path):
    synchronous_extraction(tmp_path / "sync", backbone, cifar40)
    threaded = extract(tmp_path / "threaded", backbone, cifar40)
    batch_by_batch = extract(tmp_path / "on_batch", backbone, cifar40, on_batch=lambda start, stop: None)
    assert cache_files(tmp_path / "sync") == cache_files(tmp_path / "threaded") == cache_files(tmp_path / "on_batch")
    assert_same_features(threaded, batch_by_batch)


def test_records_follow_the_sync_of_their_rows(backbone, cifar40, tmp_path):
    """Several batches may share one sync, but a range is recorded only once its rows are synced."""
    events = []
    put_rows, sync, record = CacheUnit.put_rows, CacheUnit.sync, CacheUnit.record

    def logged(name, method):
        def call(self, *args):
            result = method(self, *args)
            events.append((name, self.folder, [r[:2] for r in (result if name == "put" else args[0] if args else [])]))
            return result
        return call

    with mock.patch.object(CacheUnit, "put_rows", logged("put", put_rows)), \
            mock.patch.object(CacheUnit, "sync", logged("sync", sync)), \
            mock.patch.object(CacheUnit, "record", logged("record", record)):  # fmt: skip
        extract(tmp_path, backbone, cifar40)
    put_since_sync: dict[str, set] = {}
    synced: dict[str, set] = {}
    for name, folder, ranges in events:
        if name == "put":
            put_since_sync.setdefault(folder, set()).update(ranges)
        elif name == "sync":
            synced.setdefault(folder, set()).update(put_since_sync.pop(folder, set()))
        else:
            assert set(ranges) <= synced.get(folder, set()), f"{ranges} recorded before their sync"
    assert sum(len(r) for n, _, r in events if n == "record") == 5 * len(TIMESTEPS)  # 40 rows, batches of 8


@pytest.mark.parametrize("batch_by_batch", [True, False])
def test_a_failed_write_is_one_line_and_leaves_only_recorded_ranges(batch_by_batch, backbone, cifar40, tmp_path):
    """Batch by batch (``on_batch``) the third sync fails, after one whole batch; otherwise the first, raised at
    the next hand-over or at the end."""
    reference = extract(tmp_path / "reference", backbone, cifar40)
    syncs = []
    fail_at = 3 if batch_by_batch else 1

    def full_disk(self):
        syncs.append(self.folder)
        if len(syncs) >= fail_at:
            raise OSError(28, "No space left on device")
        os.fsync(self._file.fileno())

    on_batch = (lambda start, stop: None) if batch_by_batch else None
    with mock.patch.object(CacheUnit, "sync", full_disk), pytest.raises(UsageError) as failure:
        extract(tmp_path / "cache", backbone, cifar40, on_batch=on_batch)
    message = str(failure.value)
    assert "\n" not in message and "No space left on device" in message and "free disk space" in message
    assert len(syncs) == fail_at  # nothing is written after the failure
    units = cache(tmp_path / "cache", backbone).units(cifar40, "train", AUGMENTED, "img")
    for unit in units:  # every record verifies: reopening drops no recorded range
        unit.open()
        progress = Path(unit.folder) / "progress.jsonl"
        records = progress.read_text().splitlines() if progress.exists() else []
        assert int(unit.done.sum()) == 8 * len(records)
    assert sum(int(unit.done.sum()) for unit in units) == (8 * len(units) if batch_by_batch else 0)
    computed = []
    resumed = extract(tmp_path / "cache", backbone, cifar40, on_batch=lambda start, stop: computed.append(start))
    assert_same_features(reference, resumed)
    assert computed == ([8, 16, 24, 32] if batch_by_batch else [0, 8, 16, 24, 32])  # only what was not recorded


# ------------------------------------------------------------------ labels in one read
def test_labels_are_read_in_one_call_with_the_same_values_and_errors():
    from ddae_diffusers.probing.engine import _labels

    split = datasets.load_dataset(CIFAR10_SAMPLE, split="train[:300]").select([7, 3, 250, 4, 99])
    row_by_row = torch.as_tensor([split[i]["label"] for i in range(len(split))])
    reads = []
    getitem = datasets.Dataset._getitem

    def counted(self, *args, **kwargs):
        reads.append(args)
        return getitem(self, *args, **kwargs)

    with mock.patch.object(datasets.Dataset, "_getitem", counted):
        labels = _labels(split, "label", "train")
    assert len(reads) == 1
    assert labels.dtype == torch.int64 and torch.equal(labels, row_by_row)
    negative = datasets.Dataset.from_dict({"label": [0, -1, 2]})
    with pytest.raises(UsageError, match="negative labels"):
        _labels(negative, "label", "train")


# ------------------------------------------------------------------ device-aware defaults
def test_auto_defaults_follow_the_device():
    from ddae_diffusers.capture import EXTRACTION_BATCH_SIZE
    from ddae_diffusers.data import default_num_workers
    from ddae_diffusers.probing.cli import build_parser
    from ddae_diffusers.probing.engine import ProbeConfig, auto_defaults, resolve_defaults

    cores = min(8, os.cpu_count() or 1)
    assert auto_defaults(torch.device("cuda")) == {"batch_size": 256, "num_workers": cores}
    assert auto_defaults(torch.device("cuda", 1)) == {"batch_size": 256, "num_workers": cores}
    assert auto_defaults(torch.device("cpu")) == {"batch_size": EXTRACTION_BATCH_SIZE, "num_workers": 0}
    assert default_num_workers(torch.device("cuda")) == cores and default_num_workers("cpu") == 0
    config = ProbeConfig(model="m", dataset="d", output_dir="o")
    assert (config.batch_size, config.num_workers) == (None, None)
    on_cuda = resolve_defaults(config, torch.device("cuda"))
    assert (on_cuda.batch_size, on_cuda.num_workers) == (256, cores)
    given = resolve_defaults(ProbeConfig(model="m", dataset="d", output_dir="o", batch_size=7, num_workers=1), "cuda")
    assert (given.batch_size, given.num_workers) == (7, 1)
    with pytest.raises(UsageError, match="--num_workers"):
        ProbeConfig(model="m", dataset="d", output_dir="o", num_workers=-1)
    text = " ".join(build_parser().format_help().split())
    assert "--num_workers" in text and "min(8, CPU count) on CUDA" in text and "256 on CUDA" in text


def test_the_run_records_the_resolved_defaults(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.probing.cli import main as probe

    results = probe(["--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--train_split", "train[:40]",
                     "--eval_split", "test[:20]", "--layers", "mid_block", "--timesteps", "10", "--epochs", "1",
                     "--lrs", "0.01", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert (results["config"]["batch_size"], results["config"]["num_workers"]) == (16, 0)


class LoaderBuilt(Exception):
    """Stops the training script once it has built its data loader."""


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_training_loader_defaults_follow_the_device(device, tmp_path):
    import importlib.util

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    spec = importlib.util.spec_from_file_location(
        "train_unconditional", Path(__file__).resolve().parents[1] / "training" / "train_unconditional.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--dataset_name", CIFAR10_SAMPLE, "--max_train_samples", "16", "--model_config",
                              "ddpm-tiny", "--probe_every_n_steps", "0", "--output_dir", str(tmp_path)])  # fmt: skip
    assert args.dataloader_num_workers is None
    built = {}

    def loader(*positional, **kwargs):
        built.update(kwargs)
        raise LoaderBuilt

    real_device = Accelerator.device
    with mock.patch.object(script.torch.utils.data, "DataLoader", loader), \
            mock.patch.object(Accelerator, "device", property(lambda self: torch.device(device))), \
            pytest.raises(LoaderBuilt):  # fmt: skip
        script.main(args)
    assert Accelerator.device is real_device
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cores = min(8, os.cpu_count() or 1)
    expected = (cores, True) if device == "cuda" else (0, False)
    assert (built["num_workers"], built["pin_memory"]) == expected
