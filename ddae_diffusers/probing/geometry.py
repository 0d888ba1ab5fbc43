"""Alignment and uniformity of a cell's features (Wang and Isola, ICML 2020), as the DDAE paper measures them.

Features are L2-normalised. For two noise draws ``x``, ``y`` of the same clean images (rows ``i``):

    alignment  = mean_i ||x_i - y_i||^2                          (0: the noise does not move the feature; max 4)
    uniformity = log mean_{i != j} exp(-2 ||x_i - x_j||^2)        (0: all features equal; lower: spread out)

Both on :data:`GEOMETRY_ROWS` training images (a seeded subset of the rows the heads fit on).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
import torch.nn.functional as F

from .table import Device, FeatureTable, compute_device, to_device

GEOMETRY_ROWS = 5000  # images per measurement: uniformity compares all pairs of them
UNIFORMITY_T = 2.0


def alignment(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared distance between the L2-normalised rows of ``x`` and ``y`` (N, D), row by row."""
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return (x - y).pow(2).sum(1).mean().item()


def uniformity(x: torch.Tensor, t: float = UNIFORMITY_T) -> float:
    """``log mean_{i != j} exp(-t ||x_i - x_j||^2)`` over the L2-normalised rows of ``x`` (N >= 2, D)."""
    x = F.normalize(x.float(), dim=1)
    n = x.shape[0]
    squared = (2 - 2 * x @ x.T).clamp_min(0)  # ||a - b||^2 of unit vectors
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return (torch.logsumexp(-t * squared[off_diagonal], dim=0) - math.log(n * (n - 1))).item()


def geometry(
    view_a: FeatureTable, view_b: FeatureTable, device: Device | None = None
) -> dict[Hashable, dict[str, float]]:
    """``{key: {"alignment", "uniformity"}}`` for every cell of two views (N, D) of the same rows: alignment
    between the views, uniformity of ``view_a``; each cell read whole (N rows) and computed on ``device``."""
    device = compute_device(device, view_a)
    out = {}
    for key in view_a:
        a, b = to_device(view_a[key], device), to_device(view_b[key], device)
        out[key] = {"alignment": alignment(a, b), "uniformity": uniformity(a)}
    return out


__all__ = ["GEOMETRY_ROWS", "UNIFORMITY_T", "alignment", "geometry", "uniformity"]
