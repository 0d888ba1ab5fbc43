"""Few-shot probes: logistic regression on ``k`` labelled images per class, over several random draws.

For each ``k`` of ``--few_shot`` and each of ``--few_shot_seeds`` draws, ``k`` training rows per class are drawn
(without replacement, from the rows the full probe trains on), a logistic regression (:mod:`.logistic`) is fitted on
their cached features with ``C`` chosen on the validation rows, and scored on the whole test split. The mean and
standard deviation over draws are reported with every draw's accuracy.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ..capture import derive_seed
from ..errors import UsageError
from .heads import head_accuracies
from .logistic import train_logistic
from .table import Device, FeatureTable

FEW_SHOT_SEEDS = 3
_FEW_SHOT_STREAM = 11  # derive_seed(seed, stream, k, draw): the draws' own random stream


def few_shot_rows(labels: torch.Tensor | np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Ascending indices into ``labels`` (N,): ``shots`` rows of every class present, drawn without replacement
    from ``seed``; a one-line error when a class has fewer rows."""
    labels = np.asarray(labels)
    if shots < 1:
        raise UsageError(f"--few_shot takes images per class >= 1, got {shots}.")
    rng = np.random.default_rng(seed)
    rows = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise UsageError(
                f"Class {int(label)} has {len(members)} training rows, fewer than --few_shot {shots}: "
                "pass smaller shot counts."
            )
        rows.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(rows))


def few_shot(
    train: FeatureTable,
    train_labels: torch.Tensor,
    val: FeatureTable,
    val_labels: torch.Tensor,
    test: FeatureTable,
    test_labels: torch.Tensor,
    num_classes: int,
    shots: Sequence[int],
    seeds: int = FEW_SHOT_SEEDS,
    seed: int = 0,
    device: Device | None = None,
) -> dict[Hashable, list[dict]]:
    """``{key: [{"shots", "accs", "mean", "std", "Cs"}, ...]}`` for every cell of ``train`` (N, D) and each shot
    count: ``seeds`` draws (:func:`few_shot_rows` from ``derive_seed(seed, stream, k, draw)``), accuracies in
    [0, 1] on ``test``; ``Cs`` are the inverse regularisation strengths chosen on ``val`` per draw."""
    out: dict[Hashable, list[dict]] = {key: [] for key in train}
    for k in shots:
        accs: dict[Hashable, list[float]] = {key: [] for key in train}
        chosen: dict[Hashable, list[float]] = {key: [] for key in train}
        for draw in range(seeds):
            rows = few_shot_rows(train_labels, k, derive_seed(seed, _FEW_SHOT_STREAM, k, draw))
            fits = train_logistic(train.subset(rows), train_labels[rows], num_classes, val, val_labels, device=device)
            scores = head_accuracies({key: [fit.head] for key, fit in fits.items()}, test, test_labels, device)
            for key, fit in fits.items():
                accs[key].append(scores[key][0])
                chosen[key].append(fit.C)
        for key in train:
            values = np.array(accs[key])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            out[key].append({"shots": int(k), "accs": values.tolist(), "mean": float(values.mean()), "std": std,
                             "Cs": chosen[key]})  # fmt: skip
    return out


__all__ = ["FEW_SHOT_SEEDS", "few_shot", "few_shot_rows"]
