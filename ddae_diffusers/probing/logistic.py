"""Logistic-regression probe: full-batch L-BFGS multinomial logistic regression on standardised features.

The third probe next to the mini-batch linear heads and kNN, as in DINOv2's evaluation: each cell's features are
standardised with the training statistics, a multinomial logistic regression is fitted for every inverse
regularisation strength ``C`` of a grid, and the ``C`` with the best validation accuracy is kept.

The objective is scikit-learn's ``LogisticRegression(C=C, solver="lbfgs")`` (L2 penalty, multinomial, intercept not
penalised), ``0.5 * ||W||^2 + C * sum_i CE_i``, divided by ``C * N`` so that it is a mean::

    mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 * C * N)

The same ``C`` therefore has the same optimum as scikit-learn's, and ``tol`` means what it means there (L-BFGS stops
when the largest gradient component of this mean objective is at most ``tol``). For two classes scikit-learn fits the
binomial form instead, whose optimum equals this one at twice the ``C``.

Everything runs in torch on the features' device (a GPU when they are there), in float32 by default.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .heads import LinearHead, checked_table, choose_lr, head_accuracies, standardize
from .table import CHUNK_ROWS, Device, FeatureTable, column_stats, compute_device, to_device

# Inverse regularisation strengths, log-spaced one decade apart and sorted from the strongest regularisation. The
# penalty per example is 1 / (2 * C * N), so the useful range moves with N: on standardised features, 1e-4 shrinks the
# weights almost to zero for a few thousand rows and still clearly regularises 10^5, while 1e2 is nearly
# unregularised at any of these sizes. Wider than that only adds slow, unconverged fits at the weak end.
LOGISTIC_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)
MAX_ITER = 1000  # L-BFGS iterations per C (scikit-learn's default is 100; DINOv2 uses 1000)
TOL = 1e-6  # on the largest gradient component of the mean objective (scikit-learn's default is 1e-4)
HISTORY = 20  # L-BFGS memory: pairs of (step, gradient change) kept


@dataclass
class LogisticFit:
    """The logistic regression chosen for one cell.

    ``head`` takes raw features (the standardisation is folded in as its ``mean``/``var``); ``C`` is the chosen
    inverse regularisation strength; ``val_accs`` holds the validation accuracy of each ``Cs`` (sorted ascending),
    ``val_acc`` the chosen one's (None without validation).
    """

    head: LinearHead
    C: float
    val_acc: float | None
    val_accs: list[float] = field(default_factory=list)
    Cs: tuple[float, ...] = ()


def objective(
    head: LinearHead, x: torch.Tensor, y: torch.Tensor, C: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The minimised objective, ``mean CE + ||W||^2 / (2 C N)``, of ``head`` (without its standardisation) on (N, D)
    features ``x`` and (N,) labels ``y``; a 0-d tensor of ``dtype``."""
    weight, bias = head.weight.to(x.device, dtype), head.bias.to(x.device, dtype)
    logits = F.linear(x.to(dtype), weight, bias)
    return F.cross_entropy(logits, y.to(x.device).long()) + weight.square().sum() / (2 * C * x.shape[0])


def check_C(C: float) -> float:
    """``C`` as a float; a one-line error unless it is a positive finite number."""
    try:
        value = float(C)
    except (TypeError, ValueError):
        raise UsageError(f"C (inverse regularisation strength) must be a positive number, got {C!r}.") from None
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"C (inverse regularisation strength) must be a positive finite number, got {C!r}.")
    return value


def check_labels(y: torch.Tensor, num_rows: int, num_classes: int) -> None:
    """A one-line error unless ``y`` is (num_rows,) integer labels in ``[0, num_classes)``."""
    if num_classes < 2:
        raise UsageError(f"Logistic regression needs num_classes >= 2, got {num_classes}.")
    if y.dim() != 1 or y.shape[0] != num_rows:
        raise UsageError(f"Labels must be ({num_rows},) to match the feature rows, got shape {tuple(y.shape)}.")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise UsageError(f"Labels must be integer class ids, got dtype {y.dtype}.")
    if num_rows and not (int(y.min()) >= 0 and int(y.max()) < num_classes):
        raise UsageError(f"Labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}.")


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    init: LinearHead | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearHead:
    """Multinomial logistic regression on (N, D) features ``x`` with (N,) labels ``y``: a head with ``weight``
    (num_classes, D) and ``bias`` (num_classes,), float32 on ``x``'s device, that applies no standardisation.

    Minimises ``mean CE + ||W||^2 / (2 C N)`` (scikit-learn's objective for the same ``C``) with full-batch L-BFGS and
    a strong-Wolfe line search, in ``dtype`` (float32, or float64 where the device has it), on ``x``'s device; stops
    after ``max_iter`` iterations or when no gradient component exceeds ``tol``. ``init`` (a head for the same inputs,
    e.g. the fit at the next smaller ``C``) is the starting point; zeros otherwise. ``x`` is used as given: standardise
    it first for the usual probe (:func:`train_logistic` does).
    """
    C = check_C(C)
    if x.dim() != 2 or x.shape[0] == 0:
        raise UsageError(f"Features must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}.")
    check_labels(y, x.shape[0], num_classes)
    if int(max_iter) < 1 or not (tol >= 0):
        raise UsageError(f"max_iter must be >= 1 and tol >= 0, got {max_iter} and {tol}.")
    if not dtype.is_floating_point:
        raise UsageError(f"fit_logistic computes in a float dtype, got {dtype}.")
    num_rows, width = x.shape
    device = x.device
    x = x.detach().to(dtype)
    y = y.to(device).long()
    if init is None:
        weight = torch.zeros(num_classes, width, device=device, dtype=dtype)
        bias = torch.zeros(num_classes, device=device, dtype=dtype)
    else:
        if tuple(init.weight.shape) != (num_classes, width) or tuple(init.bias.shape) != (num_classes,):
            raise UsageError(
                f"init must have weight ({num_classes}, {width}) and bias ({num_classes},), got "
                f"{tuple(init.weight.shape)} and {tuple(init.bias.shape)}."
            )
        weight = init.weight.detach().to(device, dtype).clone()
        bias = init.bias.detach().to(device, dtype).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    strength = 1.0 / (C * num_rows)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=int(max_iter),
        max_eval=int(max_iter) * 2,
        tolerance_grad=float(tol),
        tolerance_change=torch.finfo(dtype).eps * 1e-2,
        history_size=HISTORY,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * strength * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearHead(weight.detach().float(), bias.detach().float())


