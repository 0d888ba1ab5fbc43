"""Fused probes: one linear head on the concatenation of several cells' cached features.

Candidates are built from the scored grid: the top-k cells on validation (k = 2, 3, 5), the best cell's layer at
every noise level, and every layer at the best cell's level. Each gets the grid's head recipe (standardised
features, lr chosen on the validation rows) and a kNN score; the best candidate is chosen on validation, like a
single cell, and its test accuracy is compared with the best single cell's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..noise import NoiseLevel
from .result import ProbeCell, cell_key

Key = tuple[str, NoiseLevel]
TOP_KS = (2, 3, 5)


def fused_candidates(cells: Sequence[ProbeCell], top_ks: Sequence[int] = TOP_KS) -> dict[str, list[Key]]:
    """``{name: [(layer, level), ...]}``: the fusions worth trying on this grid (each of 2 or more cells)."""
    ranked = sorted(cells, key=lambda c: (-c.val_acc, -c.linear_acc))
    best = ranked[0]
    candidates = {f"top{k}": [(c.layer, c.timestep) for c in ranked[:k]] for k in top_ks if k <= len(ranked)}
    candidates[f"{best.layer}@all"] = [(c.layer, c.timestep) for c in cells if c.layer == best.layer]
    candidates[f"all@{best.timestep}"] = [(c.layer, c.timestep) for c in cells if c.timestep == best.timestep]
    return {name: keys for name, keys in candidates.items() if len(keys) > 1}


def concatenate(
    features: Mapping[Key, torch.Tensor], candidates: Mapping[str, Sequence[Key]]
) -> dict[str, torch.Tensor]:
    """``{name: (N, sum of D)}``: each candidate's cells side by side, float32."""
    return {name: torch.cat([features[key].float() for key in keys], dim=1) for name, keys in candidates.items()}


def fused_entry(name: str, keys: Sequence[Key], score: dict) -> dict:
    """One row of ``results.json["fused"]``: the candidate, its cells and its scores."""
    return {"name": name, "cells": [cell_key(layer, t) for layer, t in keys], **score}


__all__ = ["TOP_KS", "fused_candidates", "concatenate", "fused_entry"]
