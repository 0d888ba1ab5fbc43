"""Intervals and paired tests of accuracies (probing/stats.py), checked against scipy where it has them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.stats import (
    CONFIDENCE,
    accuracy_entry,
    bootstrap_interval,
    format_interval,
    mcnemar_test,
    pack_correct,
    paired_bootstrap,
    unpack_correct,
    wilson_interval,
)


def flags(n: int, acc: float, seed: int = 0) -> np.ndarray:
    """(n,) bool with exactly round(acc * n) True, shuffled."""
    correct = np.zeros(n, dtype=bool)
    correct[: round(acc * n)] = True
    return np.random.default_rng(seed).permutation(correct)


def pair(a_only: int, b_only: int, both: int = 0, neither: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (N,) bool vectors with the given counts of the four outcomes, in a shuffled order."""
    a = np.repeat([True, False, True, False], [a_only, b_only, both, neither])
    b = np.repeat([False, True, True, False], [a_only, b_only, both, neither])
    order = np.random.default_rng(seed).permutation(len(a))
    return a[order], b[order]


# ------------------------------------------------------------------ Wilson
@pytest.mark.parametrize(
    "k, n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (9341, 10000), (5, 7), (499_000, 1_000_000), (1, 50_000)]
)
@pytest.mark.parametrize("confidence", [0.95, 0.99, 0.5])
def test_wilson_interval_matches_scipy(k, n, confidence):
    binomtest = pytest.importorskip("scipy.stats").binomtest
    expected = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    low, high = wilson_interval(k, n, confidence)
    assert low == pytest.approx(expected.low, rel=1e-12, abs=1e-15)
    assert high == pytest.approx(expected.high, rel=1e-12, abs=1e-15)
    assert 0 <= low <= k / n <= high <= 1
    assert isinstance(low, float) and isinstance(high, float)


def test_wilson_interval_known_value_and_width():
    # 93.41% of 10000: the interval every CIFAR-10 entry of this size gets
    low, high = wilson_interval(9341, 10000)
    assert (round(100 * low, 2), round(100 * high, 2)) == (92.91, 93.88)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775327998628893))
    narrow, wide = wilson_interval(9341, 10000), wilson_interval(934, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    wider = wilson_interval(9341, 10000, 0.99)
    assert wider[0] < narrow[0] and wider[1] > narrow[1]


# ------------------------------------------------------------------ McNemar
@pytest.mark.parametrize(
    "a_only, b_only",
    [(0, 0), (1, 0), (0, 1), (3, 7), (7, 3), (5, 5), (10, 30), (0, 25), (120, 80), (4990, 5010), (49_000, 51_000)],
)
def test_mcnemar_matches_scipy_binomtest(a_only, b_only):
    binomtest = pytest.importorskip("scipy.stats").binomtest
    a, b = pair(a_only, b_only, both=200, neither=37)
    result = mcnemar_test(a, b)
    assert result["test"] == "mcnemar_exact"
    assert (result["a_only"], result["b_only"]) == (a_only, b_only)
    if a_only + b_only == 0:
        assert result["p_value"] == 1.0
    else:
        expected = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue
        assert result["p_value"] == pytest.approx(expected, rel=1e-8, abs=1e-300)
    assert 0 <= result["p_value"] <= 1
    json.dumps(result)  # plain Python numbers


def test_mcnemar_large_n_and_tiny_p():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for k, n in [(499_000, 1_000_000), (490_000, 1_000_000), (10, 1000), (400, 1000)]:
        a, b = pair(k, n - k, both=3)
        expected = binomtest(k, n, 0.5).pvalue
        assert mcnemar_test(a, b)["p_value"] == pytest.approx(expected, rel=1e-8, abs=1e-300)
    assert 0.045 < mcnemar_test(*pair(499_000, 501_000))["p_value"] < 0.047  # z = 2 on a million discordant
    assert mcnemar_test(*pair(0, 2000))["p_value"] == 0.0  # 2 ** -1999 underflows, and is reported as 0


def test_mcnemar_accepts_tensors_and_is_symmetric():
    a, b = pair(12, 4, both=50, neither=9, seed=3)
    forward, backward = mcnemar_test(torch.from_numpy(a), torch.from_numpy(b)), mcnemar_test(b, a)
    assert (forward["a_only"], forward["b_only"]) == (backward["b_only"], backward["a_only"]) == (12, 4)
    # 2 P[Binomial(16, 1/2) <= 4] = 2 (1 + 16 + 120 + 560 + 1820) / 2**16
    assert forward["p_value"] == backward["p_value"] == pytest.approx(2517 / 32768, rel=1e-12)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_contains_the_accuracy_and_narrows_with_n():
    widths = []
    for n in (100, 1000, 10_000):
        correct = flags(n, 0.8)
        low, high = bootstrap_interval(correct)
        assert low < 0.8 < high
        widths.append(high - low)
        # close to the Wilson interval at these sizes
        wilson = wilson_interval(int(correct.sum()), n)
        assert low == pytest.approx(wilson[0], abs=0.3 * (wilson[1] - wilson[0]))
        assert high == pytest.approx(wilson[1], abs=0.3 * (wilson[1] - wilson[0]))
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 10_000), rel=0.1)


