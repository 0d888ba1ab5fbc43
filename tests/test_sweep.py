"""The learning-rate sweep extends past an edge only while the edge keeps winning, within its range."""

from __future__ import annotations

import math

import pytest

from ddae_diffusers.probing.heads import CellFit, ProbeRecipe, choose_lr
from ddae_diffusers.probing.sweep import LR_RANGE, edge, next_lrs, sweep_heads


def peaked_trainer(peaks: dict, calls: list):
    """A trainer whose validation accuracy of a cell falls with the distance of log10(lr) from the cell's peak."""

    def train(features, labels, num_classes, recipe, val, val_labels, seed=0, device=None):
        calls.append((sorted(features.dims), recipe.lrs))
        fits = {}
        for key in features.dims:
            accs = [1 - abs(math.log10(lr) - math.log10(peaks[key])) / 10 if peaks[key] else 0.5 for lr in recipe.lrs]
            chosen = choose_lr(accs)
            fits[key] = CellFit(f"head {key} {recipe.lrs[chosen]:g}", recipe.lrs[chosen], accs[chosen], accs,
                                tuple(recipe.lrs))  # fmt: skip
        return fits

    return train


def run(peaks: dict, grid=(1e-3, 1e-2, 1e-1)):
    import torch

    calls = []
    features = {key: torch.zeros(4, 2) for key in peaks}
    fits = sweep_heads(features, torch.zeros(4), 2, ProbeRecipe(lrs=grid), features, torch.zeros(4),
                       trainer=peaked_trainer(peaks, calls))  # fmt: skip
    return fits, calls


def test_edges_extend_until_the_best_is_inside():
    fits, calls = run({"up": 1.0, "inside": 1e-2, "down": 1e-5})
    assert calls[0] == (["down", "inside", "up"], (1e-3, 1e-2, 1e-1))
    # only the cells at an edge train again, each towards its own side, in one pass per side and extension
    assert {tuple(keys) for keys, _ in calls[1:]} == {("up",), ("down",)}
    assert fits["up"].lr == pytest.approx(1.0) and edge(fits["up"]) == 0
    assert fits["down"].lr == pytest.approx(1e-5) and edge(fits["down"]) == 0
    assert fits["inside"].lrs == (1e-3, 1e-2, 1e-1) and fits["inside"].head == "head inside 0.01"
    for fit in fits.values():
        assert list(fit.lrs) == sorted(fit.lrs) and len(fit.val_accs) == len(fit.lrs)
        assert fit.val_acc == max(fit.val_accs)
    assert fits["up"].head == "head up 1"  # the head of the chosen rate, from the pass that trained it


def test_the_range_caps_the_extension_and_says_so(caplog):
    fits, _ = run({"far": 1e5})
    assert max(fits["far"].lrs) == pytest.approx(LR_RANGE[1]) and fits["far"].lr == pytest.approx(LR_RANGE[1])
    assert edge(fits["far"]) == 1
    assert "still chose an lr at the edge" in caplog.text


def test_a_plateau_at_an_edge_is_not_extended():
    fits, calls = run({"flat": 0})  # every rate scores the same: nothing to gain beyond the edge
    assert len(calls) == 1 and edge(fits["flat"]) == 0


def test_next_rates_use_the_grids_mean_ratio():
    assert next_lrs((1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0), 1) == pytest.approx((10**0.5, 10.0))
    assert next_lrs((1e-3, 1e-2), -1) == pytest.approx((1e-4, 1e-5))
    assert next_lrs((1.0, 100.0), 1) == ()  # 10,000 is beyond the range
