"""``ddae-probe --datasets``: one model over data sets of different Hub layouts, one transfer table."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from conftest import CIFAR10_SAMPLE

from ddae_diffusers.probing.cli import main as probe_main
from ddae_diffusers.probing.stats import unpack_correct

GRID = ["--layers", "mid_block.resnets.1", "up_blocks.1.resnets.1", "--timesteps", "10", "--batch_size", "32",
        "--epochs", "4", "--lrs", "0.01", "0.1", "--logistic_cells", "1", "--seed", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory):
    """A CIFAR-like folder (img/label, train/test) and a grayscale 28x28 one (image/fine_label, train/validation)."""
    root = tmp_path_factory.mktemp("layouts")
    cifar = datasets.load_dataset(CIFAR10_SAMPLE)
    datasets.DatasetDict({"train": cifar["train"].select(range(120)), "test": cifar["test"].select(range(40))}
                         ).save_to_disk(root / "cifar")  # fmt: skip
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=160)
    images = [(rng.normal(60 + 50 * y, 30, size=(28, 28))).clip(0, 255).astype(np.uint8) for y in labels]
    features = datasets.Features({"image": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"])})
    gray = datasets.Dataset.from_dict({"image": images, "fine_label": labels.tolist()}, features=features)
    datasets.DatasetDict({"train": gray.select(range(120)), "validation": gray.select(range(120, 160))}
                         ).save_to_disk(root / "gray")  # fmt: skip
    return str(root / "cifar"), str(root / "gray")


def test_suite_writes_one_transfer_table(two_layouts, tiny_unet_pipeline_dir, tmp_path):
    cifar, gray = two_layouts
    out = tmp_path / "suite"
    table = probe_main(["--model", tiny_unet_pipeline_dir, "--datasets", cifar, gray, "--output_dir", str(out),
                        *GRID])  # fmt: skip
    saved = json.loads((out / "transfer.json").read_text())
    assert saved == json.loads(json.dumps(table)) and [row["dataset"] for row in saved["rows"]] == ["cifar", "gray"]
    cifar_row, gray_row = saved["rows"]
    assert (cifar_row["classes"], cifar_row["test"]) == (10, 40) and (gray_row["classes"], gray_row["test"]) == (3, 40)
    for row in saved["rows"]:
        folder = out / row["dataset"]
        probe = json.loads((folder / "results.json").read_text())
        random = json.loads((folder / "random-init" / "results.json").read_text())
        assert random["random_init"] and [c["layer"] + "@" + str(c["timestep"]) for c in random["cells"]] == [
            row["best_cell"]]  # the random init is probed at the best cell only
        for entry in (row["best"], row["pixels"], row["random_init"]):
            low, high = entry["linear_ci95"]
            assert low <= entry["linear_acc"] <= high
        # the paired test is computed from the stored per-image results of both runs
        a = unpack_correct(probe["correct"]["best.linear"], 40)
        b = unpack_correct(random["correct"]["best.linear"], 40)
        assert row["vs_random_init"]["a_only"] == int((a & ~b).sum())
        assert row["vs_random_init"]["b_only"] == int((b & ~a).sum())
        assert row["vs_pixels"]["a_acc"] == pytest.approx(row["best"]["linear_acc"])
    assert probe["eval_split"] == "validation" and probe["label_column"] == "fine_label"
    markdown = (out / "transfer.md").read_text()
    assert "| cifar | 10 | 120 / 40 |" in markdown and "| gray | 3 | 120 / 40 |" in markdown
    assert "gray: mid_block" in markdown or "gray: up_blocks" in markdown


def test_suite_refuses_a_single_dataset_flag_beside_it(tiny_unet_pipeline_dir, tmp_path):
    from ddae_diffusers.errors import UsageError

    with pytest.raises(UsageError, match="--datasets runs the suite"):
        probe_main(["--model", tiny_unet_pipeline_dir, "--datasets", "a", "--dataset", "b", "--output_dir",
                    str(tmp_path)])  # fmt: skip