def test_bootstrap_interval_is_seeded_and_degenerate_at_the_ends():
    correct = torch.from_numpy(flags(500, 0.6))
    assert bootstrap_interval(correct, seed=1) == bootstrap_interval(correct, seed=1)
    assert bootstrap_interval(correct, seed=1) != bootstrap_interval(correct, seed=2)
    assert bootstrap_interval(np.ones(40, dtype=bool)) == (1.0, 1.0)
    assert bootstrap_interval(np.zeros(40, dtype=bool)) == (0.0, 0.0)
    low, high = bootstrap_interval(correct, confidence=0.5)
    wide = bootstrap_interval(correct, confidence=0.99)
    assert wide[0] < low < 0.6 < high < wide[1]


def test_paired_bootstrap():
    same = flags(1000, 0.7)
    result = paired_bootstrap(same, same.copy())
    assert result["test"] == "paired_bootstrap"
    assert result["diff"] == 0.0 and result["ci"] == [0.0, 0.0] and result["p_value"] == 1.0
    assert (result["n"], result["resamples"], result["confidence"]) == (1000, 2000, CONFIDENCE)
    # a clearly better: 60 images only a gets right, 10 only b
    a, b = pair(60, 10, both=800, neither=130)
    better = paired_bootstrap(a, b)
    assert better["diff"] == pytest.approx(0.05)
    assert 0 < better["ci"][0] < 0.05 < better["ci"][1]
    assert better["p_value"] == pytest.approx(1 / 2001)  # no resample as far from 0.05 as 0.05 is from 0
    assert mcnemar_test(a, b)["p_value"] < 1e-8
    flipped = paired_bootstrap(b, a)
    assert flipped["diff"] == pytest.approx(-0.05) and flipped["ci"][1] < 0
    # no real difference: a large p-value, an interval around 0, agreeing with McNemar
    a, b = pair(30, 27, both=800, neither=143)
    close = paired_bootstrap(a, b, resamples=4000, seed=5)
    assert close["ci"][0] < 0 < close["ci"][1]
    assert close["p_value"] == pytest.approx(mcnemar_test(a, b)["p_value"], abs=0.1)
    assert close["p_value"] > 0.5
    json.dumps(close)


