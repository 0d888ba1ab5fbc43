"""Linear probe heads on frozen features.

Many heads -- one per (layer, timestep) cell and learning rate -- are trained together in
one pass over the same mini-batches (as DINOv2's linear evaluation), with Adam and a cosine
schedule. Features are standardised with training statistics before the head by default: a
``BatchNorm1d(D, affine=False, eps=1e-5)`` in eval mode with running stats ``mean``/``var``.
Each cell's learning rate is chosen on held-out validation data, never on test data.

Features come as a :class:`~ddae_diffusers.probing.table.FeatureTable` (or a mapping of tensors) and are read one
mini-batch at a time: memory holds the heads and one (batch, sum of widths) block, whatever the number of rows.
Heads train on one device (``device``; default: the features' device, the CPU for tables read from the cache):
blocks of any device and float dtype are moved there one mini-batch at a time. Mini-batches are drawn on the CPU,
so every device sees the same ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .table import Device, FeatureTable, block_to, column_stats, compute_device, to_device

EPS = 1e-5
NORMALIZATIONS = ("standardize", "none")


@dataclass(frozen=True)
class ProbeRecipe:
    """How the linear heads are trained.

    The default standardises features and trains each head to convergence over a few
    learning rates (half-decade steps from 1e-3 to 10, widened by :func:`~.sweep.sweep_heads` for a cell whose
    best rate sits at an edge); :data:`PAPER_RECIPE` is the DDAE paper's (raw features, Adam lr 1e-3,
    15 epochs, batch 128, cosine).
    """

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)  # extended at an edge: sweep.py
    epochs: int = 30
    batch_size: int = 256
    normalization: str = "standardize"

    def __post_init__(self):
        if not self.lrs or any(not (lr > 0) for lr in self.lrs):
            raise UsageError(f"Learning rates must be positive numbers, got {self.lrs}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.")


PAPER_RECIPE = ProbeRecipe(lrs=(1e-3,), epochs=15, batch_size=128, normalization="none")


def standardize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(N, D) -> ``(x - mean) / sqrt(var + 1e-5)``, i.e. ``BatchNorm1d(affine=False)`` in eval mode."""
    return (x.float() - mean) * torch.rsqrt(var + EPS)


