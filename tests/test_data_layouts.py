"""The usual Hub data set layouts, as tiny real local folders: which split is held out, which columns hold the
images and labels, grayscale and odd-sized images, and the MNIST / Fashion-MNIST folder writers."""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from ddae_diffusers.data import (
    detect_eval_split,
    detect_image_column,
    detect_label_column,
    images_to_tensor,
    label_names,
    load_split,
    pixels_of,
)
from ddae_diffusers.errors import UsageError

RNG = np.random.default_rng(0)


def rgb_images(n: int, side: int = 8) -> list[Image.Image]:
    return [Image.fromarray(RNG.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def table(n: int, **columns) -> datasets.Dataset:
    """``n`` rows: an ``img`` column of RGB images and a ClassLabel ``label`` (or the given ``columns``)."""
    columns = columns or {"img": rgb_images(n), "label": [i % 2 for i in range(n)]}
    features = {name: datasets.Image() if name in ("img", "image") else datasets.ClassLabel(num_classes=2)
                for name in columns}  # fmt: skip
    return datasets.Dataset.from_dict(columns, datasets.Features(features))


def parquet_folder(folder: Path, splits: dict[str, datasets.Dataset]) -> str:
    """The Hub's Parquet layout: ``data/{split}-00000-of-00001.parquet``."""
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        rows.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return str(folder)


def one_line_usage_error(call) -> str:
    with pytest.raises(UsageError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the held-out split
def test_a_validation_only_data_set_is_evaluated_on_validation(tmp_path):
    folder = parquet_folder(tmp_path / "ds", {"train": table(4), "validation": table(3)})
    assert detect_eval_split(folder) == "validation"
    assert len(load_split(folder, detect_eval_split(folder))) == 3


def test_a_valid_split_keeps_its_name_and_test_comes_first(tmp_path):
    folder = parquet_folder(tmp_path / "valid", {"train": table(4), "valid": table(2)})
    assert detect_eval_split(folder) == "valid"
    assert len(load_split(folder, "valid")) == 2
    both = parquet_folder(tmp_path / "both", {"train": table(4), "val": table(2), "test": table(3)})
    assert detect_eval_split(both) == "test"
    only_val = parquet_folder(tmp_path / "val", {"train": table(4), "val": table(2)})
    assert detect_eval_split(only_val) == "val"


def test_a_saved_dataset_dict_with_a_valid_folder_is_read_as_validation(tmp_path):
    # datasets.load_dataset names split folders by keyword: valid/ becomes "validation"; the two agree
    datasets.DatasetDict(train=table(4), valid=table(2)).save_to_disk(str(tmp_path / "saved"))
    split = detect_eval_split(str(tmp_path / "saved"))
    assert split == "validation"
    assert len(load_split(str(tmp_path / "saved"), split)) == 2


def test_no_held_out_split_is_one_line_naming_eval_split_and_the_splits(tmp_path):
    folder = parquet_folder(tmp_path / "ds", {"train": table(4), "unlabeled": table(2)})
    message = one_line_usage_error(lambda: detect_eval_split(folder))
    assert "--eval_split" in message and "['train', 'unlabeled']" in message
    # a given split is taken as it is, without reading the data set
    assert detect_eval_split(str(tmp_path / "absent"), given="unlabeled") == "unlabeled"
    missing = one_line_usage_error(lambda: detect_eval_split(str(tmp_path / "absent")))
    assert "absent" in missing


# ------------------------------------------------------------------ columns
def test_cifar100_layout_prefers_fine_label(tmp_path):
    n = 4
    rows = datasets.Dataset.from_dict(
        {"img": rgb_images(n, 32), "fine_label": [0, 99, 5, 7], "coarse_label": [0, 19, 3, 2]},
        datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(num_classes=100),
                           "coarse_label": datasets.ClassLabel(num_classes=20)}),  # fmt: skip
    )
    folder = parquet_folder(tmp_path / "cifar100", {"train": rows, "test": rows})
    test = load_split(folder, detect_eval_split(folder))
    assert detect_image_column(test) == "img"
    assert detect_label_column(test) == "fine_label"
    assert detect_label_column(test, "coarse_label") == "coarse_label"
    coarse_only = test.remove_columns("fine_label")
    assert detect_label_column(coarse_only) == "coarse_label"
    assert len(label_names(test, "fine_label")) == 100


@pytest.mark.parametrize("label", ["label", "labels"])
def test_image_and_label_column_names(label):
    rows = table(2, image=rgb_images(2), **{label: [0, 1]})
    assert detect_image_column(rows) == "image"
    assert detect_label_column(rows) == label


def test_missing_columns_are_one_line_naming_the_flag():
    unnamed = datasets.Dataset.from_dict({"picture": rgb_images(2), "target": [0, 1]})
    assert "--image_column" in one_line_usage_error(lambda: detect_image_column(unnamed))
    assert "--label_column" in one_line_usage_error(lambda: detect_label_column(unnamed))
    assert detect_image_column(unnamed, "picture") == "picture"
    assert "--image_column" in one_line_usage_error(lambda: detect_image_column(unnamed, "img"))


# ------------------------------------------------------------------ pixels
def test_grayscale_28x28_imagefolder_becomes_rgb_32x32(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            digit = tmp_path / "digits" / split / str(i % 2)
            digit.mkdir(parents=True, exist_ok=True)
            Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(digit / f"{i}.png")
    folder = str(tmp_path / "digits")
    test = load_split(folder, detect_eval_split(folder))
    image_column, label_column = detect_image_column(test), detect_label_column(test)
    images = test[image_column]
    assert (image_column, label_column) == ("image", "label") and images[0].mode == "L"
    pixels = pixels_of(images, 32)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])  # gray stays gray
    assert torch.equal(pixels, images_to_tensor(images, 32))
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_larger_and_odd_images_become_32x32():
    odd = rgb_images(2, 64) + [Image.new("L", (64, 64), 128), Image.new("RGBA", (40, 24)), Image.new("P", (28, 28))]
    pixels = pixels_of(odd, 32)
    assert pixels.shape == (5, 3, 32, 32)
    assert torch.equal(pixels, images_to_tensor(odd, 32))
    assert torch.allclose(pixels[2], torch.full((3, 32, 32), 128 / 127.5 - 1), atol=1e-6)