# ------------------------------------------------------------------ entries and text
def test_accuracy_entry():
    correct = flags(10_000, 0.9341)
    entry = accuracy_entry(correct)
    assert entry == {"acc": 0.9341, "ci95": list(wilson_interval(9341, 10_000)), "n": 10_000}
    assert accuracy_entry(torch.from_numpy(correct)) == entry
    assert accuracy_entry([1, 0, 1, 1]) == {"acc": 0.75, "ci95": list(wilson_interval(3, 4)), "n": 4}
    assert json.loads(json.dumps(entry)) == entry
    assert format_interval(entry["acc"], entry["ci95"]) == "93.41% [92.91, 93.88]"
    assert format_interval(1.0, (0.5, 1.0)) == "100.00% [50.00, 100.00]"


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1000, 10_001])
def test_pack_round_trip(n):
    correct = np.random.default_rng(n).random(n) < 0.7
    text = pack_correct(correct)
    assert isinstance(text, str) and json.loads(json.dumps(text)) == text
    assert len(text) == 4 * (((n + 7) // 8 + 2) // 3)  # 8 flags a byte, 3 bytes to 4 characters
    back = unpack_correct(text, n)
    assert back.dtype == np.bool_ and back.shape == (n,)
    np.testing.assert_array_equal(back, correct)
    assert pack_correct(torch.from_numpy(correct)) == text


def test_pack_known_bits():
    assert pack_correct(np.array([True] + [False] * 7 + [True])) == "gIA="  # 0b10000000, 0b10000000
    np.testing.assert_array_equal(unpack_correct("gIA=", 9), [True] + [False] * 7 + [True])


# ------------------------------------------------------------------ mistakes are one line
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wilson_interval(0, 0), "at least one test image"),
        (lambda: wilson_interval(5, 4), r"correct must be in \[0, total=4\]"),
        (lambda: wilson_interval(1, 4, confidence=1.0), r"confidence level must be in \(0, 1\)"),
        (lambda: accuracy_entry(np.zeros(0, dtype=bool)), "empty"),
        (lambda: bootstrap_interval(np.zeros(0, dtype=bool)), "empty"),
        (lambda: bootstrap_interval(np.ones(4, dtype=bool), resamples=0), "resamples"),
        (lambda: mcnemar_test(np.ones(5, dtype=bool), np.ones(6, dtype=bool)), "same test images: a has 5"),
        (lambda: paired_bootstrap(np.ones(5, dtype=bool), np.ones(4, dtype=bool)), "same test images"),
        (lambda: accuracy_entry(np.array([0.2, 0.9])), "bool"),
        (lambda: accuracy_entry(np.array([0, 2, 1])), "bool"),
        (lambda: accuracy_entry(np.ones((2, 3), dtype=bool)), r"shape \(N,\)"),
        (lambda: unpack_correct("gIA=", 17), "not the 3 of 17 flags"),
        (lambda: unpack_correct("not base64!", 8), "base64"),
    ],
)
def test_usage_errors_are_one_line(call, match):
    with pytest.raises(UsageError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_t_quantile_and_interval_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from ddae_diffusers.probing.stats import t_interval, t_quantile

    for df in (1, 2, 3, 4, 9, 30):
        exact = scipy_stats.t.ppf(0.975, df)
        assert t_quantile(0.95, df) == pytest.approx(exact, rel=0.01 if df >= 3 else 1e-12)
    values = [0.61, 0.65, 0.58]
    low, high = t_interval(values)
    expected = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-9)
    assert t_interval([0.5]) == (0.5, 0.5)


def test_compare_reports_mcnemar_and_the_bootstrap_interval():
    from ddae_diffusers.probing.stats import compare

    a = np.array([True] * 70 + [False] * 30)
    b = np.array([True] * 50 + [False] * 20 + [True] * 5 + [False] * 25)
    result = compare(a, b)
    assert result["a_only"] == 20 and result["b_only"] == 5
    assert result["a_acc"] == 0.70 and result["b_acc"] == 0.55 and result["diff"] == pytest.approx(0.15)
    assert result["diff_ci95"][0] < 0.15 < result["diff_ci95"][1]
    assert result["p_value"] == mcnemar_test(a, b)["p_value"] < 0.01