@dataclass
class LinearHead:
    """A trained head: ``logits = W @ standardize(x) + b`` (no standardisation when ``mean`` is None).

    Shapes: ``weight`` (C, D), ``bias`` (C,), ``mean``/``var`` (D,).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None

    def to(self, device: Device) -> LinearHead:
        """This head with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if self.weight.device == device:
            return self
        mean, var = (None, None) if self.mean is None else (self.mean.to(device), self.var.to(device))
        return LinearHead(self.weight.to(device), self.bias.to(device), mean, var)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) raw features (any float dtype, on the head's device) -> (N, C) float32 logits."""
        if self.mean is not None:
            x = standardize(x, self.mean, self.var)
        return F.linear(x.float(), self.weight, self.bias)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy in [0, 1] on (N, D) raw features with (N,) labels."""
        return accuracy(self.logits(x).argmax(1), y)


@dataclass
class CellFit:
    """The head chosen for one cell, its learning rate and validation accuracy (None without validation);
    ``val_accs`` holds the validation accuracy of each of ``lrs``, the rates tried (ascending)."""

    head: LinearHead
    lr: float
    val_acc: float | None
    val_accs: list[float] = field(default_factory=list)
    lrs: tuple[float, ...] = ()


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``predicted == labels`` (both (N,))."""
    return (predicted.long() == labels.long()).float().mean().item()


class HeadBank(torch.nn.Module):
    """One zero-initialised linear head per (cell, learning rate), all trained by one Adam.

    ``dims`` maps a cell key to its feature width D. Cells of equal width are stacked and
    computed with one batched matmul; each learning rate is a parameter group, so every head
    follows its own schedule while all heads see the same mini-batches. The parameters live on ``device``
    (default: the CPU), and so must the inputs of :meth:`loss`.
    """

    def __init__(
        self, dims: Mapping[Hashable, int], num_classes: int, lrs: Sequence[float], device: Device | None = None
    ):
        super().__init__()
        device = torch.device("cpu" if device is None else device)
        self.lrs = [float(lr) for lr in lrs]
        self.keys = list(dims)
        widths = sorted(set(dims.values()))
        self.groups = [[key for key in self.keys if dims[key] == width] for width in widths]
        self.weights = torch.nn.ParameterList()  # [group * L + l]: (n_g, D_g, C)
        self.biases = torch.nn.ParameterList()  # [group * L + l]: (n_g, 1, C)
        for keys, width in zip(self.groups, widths, strict=True):
            for _ in self.lrs:
                self.weights.append(torch.nn.Parameter(torch.zeros(len(keys), width, num_classes, device=device)))
                self.biases.append(torch.nn.Parameter(torch.zeros(len(keys), 1, num_classes, device=device)))

    @property
    def device(self) -> torch.device:
        """Where the heads' parameters are."""
        return self.weights[0].device if len(self.weights) else torch.device("cpu")

    def stack(self, features: Mapping[Hashable, torch.Tensor]) -> list[torch.Tensor]:
        """``{key: (B, D)}`` -> one (n_g, B, D_g) float32 tensor per group of equal-width cells."""
        return [torch.stack([features[key].float() for key in keys]) for keys in self.groups]

    def logits(self, group: int, x: torch.Tensor) -> torch.Tensor:
        """(n_g, B, D_g) head inputs of one group -> (L, n_g, B, C) logits."""
        per_lr = []
        for index in range(len(self.lrs)):
            weight, bias = self.weights[group * len(self.lrs) + index], self.biases[group * len(self.lrs) + index]
            per_lr.append(torch.baddbmm(bias, x, weight))
        return torch.stack(per_lr)

    def loss(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum over cells and learning rates of the mean cross-entropy; ``inputs`` from :meth:`stack`, ``labels``
        (B,), both on the heads' device."""
        total = 0.0
        for group, x in enumerate(inputs):
            logits = self.logits(group, x)
            repeats = logits.shape[0] * logits.shape[1]
            total = (
                total
                + F.cross_entropy(logits.flatten(0, 2), labels.long().repeat(repeats), reduction="sum")
                / labels.shape[0]
            )
        return total

    def optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Adam with one parameter group per lr, and a cosine decay to 0 over ``total_steps``."""
        groups = []
        for index, lr in enumerate(self.lrs):
            members = range(index, len(self.weights), len(self.lrs))
            params = [self.weights[i] for i in members] + [self.biases[i] for i in members]
            groups.append({"params": params, "lr": lr})
        optimizer = torch.optim.Adam(groups)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))

    def _locate(self, key: Hashable) -> tuple[int, int]:
        group = next(g for g, keys in enumerate(self.groups) if key in keys)
        return group, self.groups[group].index(key)

    def head(self, key: Hashable, lr_index: int, stats: tuple[torch.Tensor, torch.Tensor] | None) -> LinearHead:
        """The trained head of ``key`` at learning rate ``lrs[lr_index]`` (a detached copy, on the bank's device)."""
        group, row = self._locate(key)
        weight = self.weights[group * len(self.lrs) + lr_index][row].T
        bias = self.biases[group * len(self.lrs) + lr_index][row, 0]
        mean, var = stats if stats is not None else (None, None)
        return LinearHead(weight.detach().clone(), bias.detach().clone(), mean, var)


@contextlib.contextmanager
def single_thread(device: Device | None = None) -> Iterator[None]:
    """Runs the block on one CPU thread when it computes on the CPU (``device`` None or a CPU): head matmuls are
    tiny, and extra threads only wait on each other. On another device it changes nothing."""
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def minibatches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of a seeded random permutation of ``range(num_examples)``, ``batch_size`` at a time."""
    order = torch.randperm(num_examples, generator=generator)
    yield from order.split(batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def choose_lr(val_accs: Sequence[float]) -> int:
    """Index of the best validation accuracy; ties go to the smaller index (smaller lr if sorted)."""
    return max(range(len(val_accs)), key=lambda i: (val_accs[i], -i))


def checked_table(features: FeatureTable | Mapping[Hashable, torch.Tensor], labels: torch.Tensor) -> FeatureTable:
    """``features`` as a table whose rows match ``labels`` (N,); a one-line error otherwise."""
    table = FeatureTable.from_tensors(features)
    if table.num_rows != labels.shape[0]:
        raise UsageError(f"{table.num_rows} feature rows do not match {labels.shape[0]} labels.")
    return table


def head_correct(
    heads: Mapping[Hashable, Sequence],
    features: FeatureTable | Mapping[Hashable, torch.Tensor],
    labels: torch.Tensor,
    device: Device | None = None,
) -> dict[Hashable, list[torch.Tensor]]:
    """``{key: [(N,) bool on the CPU: whether each head classifies each row right]}`` on ``features[key]`` (N, D)
    with ``labels`` (N,), read in blocks and computed on ``device`` (default: the features' device).

    A head is anything with ``logits((B, D) raw features) -> (B, C)``; one with ``to(device)`` (``LinearHead``,
    ``MLPHead``) is moved to ``device`` first, any other must be there already."""
    features = checked_table(features, labels)
    device = compute_device(device, features)
    labels = to_device(labels, device).long()
    heads = {
        key: [head.to(device) if hasattr(head, "to") else head for head in models] for key, models in heads.items()
    }
    correct = {
        key: torch.zeros(len(models), features.num_rows, dtype=torch.bool, device=device)
        for key, models in heads.items()
    }
    for rows, block in features.select(heads).chunks():
        index = to_device(torch.from_numpy(rows), device)
        labels_block = labels[index]
        block = block_to(block, device)
        with torch.no_grad():
            for key, models in heads.items():
                for i, head in enumerate(models):
                    correct[key][i, index] = head.logits(block[key]).argmax(1) == labels_block
    return {key: list(flags.cpu().unbind(0)) for key, flags in correct.items()}


def head_accuracies(
    heads: Mapping[Hashable, Sequence],
    features: FeatureTable | Mapping[Hashable, torch.Tensor],
    labels: torch.Tensor,
    device: Device | None = None,
) -> dict[Hashable, list[float]]:
    """``{key: [accuracy in [0, 1] of each head]}``: :func:`head_correct` averaged over the rows."""
    correct = head_correct(heads, features, labels, device)
    return {key: [flags.sum().item() / max(len(flags), 1) for flags in rows] for key, rows in correct.items()}


def train_heads(
    train_features: FeatureTable | Mapping[Hashable, torch.Tensor],
    train_labels: torch.Tensor,
    num_classes: int,
    recipe: ProbeRecipe = ProbeRecipe(),
    val_features: FeatureTable | Mapping[Hashable, torch.Tensor] | None = None,
    val_labels: torch.Tensor | None = None,
    seed: int = 0,
    device: Device | None = None,
) -> dict[Hashable, CellFit]:
    """Trains one head per cell and learning rate on (N, D_cell) features with labels (N,); returns each cell's
    chosen head.

    With several learning rates, the choice is made on ``val_features``/``val_labels`` (held-out
    training data); with one, validation is optional and only reported. Features are read one mini-batch at a
    time (and once more, in blocks, for the standardisation statistics) and moved to ``device`` (default: the
    training features' device), where the heads train and stay.
    """
    if len(recipe.lrs) > 1 and val_features is None:
        raise UsageError("Choosing among several learning rates needs validation features (val_features).")
    train = checked_table(train_features, train_labels)
    device = compute_device(device, train)
    labels = to_device(train_labels, device).long()
    stats = column_stats(train, device=device) if recipe.normalization == "standardize" else {}

    def inputs(rows: torch.Tensor) -> dict[Hashable, torch.Tensor]:
        block = block_to(train.read(rows), device)
        return {key: standardize(x, *stats[key]) if stats else x.float() for key, x in block.items()}

    bank = HeadBank(train.dims, num_classes, recipe.lrs, device=device)
    optimizer, schedule = bank.optimizer(recipe.epochs * steps_per_epoch(labels.shape[0], recipe.batch_size))
    generator = torch.Generator().manual_seed(seed)
    with single_thread(device):
        for _ in range(recipe.epochs):
            for index in minibatches(labels.shape[0], recipe.batch_size, generator):
                loss = bank.loss(bank.stack(inputs(index)), labels[to_device(index, device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    val = None if val_features is None else checked_table(val_features, val_labels)
    return select_heads(bank, stats, val, val_labels, device=device)


def select_heads(
    bank: HeadBank,
    stats: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]],
    val_features: FeatureTable | Mapping[Hashable, torch.Tensor] | None,
    val_labels: torch.Tensor | None,
    device: Device | None = None,
) -> dict[Hashable, CellFit]:
    """Each cell's head with the best validation accuracy (the only head when there is one lr), on the bank's device.

    ``stats``: ``{key: (mean, var)}`` (D,) of standardised cells; validation is read in blocks and scored on
    ``device`` (default: the bank's)."""
    candidates = {key: [bank.head(key, i, stats.get(key)) for i in range(len(bank.lrs))] for key in bank.keys}
    all_val_accs = {}
    if val_features is not None:
        device = bank.device if device is None else device
        all_val_accs = head_accuracies(candidates, val_features, val_labels, device=device)
    fits = {}
    for key in bank.keys:
        val_accs = all_val_accs.get(key, [])
        chosen = choose_lr(val_accs) if val_accs else 0
        fits[key] = CellFit(
            candidates[key][chosen],
            bank.lrs[chosen],
            val_accs[chosen] if val_accs else None,
            val_accs,
            tuple(bank.lrs),
        )
    return fits


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    eval_x: torch.Tensor,
    eval_y: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 30,
    lr: float = 3e-3,
    seed: int = 0,
    device: Device | None = None,
) -> float:
    """Test accuracy in [0, 1] of one standardised linear probe (Adam, cosine) on (N, D) features with (N,) labels.

    A quick, converging probe for monitoring; the grid search uses :func:`train_heads` directly. It trains and
    scores on ``device`` (default: the training features' device).
    """
    if num_classes is None:
        num_classes = max(int(train_y.max()), int(eval_y.max())) + 1
    device = train_x.device if device is None else torch.device(device)
    recipe = ProbeRecipe(lrs=(lr,), epochs=epochs, batch_size=256, normalization="standardize")
    fit = train_heads({"x": train_x}, train_y, num_classes, recipe, seed=seed, device=device)["x"]
    return fit.head.to(device).accuracy(to_device(eval_x, device), to_device(eval_y, device))
