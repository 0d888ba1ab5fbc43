"""Few-shot probes: k rows per class, drawn reproducibly, logistic regression scored on the test rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.fewshot import few_shot, few_shot_rows
from ddae_diffusers.probing.table import FeatureTable


def blobs(num: int, dim: int, classes: int, seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(0, classes, (num,), generator=g)
    return centres[y] + spread * torch.randn(num, dim, generator=g), y


def test_rows_hold_k_per_class_and_depend_only_on_the_seed():
    labels = torch.arange(60) % 4
    rows = few_shot_rows(labels, 5, seed=3)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows].numpy()).tolist() == [5, 5, 5, 5]
    assert np.array_equal(rows, few_shot_rows(labels, 5, seed=3))
    assert not np.array_equal(rows, few_shot_rows(labels, 5, seed=4))
    with pytest.raises(UsageError, match="fewer than --few_shot 16"):
        few_shot_rows(labels, 16, seed=0)
    with pytest.raises(UsageError, match=">= 1"):
        few_shot_rows(labels, 0, seed=0)


def test_more_shots_score_higher_and_draws_are_reported():
    x, y = blobs(1400, 16, 5, seed=0, spread=2.5)
    tables = {name: FeatureTable.from_tensors({"cell": part}) for name, part in
              (("train", x[:1000]), ("val", x[1000:1200]), ("test", x[1200:]))}  # fmt: skip
    results = few_shot(tables["train"], y[:1000], tables["val"], y[1000:1200], tables["test"], y[1200:], 5,
                       shots=[1, 20], seeds=3, seed=0)["cell"]  # fmt: skip
    one, twenty = results
    assert one["shots"] == 1 and twenty["shots"] == 20
    assert len(one["accs"]) == 3 and len(one["Cs"]) == 3
    assert one["mean"] == pytest.approx(np.mean(one["accs"]))
    assert one["std"] == pytest.approx(np.std(one["accs"], ddof=1))
    assert twenty["mean"] > one["mean"] and twenty["mean"] > 0.8
    again = few_shot(tables["train"], y[:1000], tables["val"], y[1000:1200], tables["test"], y[1200:], 5,
                     shots=[1], seeds=3, seed=0)["cell"][0]  # fmt: skip
    assert again["accs"] == one["accs"]