def load_column(table: FeatureTable, key: Hashable, device: torch.device) -> torch.Tensor:
    """All rows of ``table[key]`` as one (N, D) float32 tensor on ``device``, filled one block at a time."""
    matrix = torch.empty(table.num_rows, table.dims[key], device=device)
    for rows, block in table.select([key]).chunks():
        matrix[int(rows[0]) : int(rows[-1]) + 1] = to_device(block[key], device)
    return matrix


def standardized_column(
    table: FeatureTable, key: Hashable, device: torch.device
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``table[key]`` standardised with its own column statistics, as (N, D) float32 on ``device``, and those
    statistics ``(mean, var)``, each (D,). The column is read once; the result takes N * D * 4 bytes."""
    matrix = load_column(table, key, device)
    mean, var = column_stats(FeatureTable.from_tensors({key: matrix}), device=device)[key]
    for start in range(0, matrix.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        matrix[rows] = standardize(matrix[rows], mean, var)
    return matrix, (mean, var)


def train_logistic(
    train_features: FeatureTable | Mapping[Hashable, torch.Tensor],
    train_labels: torch.Tensor,
    num_classes: int,
    val_features: FeatureTable | Mapping[Hashable, torch.Tensor] | None,
    val_labels: torch.Tensor | None,
    Cs: Sequence[float] = LOGISTIC_CS,
    device: Device | None = None,
    max_rows_in_memory: int | None = None,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    dtype: torch.dtype = torch.float32,
) -> dict[Hashable, LogisticFit]:
    """Fits a logistic regression per cell of (N, D_cell) features with (N,) labels over ``Cs`` and keeps, for each
    cell, the ``C`` with the best accuracy on ``val_features``/``val_labels`` (held-out training data); ties go to
    the smaller ``C`` (stronger regularisation).

    Each cell is standardised with its training statistics and fitted along ``sorted(Cs)``, each fit starting from
    the previous one (strongest regularisation first). The chosen head takes raw features. Validation is needed
    with several ``Cs``; with one it is optional and only reported.

    Memory: full-batch L-BFGS holds one cell's whole training matrix on ``device`` (default: the training
    features' device) at a time: N * D * 4 bytes in float32 (and a float64 copy, N * D * 8 bytes more, with
    ``dtype=torch.float64``), plus one block of the table and a few (N, num_classes) buffers. The column is read from
    the table once, one block at a time. ``max_rows_in_memory``, when given, refuses training sets with more rows
    than that before anything is read (fit a row subset, ``table.subset(rows)``, instead). Validation is read per
    cell, one block at a time.
    """
    if not isinstance(Cs, Sequence) or isinstance(Cs, str):
        raise UsageError(f"Cs must be a sequence of positive numbers, got {Cs!r}.")
    Cs = sorted({check_C(C) for C in Cs})
    if not Cs:
        raise UsageError("Cs must hold at least one inverse regularisation strength.")
    if len(Cs) > 1 and val_features is None:
        raise UsageError("Choosing among several C values needs validation features (val_features).")
    train = checked_table(train_features, train_labels)
    check_labels(train_labels, train.num_rows, num_classes)
    if train.num_rows == 0:
        raise UsageError("Logistic regression needs at least one training row.")
    if max_rows_in_memory is not None and train.num_rows > max_rows_in_memory:
        width = max(train.dims.values(), default=0)
        raise UsageError(
            f"Full-batch logistic regression holds all {train.num_rows} training rows in memory "
            f"({train.num_rows * width * 4 / 2**30:.1f} GiB for the widest cell), over max_rows_in_memory="
            f"{max_rows_in_memory}: fit a row subset or raise the limit."
        )
    val = None
    if val_features is not None:
        if val_labels is None:
            raise UsageError("val_features needs val_labels.")
        val = checked_table(val_features, val_labels)
        missing = [key for key in train.dims if key not in val.dims]
        if missing:
            raise UsageError(f"Validation features lack the training cells {missing}.")
        check_labels(val_labels, val.num_rows, num_classes)
    device = compute_device(device, train)
    labels = to_device(train_labels, device).long()
    fits = {}
    for key in train.dims:
        x, (mean, var) = standardized_column(train, key, device)
        heads, previous = [], None
        for C in Cs:
            previous = fit_logistic(x, labels, num_classes, C, max_iter=max_iter, tol=tol, init=previous, dtype=dtype)
            heads.append(LinearHead(previous.weight, previous.bias, mean, var))
        del x
        val_accs = [] if val is None else head_accuracies({key: heads}, val.select([key]), val_labels, device)[key]
        chosen = choose_lr(val_accs) if val_accs else 0
        fits[key] = LogisticFit(heads[chosen], Cs[chosen], val_accs[chosen] if val_accs else None, val_accs, tuple(Cs))
    return fits


__all__ = ["LOGISTIC_CS", "LogisticFit", "fit_logistic", "objective", "train_logistic"]
