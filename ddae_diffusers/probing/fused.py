"""Fused probes: one linear head on the concatenation of several cells' cached features.

Candidates are built from the scored grid: the top-k cells on validation (k = 2, 3, 5), the best cell's layer at
every noise level, and every layer at the best cell's level. Each gets the grid's head recipe (standardised
features, lr chosen on the validation rows) and a kNN score; the best candidate is chosen on validation, like a
single cell, and its test accuracy is compared with the best single cell's. Heads train on one ``device``, as in
``heads.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..noise import NoiseLevel
from .heads import (
    CellFit,
    ProbeRecipe,
    checked_table,
    choose_lr,
    head_accuracies,
    minibatches,
    single_thread,
    standardize,
)
from .result import ProbeCell, cell_key
from .table import Device, FeatureTable, block_to, column_stats, compute_device, to_device

Key = tuple[str, NoiseLevel]
TOP_KS = (2, 3, 5)
HEAD_KINDS = ("linear", "mlp")
MLP_HIDDEN = 512


def fused_candidates(cells: Sequence[ProbeCell], top_ks: Sequence[int] = TOP_KS) -> dict[str, list[Key]]:
    """``{name: [(layer, level), ...]}``: the fusions worth trying on this grid (each of 2 or more cells)."""
    ranked = sorted(cells, key=lambda c: (-c.val_acc, -c.linear_acc))
    best = ranked[0]
    candidates = {f"top{k}": [(c.layer, c.timestep) for c in ranked[:k]] for k in top_ks if k <= len(ranked)}
    candidates[f"{best.layer}@all"] = [(c.layer, c.timestep) for c in cells if c.layer == best.layer]
    candidates[f"all@{best.timestep}"] = [(c.layer, c.timestep) for c in cells if c.timestep == best.timestep]
    return {name: keys for name, keys in candidates.items() if len(keys) > 1}


def fused_entry(name: str, keys: Sequence[Key], score: dict) -> dict:
    """One row of ``results.json["fused"]``: the candidate, its cells and its scores."""
    return {"name": name, "cells": [cell_key(layer, t) for layer, t in keys], **score}


@dataclass
class MLPHead:
    """``logits = W2 relu(W1 standardize(x) + b1) + b2``; shapes W1 (H, D), W2 (C, H)."""

    net: torch.nn.Sequential
    mean: torch.Tensor
    var: torch.Tensor

    def to(self, device: Device) -> MLPHead:
        """This head with its network and statistics on ``device`` (the network is moved in place)."""
        return MLPHead(self.net.to(device), self.mean.to(device), self.var.to(device))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features (any float dtype, on the head's device) -> (N, C) logits."""
        return self.net(standardize(x, self.mean, self.var))


def train_mlp_heads(
    train_features: FeatureTable | Mapping[str, torch.Tensor],
    train_labels: torch.Tensor,
    num_classes: int,
    recipe: ProbeRecipe,
    val_features: FeatureTable | Mapping[str, torch.Tensor],
    val_labels: torch.Tensor,
    seed: int = 0,
    hidden: int = MLP_HIDDEN,
    device: Device | None = None,
) -> dict[str, CellFit]:
    """One MLP head per input and learning rate (Adam, cosine, ``recipe``'s epochs and batch size, standardised
    inputs (N, D), read one mini-batch at a time); each input's head with the best validation accuracy, as
    ``train_heads`` does for linear heads. Heads are initialised on the CPU (the same weights on every device),
    then trained and kept on ``device`` (default: the training features' device)."""
    train = checked_table(train_features, train_labels)
    val = checked_table(val_features, val_labels)
    device = compute_device(device, train)
    labels = to_device(train_labels, device).long()
    fits = {}
    for key in train:
        column = train.select([key])
        mean, var = column_stats(column, device=device)[key]
        candidates = []
        for lr in recipe.lrs:
            torch.manual_seed(seed)
            net = torch.nn.Sequential(
                torch.nn.Linear(train.dims[key], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes)
            ).to(device)
            optimizer = torch.optim.Adam(net.parameters(), lr=lr)
            steps = recipe.epochs * -(-labels.shape[0] // recipe.batch_size)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
            generator = torch.Generator().manual_seed(seed)
            with single_thread(device):
                for _ in range(recipe.epochs):
                    for index in minibatches(labels.shape[0], recipe.batch_size, generator):
                        inputs = standardize(block_to(column.read(index), device)[key], mean, var)
                        loss = F.cross_entropy(net(inputs), labels[to_device(index, device)])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
            candidates.append(MLPHead(net.eval(), mean, var))
        val_accs = head_accuracies({key: candidates}, val, val_labels, device=device)[key]
        chosen = choose_lr(val_accs)
        fits[key] = CellFit(candidates[chosen], recipe.lrs[chosen], val_accs[chosen], val_accs, tuple(recipe.lrs))
    return fits


__all__ = ["HEAD_KINDS", "MLPHead", "TOP_KS", "fused_candidates", "fused_entry", "train_mlp_heads"]
