"""A learning-rate sweep that is not cut short by its own edges.

Each cell's head is chosen on validation among the recipe's learning rates. When the chosen rate is the smallest
or the largest one tried and beats its neighbour, the best may lie beyond: the cells at an edge get heads at the
next rates out (at the grid's mean ratio), in one more pass for all of them, until the best rate is inside the tried
ones (or ties its neighbour) or ``max_extensions`` passes were made. Every extension is logged and recorded per
cell (``lrs``), so a result still at an edge says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import replace

import torch

from .heads import CellFit, ProbeRecipe, choose_lr, train_heads
from .table import Device, FeatureTable

logger = logging.getLogger(__name__)
MAX_EXTENSIONS = 3  # passes beyond the grid; each adds EXTENSION_STEPS rates on the side of the edge
EXTENSION_STEPS = 2
LR_RANGE = (1e-6, 100.0)  # rates outside are never tried: below, heads barely move; above, nothing is learnt


def edge(fit: CellFit) -> int:
    """-1 when the chosen lr is the smallest of several tried and beats the next one on validation, +1 the same at
    the largest, 0 otherwise (inside, one lr only, or a plateau: tied with its neighbour, nothing to gain beyond)."""
    return 0 if fit.val_acc is None else edge_of(fit.lr, fit.lrs, fit.val_accs)


def edge_of(lr: float, lrs: Sequence[float], val_accs: Sequence[float] | None) -> int:
    """:func:`edge` of a chosen ``lr`` among the ``lrs`` tried with their validation accuracies."""
    pairs = sorted(zip(lrs, val_accs, strict=True)) if val_accs else []
    if len(pairs) < 2:
        return 0
    if lr == pairs[0][0] and pairs[0][1] > pairs[1][1]:
        return -1
    if lr == pairs[-1][0] and pairs[-1][1] > pairs[-2][1]:
        return 1
    return 0


def next_lrs(lrs: Sequence[float], side: int, steps: int = EXTENSION_STEPS) -> tuple[float, ...]:
    """The ``steps`` rates beyond the ``side`` (-1 low, +1 high) edge of ``lrs``, spaced by the grid's mean ratio
    (sqrt(10) for the default half-decade grid), within :data:`LR_RANGE` (none once it is reached)."""
    lrs = sorted(lrs)
    ratio = (lrs[-1] / lrs[0]) ** (1 / (len(lrs) - 1))
    start = lrs[0] if side < 0 else lrs[-1]
    candidates = (float(start * ratio ** (side * k)) for k in range(1, steps + 1))
    return tuple(lr for lr in candidates if LR_RANGE[0] <= lr <= LR_RANGE[1])


def merged(old: CellFit, new: CellFit) -> CellFit:
    """One fit over the rates of both: the best validation accuracy wins (ties: the smaller lr)."""
    pairs = sorted(zip(old.lrs + new.lrs, old.val_accs + new.val_accs, strict=True))
    lrs, val_accs = tuple(lr for lr, _ in pairs), [acc for _, acc in pairs]
    best = lrs[choose_lr(val_accs)]
    head = old.head if best in old.lrs else new.head
    return CellFit(head, best, val_accs[lrs.index(best)], val_accs, lrs)


def sweep_heads(
    train_features: FeatureTable | Mapping[Hashable, torch.Tensor],
    train_labels: torch.Tensor,
    num_classes: int,
    recipe: ProbeRecipe,
    val_features: FeatureTable | Mapping[Hashable, torch.Tensor],
    val_labels: torch.Tensor,
    seed: int = 0,
    device: Device | None = None,
    trainer: Callable[..., dict[Hashable, CellFit]] = train_heads,
    max_extensions: int = MAX_EXTENSIONS,
) -> dict[Hashable, CellFit]:
    """``trainer`` (``train_heads`` or ``fused.train_mlp_heads``) over ``recipe.lrs`` for every cell of the (N, D)
    train features, then over the next rates out for the cells whose chosen lr sits at an edge (see the module
    docstring). Returns each cell's fit; ``fit.lrs`` lists every rate it tried."""
    train = FeatureTable.from_tensors(train_features)
    val = FeatureTable.from_tensors(val_features)
    fits = trainer(train, train_labels, num_classes, recipe, val, val_labels, seed=seed, device=device)
    made = 0
    for extension in range(1, max_extensions + 1):
        groups: dict[tuple[float, ...], list[Hashable]] = {}
        for key, fit in fits.items():
            lrs = next_lrs(fit.lrs, edge(fit)) if edge(fit) else ()
            if lrs:
                groups.setdefault(lrs, []).append(key)
        if not groups:
            break
        made = extension
        for lrs, keys in groups.items():
            logger.warning(
                f"{len(keys)} cell(s) chose lr {fits[keys[0]].lr:g} at the edge of the sweep: extending it to "
                f"{', '.join(f'{lr:g}' for lr in lrs)} (extension {extension} of at most {max_extensions})."
            )
            more = trainer(train.select(keys), train_labels, num_classes, replace(recipe, lrs=lrs),
                           val.select(keys), val_labels, seed=seed, device=device)  # fmt: skip
            for key in keys:
                fits[key] = merged(fits[key], more[key])
    still = [key for key, fit in fits.items() if edge(fit)]
    if still:
        logger.warning(
            f"{len(still)} cell(s) still chose an lr at the edge of what they tried, after {made} extension(s) "
            f"(at most {max_extensions}, within {LR_RANGE[0]:g}..{LR_RANGE[1]:g})."
        )
    return fits


__all__ = ["MAX_EXTENSIONS", "edge", "edge_of", "merged", "next_lrs", "sweep_heads"]
