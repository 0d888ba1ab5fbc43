"""Uncertainty of accuracies on a fixed test set, and paired tests between two classifiers scored on it.

An accuracy is a proportion of N test images; :func:`accuracy_entry` gives it with its Wilson score interval, the
one format of every results entry. Two classifiers scored on the same images are compared image by image:
:func:`mcnemar_test` (exact, on the images that only one of them gets right) and :func:`paired_bootstrap`.
Per-image correctness travels in results files as text (:func:`pack_correct`), so runs can be compared later.

Only the standard library and numpy: no scipy at run time.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch

from ..errors import UsageError

CONFIDENCE = 0.95  # coverage of every interval reported


def _z(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` in (0, 1)."""
    if not 0 < confidence < 1:
        raise UsageError(f"The confidence level must be in (0, 1), got {confidence}.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _as_correct(correct: np.ndarray | torch.Tensor, name: str = "correct") -> np.ndarray:
    """``correct`` (N,) as a numpy bool array; bool or 0/1 values, one dimension, else ``UsageError``."""
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    array = np.asarray(correct)
    if array.ndim != 1:
        raise UsageError(f"{name} must be one flag per test image, shape (N,), got shape {array.shape}.")
    if array.dtype != np.bool_:
        if not (np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all()):
            raise UsageError(f"{name} must be bool (or 0/1) per test image, got dtype {array.dtype}.")
        array = array.astype(bool)
    return array


def _nonempty(correct: np.ndarray, name: str = "correct") -> np.ndarray:
    if len(correct) == 0:
        raise UsageError(f"{name} is empty: an accuracy needs at least one test image.")
    return correct


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_correct(a_correct, "a_correct"), _as_correct(b_correct, "b_correct")
    if len(a) != len(b):
        raise UsageError(f"Paired tests need the same test images: a has {len(a)} flags, b has {len(b)}.")
    return a, b


def _resamples(resamples: int) -> int:
    if int(resamples) < 1:
        raise UsageError(f"resamples must be at least 1, got {resamples}.")
    return int(resamples)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``(low, high)`` in [0, 1]: the Wilson score interval of the proportion ``correct / total``."""
    correct, total = int(correct), int(total)
    if total <= 0:
        raise UsageError(f"An accuracy needs at least one test image, got total={total}.")
    if not 0 <= correct <= total:
        raise UsageError(f"correct must be in [0, total={total}], got {correct}.")
    z = _z(confidence)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact ends where rounding would miss them
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def bootstrap_interval(
    correct: np.ndarray | torch.Tensor,
    confidence: float = CONFIDENCE,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """``(low, high)``: percentile bootstrap interval of the accuracy of ``correct`` (N,) bool, resampling the N
    test images with replacement ``resamples`` times (drawn as the number of correct ones, which is binomial)."""
    correct = _nonempty(_as_correct(correct))
    _z(confidence)
    n, resamples = len(correct), _resamples(resamples)
    draws = np.random.default_rng(seed).binomial(n, correct.mean(), size=resamples) / n
    return _percentiles(draws, confidence)


def _binomial_half_cdf(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2) and k <= n / 2: the terms from k down, relative to the one at k (they only
    shrink that way), until they no longer change the sum; that one's logarithm from ``math.lgamma``."""
    log_first = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
    total = term = 1.0
    for i in range(k, 0, -1):
        term *= i / (n - i + 1)  # P[X = i - 1] / P[X = i]
        total += term
        if term < total * 1e-17:
            break
    return min(1.0, math.exp(log_first + math.log(total)))


def mcnemar_test(a_correct: np.ndarray | torch.Tensor, b_correct: np.ndarray | torch.Tensor) -> dict:
    """Exact McNemar test of two classifiers on the same test images (``a_correct``, ``b_correct``: (N,) bool).

    Returns ``{"test": "mcnemar_exact", "a_only": int, "b_only": int, "p_value": float}``: the images only a (only
    b) gets right, and the two-sided p-value ``min(1, 2 P[X <= min(a_only, b_only)])``, X ~ Binomial(a_only +
    b_only, 1/2) (1 when there are no such images).
    """
    a, b = _paired(a_correct, b_correct)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else min(1.0, 2 * _binomial_half_cdf(min(a_only, b_only), discordant))
    return {"test": "mcnemar_exact", "a_only": a_only, "b_only": b_only, "p_value": p_value}


def paired_bootstrap(
    a_correct: np.ndarray | torch.Tensor,
    b_correct: np.ndarray | torch.Tensor,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """Paired bootstrap of the accuracy difference of two classifiers on the same test images ((N,) bool each).

    The N images are resampled with replacement ``resamples`` times, each keeping both flags (drawn as the counts
    of the four (a, b) outcomes, which are multinomial). Returns ``{"test": "paired_bootstrap", "diff": acc(a) -
    acc(b), "ci": [low, high] (percentile interval of the difference), "confidence", "p_value", "n", "resamples"}``;
    the two-sided p-value is the share of resampled differences at least ``|diff|`` from ``diff`` (the bootstrap
    distribution moved to a null difference), counting the observed one: ``(1 + count) / (1 + resamples)``.
    """
    a, b = _paired(a_correct, b_correct)
    _nonempty(a, "a_correct")
    _z(confidence)
    n, resamples = len(a), _resamples(resamples)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    others = n - a_only - b_only
    diff = (a_only - b_only) / n
    counts = np.random.default_rng(seed).multinomial(n, [a_only / n, b_only / n, others / n], size=resamples)
    shifts = counts[:, 0] - counts[:, 1]  # n times the resampled differences, as integers
    extreme = int((np.abs(shifts - (a_only - b_only)) >= abs(a_only - b_only)).sum())
    return {
        "test": "paired_bootstrap",
        "diff": diff,
        "ci": list(_percentiles(shifts / n, confidence)),
        "confidence": confidence,
        "p_value": (1 + extreme) / (1 + resamples),
        "n": n,
        "resamples": resamples,
    }


def accuracy_entry(correct: np.ndarray | torch.Tensor) -> dict:
    """``{"acc": float, "ci95": [low, high], "n": int}`` of ``correct`` (N,) bool: the accuracy, its Wilson interval
    at :data:`CONFIDENCE`, and the number of test images."""
    correct = _nonempty(_as_correct(correct))
    n, hits = len(correct), int(correct.sum())
    return {"acc": hits / n, "ci95": list(wilson_interval(hits, n)), "n": n}


def compare(a_correct: np.ndarray | torch.Tensor, b_correct: np.ndarray | torch.Tensor, seed: int = 0) -> dict:
    """Two classifiers on the same test images ((N,) bool each): ``{"a_acc", "b_acc", "diff", "diff_ci95",
    "p_value", "a_only", "b_only", "test"}``: the accuracy difference a - b with its paired-bootstrap interval, and the
    exact McNemar p-value (the test of record) with the images only a (only b) gets right."""
    a, b = _paired(a_correct, b_correct)
    mcnemar, bootstrap = mcnemar_test(a, b), paired_bootstrap(a, b, seed=seed)
    return {"a_acc": float(_nonempty(a, "a_correct").mean()), "b_acc": float(b.mean()), "diff": bootstrap["diff"],
            "diff_ci95": bootstrap["ci"], "p_value": mcnemar["p_value"], "a_only": mcnemar["a_only"],
            "b_only": mcnemar["b_only"], "test": "exact McNemar; paired bootstrap interval"}  # fmt: skip


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t quantile of ``confidence`` with ``df`` degrees of freedom: exact for df 1 and 2,
    the Cornish-Fisher expansion (four terms, within 1% at df 3 and closer above) beyond."""
    z = _z(confidence)
    p = 0.5 + confidence / 2
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (1 - (2 * p - 1) ** 2))
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))  # fmt: skip


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The interval of the mean of a few repeated measurements (e.g. accuracies over random draws):
    ``mean -+ t * std / sqrt(n)``; a single value is its own interval."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise UsageError("t_interval needs one or more values.")
    mean = float(values.mean())
    if len(values) == 1:
        return mean, mean
    half = t_quantile(confidence, len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean - half, mean + half


def pack_correct(correct: np.ndarray | torch.Tensor) -> str:
    """``correct`` (N,) bool as ASCII text (8 flags a byte, base64) for JSON; :func:`unpack_correct` reverses it."""
    return base64.b64encode(np.packbits(_as_correct(correct)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """The (n,) bool flags that :func:`pack_correct` wrote as ``text``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise UsageError("Packed correctness flags are not base64 text.") from None
    n = int(n)
    if n < 0 or len(data) != (n + 7) // 8:
        raise UsageError(f"Packed correctness flags hold {len(data)} bytes, not the {(n + 7) // 8} of {n} flags.")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool)


def format_interval(acc: float, ci: tuple[float, float] | list[float] | None, unit: str = "%") -> str:
    """``"93.41% [92.91, 93.88]"``: an accuracy and its interval (in [0, 1]) as percentages with 2 decimals (the
    accuracy alone when ``ci`` is None); ``unit=""`` for a table whose header says %."""
    if ci is None:
        return f"{100 * acc:.2f}{unit}"
    low, high = ci
    return f"{100 * acc:.2f}{unit} [{100 * low:.2f}, {100 * high:.2f}]"
