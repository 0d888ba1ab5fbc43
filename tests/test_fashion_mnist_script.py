"""scripts/fashion_mnist_from_idx.py: IDX files in, a data set folder in the Hub's layout out."""

from __future__ import annotations

import gzip
import importlib.util

import datasets
import numpy as np
import pytest
from conftest import REPO_ROOT


def load_script():
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_from_idx", REPO_ROOT / "scripts" / "fashion_mnist_from_idx.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_become_a_loadable_data_set(tmp_path):
    script = load_script()
    rng = np.random.default_rng(0)
    source = tmp_path / "idx"
    source.mkdir()
    images = {split: rng.integers(0, 256, (n, 28, 28)) for split, n in (("train", 5), ("test", 3))}
    labels = {split: rng.integers(0, 10, len(images[split])) for split in images}
    for split, (images_file, labels_file) in script.FILES.items():
        write_idx(source / images_file, images[split])
        write_idx(source / labels_file, labels[split])
    script.main(["--source", str(source), "--output_dir", str(tmp_path / "fashion_mnist")])
    loaded = datasets.load_dataset(str(tmp_path / "fashion_mnist"))
    for split in ("train", "test"):
        assert loaded[split]["label"] == labels[split].tolist()
        assert np.array_equal(np.asarray(loaded[split][0]["image"]), images[split][0])
    assert loaded["train"].features["label"].names[0] == "T - shirt / top"
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        script.main(["--source", str(tmp_path), "--output_dir", str(tmp_path / "other")])
