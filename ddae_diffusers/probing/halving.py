"""Successive halving over noise levels: ``ddae-probe --search halving``.

One forward per (image, noise level) captures every layer, so a grid costs what its noise levels cost. Halving
scores every cell on a random ``eta**-R`` of the train split (fit and validation rows alike), keeps the
``1/eta`` of the noise levels whose best cell is best on validation, grows the rows ``eta``-fold and repeats
until one level is left; the run then finishes that level (every layer) on the full splits, as an exhaustive
grid would. Each rung's rows contain the previous rung's, and every computed row stays in the feature cache, so
nothing is computed twice (and later runs on the same cache reuse it all).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..distributed import broadcast_from_main
from ..noise import NoiseLevel
from .cache import FeatureCache, View, ViewRole
from .heads import ProbeRecipe, train_heads


def rung_plan(num_levels: int, eta: int) -> list[int]:
    """How many noise levels each elimination rung scores: 7 levels, eta 3 -> [7, 3] (then 1 is finished)."""
    counts = []
    while num_levels > 1:
        counts.append(num_levels)
        num_levels = math.ceil(num_levels / eta)
    return counts


def successive_halving(
    prep,
    cache_for: Callable[[list[NoiseLevel]], FeatureCache],
    extract: dict,
    recipe: ProbeRecipe,
    accelerator=None,
) -> tuple[list[NoiseLevel], dict]:
    """Runs the elimination rungs on the clean train view; returns the surviving level(s) and the record of the
    search (``results.json["search"]``; filled on the main process).

    ``prep``: the run's ``engine.Prepared``; ``cache_for(levels)``: the run's feature cache over ``levels``;
    ``extract``: keyword arguments of ``FeatureCache.extract`` (batch size, accelerator, progress)."""
    config = prep.config
    eta = config.halving_eta
    is_main = accelerator is None or accelerator.is_main_process
    generator = torch.Generator().manual_seed(config.seed)
    fit_order = [prep.fit_rows[i] for i in torch.randperm(len(prep.fit_rows), generator=generator).tolist()]
    val_order = [prep.val_rows[i] for i in torch.randperm(len(prep.val_rows), generator=generator).tolist()]
    levels, plan, rungs = list(prep.timesteps), rung_plan(len(prep.timesteps), eta), []
    forwards, computed_rows = 0, 0
    for k in range(len(plan)):
        fraction = float(eta) ** (k - len(plan))
        fit = sorted(fit_order[: max(2, round(fraction * len(fit_order)))])
        val = sorted(val_order[: max(1, round(fraction * len(val_order)))])
        rows = sorted(fit + val)
        forwards += (len(rows) - computed_rows) * len(levels)  # rows of earlier rungs are cached at these levels
        computed_rows = len(rows)
        features = cache_for(levels).extract(
            prep.train, config.train_split, prep.image_column, View(ViewRole.TRAIN, 0, False), rows=rows, **extract
        )
        kept = None
        if is_main:
            position = {row: i for i, row in enumerate(rows)}
            fit_index = torch.tensor([position[row] for row in fit])
            val_index = torch.tensor([position[row] for row in val])
            fits = train_heads(
                features.subset(fit_index), prep.train_labels[fit], prep.num_labels, recipe,
                features.subset(val_index), prep.train_labels[val], seed=config.seed, device=prep.backbone.device,
            )
            best = {t: max(((fits[layer, t].val_acc, layer) for layer in prep.layers), key=lambda v: v[0])
                    for t in levels}
            ranked = sorted(levels, key=lambda t: -best[t][0])  # stable: ties keep the smaller level
            kept = ranked[: math.ceil(len(levels) / eta)]
            rungs.append({
                "fit_rows": len(fit), "val_rows": len(val),
                "levels": [{"level": t, "best_layer": best[t][1], "val_acc": best[t][0]} for t in levels],
                "kept": [t for t in levels if t in kept],
            })  # fmt: skip
        kept = broadcast_from_main(kept, accelerator)  # the other ranks wait on the host while the heads train
        levels = [t for t in levels if t in kept]
    num_train, num_eval, views = len(prep.train), len(prep.eval), config.train_views
    forwards += (num_train - computed_rows + (views - 1) * num_train + num_eval) * len(levels)
    record = {
        "method": "halving",
        "eta": eta,
        "rungs": rungs,
        "finished": levels,
        # (image, noise level) forwards on an empty cache, this search against the exhaustive grid
        "forwards": forwards,
        "exhaustive_forwards": (views * num_train + num_eval) * len(prep.timesteps),
    }
    return levels, record