# ------------------------------------------------------------------ the MNIST / Fashion-MNIST writers
@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    return importlib.import_module("mnist_from_pickle"), importlib.import_module("fashion_mnist_from_idx")


def write_pickle(path: Path, parts) -> None:
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)


def test_mnist_pickle_becomes_the_hub_layout(scripts, tmp_path):
    mnist, _ = scripts
    pixels = {part: RNG.integers(0, 256, (n, 784)) for part, n in (("train", 5), ("valid", 2), ("test", 3))}
    labels = {part: RNG.integers(0, 10, len(pixels[part])) for part in pixels}
    parts = tuple((pixels[p].astype(np.float32) / 256, labels[p]) for p in ("train", "valid", "test"))
    write_pickle(tmp_path / "mnist.pkl.gz", parts)
    mnist.main(["--source", str(tmp_path / "mnist.pkl.gz"), "--output_dir", str(tmp_path / "mnist")])
    loaded = datasets.load_dataset(str(tmp_path / "mnist"))
    assert sorted(loaded) == ["test", "train"]
    assert loaded["train"].features["label"].names == [str(d) for d in range(10)]
    train_pixels = np.concatenate([pixels["train"], pixels["valid"]]).reshape(-1, 28, 28)
    assert loaded["train"]["label"] == np.concatenate([labels["train"], labels["valid"]]).tolist()
    assert loaded["test"]["label"] == labels["test"].tolist()
    first = loaded["train"][6]["image"]
    assert first.mode == "L" and np.array_equal(np.asarray(first), train_pixels[6])
    assert detect_eval_split(str(tmp_path / "mnist")) == "test"
    assert sorted(os.listdir(tmp_path)) == ["mnist", "mnist.pkl.gz"]  # no staging folder left


def test_mnist_script_refuses_inexact_pixels_and_foreign_pickles(scripts, tmp_path):
    mnist, _ = scripts
    part = (np.full((1, 784), 0.3, np.float32), np.zeros(1, np.int64))
    write_pickle(tmp_path / "blurred.pkl.gz", (part, part, part))
    with pytest.raises(SystemExit, match="bytes / 256"):
        mnist.main(["--source", str(tmp_path / "blurred.pkl.gz"), "--output_dir", str(tmp_path / "out")])
    write_pickle(tmp_path / "code.pkl.gz", (os.getcwd,))  # a global that is not a numpy array
    with pytest.raises(SystemExit, match="not allowed"):
        mnist.main(["--source", str(tmp_path / "code.pkl.gz"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_the_old_folder(scripts, tmp_path):
    _, fashion = scripts
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("old")
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError):  # label 12 is not one of the 10 classes
        fashion.write_dataset(str(tmp_path / "out"), "fashion_mnist", {"train": (images, [1, 12])}, fashion.LABELS)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "kept").read_text() == "old"
