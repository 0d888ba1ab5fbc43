"""Paired tests between probe results on the same test images, computed from which images each got right.

Within a run: the best cell against the raw pixels, the best fused probe against the best cell, logistic
regression against the linear head. Across runs (:func:`compare_runs`): an entry of two probe folders on the same
test split, e.g. a model against the same architecture at random init. Each comparison gives both accuracies, the
difference with its paired-bootstrap 95% interval and the exact McNemar p-value (:func:`.stats.compare`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import UsageError
from .result import ProbeResult
from .stats import compare, unpack_correct

IN_RUN = (  # (a, b, what): entries of ProbeResult.correct
    ("best.linear", "pixels.linear", "best cell vs raw pixels, linear"),
    ("best.knn", "pixels.knn", "best cell vs raw pixels, kNN"),
    ("fused.linear", "best.linear", "best fused probe vs best cell, linear"),
    ("best.logistic", "best.linear", "best cell: logistic regression vs linear head"),
)
SAME_TEST_SET = ("dataset", "eval_split", "num_eval", "image_column", "resolution")


def in_run_comparisons(flags: Mapping[str, np.ndarray | torch.Tensor], seed: int = 0) -> list[dict]:
    """The :data:`IN_RUN` comparisons whose two entries ``flags`` holds ((Q,) bool each), in that order."""
    return [
        {"what": what, "a": a, "b": b, **compare(flags[a], flags[b], seed)}
        for a, b, what in IN_RUN
        if a in flags and b in flags
    ]


def correct_of(result: ProbeResult, entry: str) -> np.ndarray:
    """(Q,) bool: the test images ``entry`` (e.g. ``"best.linear"``) of ``result`` got right."""
    if entry not in (result.correct or {}):
        raise UsageError(
            f"The probe of {result.model!r} has no per-image results for {entry!r} (it has "
            f"{sorted(result.correct or {})}): run ddae-probe again with this version to record them."
        )
    return unpack_correct(result.correct[entry], result.num_eval)


def compare_runs(a: ProbeResult, b: ProbeResult, entry: str = "best.linear", seed: int = 0) -> dict:
    """``entry`` of run ``a`` against the same entry of run ``b`` on the same test images: ``{"what", "a", "b",
    **stats.compare}``; a one-line error when the runs were scored on different test sets."""
    differ = [name for name in SAME_TEST_SET if a[name] != b[name]]
    if differ:
        detail = ", ".join(f"{name}: {a[name]!r} vs {b[name]!r}" for name in differ)
        raise UsageError(f"The two probes were scored on different test sets ({detail}): a paired test needs the "
                         "same images.")  # fmt: skip
    what = f"{entry}: {_name(a)} vs {_name(b)}"
    return {"what": what, "a": entry, "b": entry, **compare(correct_of(a, entry), correct_of(b, entry), seed)}


def _name(result: ProbeResult) -> str:
    return f"{result.model} (random init)" if result.random_init else str(result.model)


__all__ = ["IN_RUN", "compare_runs", "correct_of", "in_run_comparisons"]
