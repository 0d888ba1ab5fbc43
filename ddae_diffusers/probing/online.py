"""The DDAE paper's probing protocol, as a faithful (slow) reference.

Features are recomputed every epoch with fresh noise and a fresh random crop (pad 4) + flip;
one forward per (batch, timestep) captures all layers; one raw-feature linear head per
(layer, timestep) is trained with Adam (lr 1e-3), batch 128, a cosine schedule, 15 epochs. The heads train on one
``device`` (default: the backbone's), where the features are computed: on a GPU nothing goes through the CPU but
the kNN bank and the validation features, kept there to spare device memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..capture import DDAEBackbone
from .cache import View
from .heads import PAPER_RECIPE, HeadBank, ProbeRecipe, minibatches, select_heads, single_thread, steps_per_epoch
from .sharding import sharded_rows
from .table import Device, to_device

ONLINE_ROLE = 2  # seeds of the online views differ from the cached train (0) and eval (1) views


def sharded_features(
    backbone: DDAEBackbone,
    dataset,
    image_column: str,
    ids: Sequence[int],
    view: View,
    layers: Sequence[str],
    timesteps: Sequence[int],
    resolution: int,
    seed: int,
    dtype: torch.dtype | None,
    accelerator=None,
    device: Device | None = None,
) -> dict[tuple[str, int], torch.Tensor]:
    """``{(layer, t): (B, D)}`` float32 of examples ``ids``, on ``device`` (default: the CPU) on every rank; rank
    ``r`` computes ``ids[r::world]`` (:func:`~.sharding.sharded_rows`)."""
    device = torch.device("cpu" if device is None else device)
    keys = [(layer, t) for t in timesteps for layer in layers]
    dims = [backbone.layer_info(layer).feature_dim for layer in layers] * len(timesteps)

    def compute(mine: list[int]) -> torch.Tensor:
        pixels = view.pixels(dataset.select(mine)[image_column], mine, resolution, seed)
        features = backbone.features(
            pixels, layers, timesteps, seed=view.noise_seed(seed), example_ids=mine, dtype=dtype
        )
        return torch.cat([features[key] for key in keys], dim=1)

    block = sharded_rows(ids, compute, sum(dims), accelerator)
    return dict(zip(keys, block.to(device).split(dims, dim=1), strict=True))


def train_online(
    backbone: DDAEBackbone,
    dataset,
    image_column: str,
    labels: torch.Tensor,
    train_rows: Sequence[int],
    val_rows: Sequence[int],
    layers: Sequence[str],
    timesteps: Sequence[int],
    resolution: int,
    num_classes: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    recipe: ProbeRecipe = PAPER_RECIPE,
    accelerator=None,
    progress: bool = True,
    device: Device | None = None,
):
    """Trains the paper's heads on features recomputed every epoch, on ``device`` (default: the backbone's).

    ``labels`` (N,) covers the whole ``dataset``; ``train_rows``/``val_rows`` index it.
    Returns ``(fits, knn_bank, knn_labels)``: each cell's :class:`~.heads.CellFit` (heads on ``device``; validation
    on the ``val_rows`` of augmented train view 0, as in the cached protocol) and the last epoch's features
    ``{(layer, t): (N_train, D)}`` (float16, CPU) with their labels (N_train,), for kNN.
    """
    from tqdm.auto import tqdm

    device = backbone.device if device is None else torch.device(device)
    is_main = accelerator is None or accelerator.is_main_process
    keys = [(layer, t) for t in timesteps for layer in layers]
    dims = {(layer, t): backbone.layer_info(layer).feature_dim for layer, t in keys}
    bank = HeadBank(dims, num_classes, recipe.lrs, device=device)
    optimizer, schedule = bank.optimizer(recipe.epochs * steps_per_epoch(len(train_rows), recipe.batch_size))
    generator = torch.Generator().manual_seed(seed)
    train_rows = torch.as_tensor(list(train_rows))
    labels_on_device = to_device(labels, device).long()
    last: dict = {key: [] for key in keys}
    last_labels = []
    common = dict(
        layers=layers, timesteps=timesteps, resolution=resolution, seed=seed, dtype=dtype, accelerator=accelerator
    )
    bar = tqdm(
        total=recipe.epochs * steps_per_epoch(len(train_rows), recipe.batch_size),
        desc="online probe",
        disable=not (progress and is_main),
    )
    for epoch in range(recipe.epochs):
        view = View(ONLINE_ROLE, epoch, augment=True)
        for index in minibatches(len(train_rows), recipe.batch_size, generator):
            ids = train_rows[index].tolist()
            features = sharded_features(backbone, dataset, image_column, ids, view, device=device, **common)
            with single_thread(device):
                loss = bank.loss(bank.stack(features), labels_on_device[to_device(train_rows[index], device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if epoch == recipe.epochs - 1:
                for key in keys:
                    last[key].append(features[key].half().cpu())
                last_labels.append(labels[ids])
            bar.update(1)
    bar.close()
    val_features = {}
    val_rows = list(val_rows)
    for start in range(0, len(val_rows), recipe.batch_size):
        ids = val_rows[start : start + recipe.batch_size]
        for key, value in sharded_features(backbone, dataset, image_column, ids, View(0, 0, False), **common).items():
            val_features.setdefault(key, []).append(value)
    val_features = {key: torch.cat(values) for key, values in val_features.items()}
    fits = select_heads(bank, {}, val_features, labels[val_rows], device=device)
    knn_bank = {key: torch.cat(values) for key, values in last.items()}
    return fits, knn_bank, torch.cat(last_labels)
