"""Logistic-regression probe: scikit-learn's objective and optimum, the C choice on validation, tables, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing.heads import LinearHead, standardize
from ddae_diffusers.probing.logistic import LOGISTIC_CS, LogisticFit, fit_logistic, objective, train_logistic
from ddae_diffusers.probing.table import FeatureTable, column_stats


def blobs(num: int, dim: int = 20, classes: int = 4, noise: float = 2.5, seed: int = 0):
    """Overlapping Gaussian blobs: (num, dim) float32 features and (num,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (num,), generator=g)
    return centres[y] + noise * torch.randn(num, dim, generator=g), y


def raw_features(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``x`` badly scaled and offset per dimension, as unstandardised features are."""
    g = torch.Generator().manual_seed(seed)
    return x * (torch.rand(x.shape[1], generator=g) * 30 + 0.1) + torch.randn(x.shape[1], generator=g) * 10


def sklearn_fit(x: torch.Tensor, y: torch.Tensor, C: float) -> LogisticRegression:
    """scikit-learn's multinomial L-BFGS fit, run to a tight optimum in float64."""
    return LogisticRegression(C=C, solver="lbfgs", max_iter=10_000, tol=1e-10).fit(x.double().numpy(), y.numpy())


def as_head(model: LogisticRegression) -> LinearHead:
    """The fitted model as a float32 head (its float64 coefficients rounded)."""
    return LinearHead(torch.tensor(model.coef_).float(), torch.tensor(model.intercept_).float())


def centred(bias: torch.Tensor) -> torch.Tensor:
    """Intercepts up to the constant shift that leaves softmax unchanged."""
    bias = bias.double()
    return bias - bias.mean()


def test_fit_logistic_reaches_sklearn_optimum_along_the_C_path():
    x, y = blobs(600)
    x = (x - x.mean(0)) / x.std(0)
    previous = None
    for C in (1e-3, 1e-1, 1.0, 10.0, 100.0):
        head = fit_logistic(x, y, 4, C, init=previous)
        previous = head
        reference = as_head(sklearn_fit(x, y, C))
        assert head.weight.shape == (4, 20) and head.bias.shape == (4,) and head.mean is None
        assert head.weight.dtype == torch.float32
        ours = objective(head, x, y, C, torch.float64).item()
        theirs = objective(reference, x, y, C, torch.float64).item()
        assert abs(ours - theirs) <= 1e-4 * theirs, (C, ours, theirs)
        agree = (head.logits(x).argmax(1) == reference.logits(x).argmax(1)).double().mean().item()
        assert agree >= 0.99, (C, agree)
        weight_error = (head.weight - reference.weight).norm() / reference.weight.norm()
        assert weight_error <= 1e-2, (C, weight_error)
        torch.testing.assert_close(centred(head.bias), centred(reference.bias), atol=1e-2, rtol=0)
    # A cold start reaches the same optimum, and float64 gets closer still.
    cold = fit_logistic(x, y, 4, 100.0)
    torch.testing.assert_close(cold.weight, previous.weight, atol=1e-2, rtol=1e-2)
    precise = fit_logistic(x, y, 4, 1.0, dtype=torch.float64, tol=1e-8)
    reference = as_head(sklearn_fit(x, y, 1.0))
    torch.testing.assert_close(precise.weight, reference.weight, atol=1e-4, rtol=0)


def test_train_logistic_chooses_C_on_validation_and_folds_in_standardisation():
    x, y = blobs(1000, dim=30, noise=3.0, seed=2)
    x = raw_features(x)
    (train_x, val_x, test_x), (train_y, val_y, test_y) = x.split([400, 200, 400]), y.split([400, 200, 400])
    fits = train_logistic({"cell": train_x}, train_y, 4, {"cell": val_x}, val_y)
    fit = fits["cell"]
    assert isinstance(fit, LogisticFit) and fit.Cs == LOGISTIC_CS and len(fit.val_accs) == len(LOGISTIC_CS)
    assert fit.val_acc == max(fit.val_accs) and fit.C == LOGISTIC_CS[fit.val_accs.index(fit.val_acc)]
    assert fit.val_acc >= 0.6  # chance is 0.25
    assert LOGISTIC_CS[0] < fit.C < LOGISTIC_CS[-1]  # too strong and too weak regularisation both lose here
    # The head takes raw features: the training statistics are folded in.
    mean, var = column_stats(FeatureTable.from_tensors({"cell": train_x}))["cell"]
    torch.testing.assert_close(fit.head.mean, mean)
    torch.testing.assert_close(fit.head.var, var)
    # scikit-learn with the same C on the same standardised features: same accuracies, within a point.
    train_s, val_s, test_s = (standardize(part, mean, var) for part in (train_x, val_x, test_x))
    for C, val_acc in zip(fit.Cs, fit.val_accs, strict=True):
        assert abs(sklearn_fit(train_s, train_y, C).score(val_s.numpy(), val_y.numpy()) - val_acc) <= 0.01, C
    expected = sklearn_fit(train_s, train_y, fit.C).score(test_s.numpy(), test_y.numpy())
    assert abs(fit.head.accuracy(test_x, test_y) - expected) <= 0.01


def test_ties_go_to_stronger_regularisation_and_one_C_needs_no_validation():
    x, y = blobs(300, noise=0.2, seed=3)  # separable: every C is perfect on validation
    fits = train_logistic({"x": x[:200]}, y[:200], 4, {"x": x[200:]}, y[200:], Cs=(1.0, 1e-2, 10.0))
    assert fits["x"].Cs == (1e-2, 1.0, 10.0) and fits["x"].val_accs == [1.0, 1.0, 1.0] and fits["x"].C == 1e-2
    single = train_logistic({"x": x[:200]}, y[:200], 4, None, None, Cs=(1.0,))["x"]
    assert single.C == 1.0 and single.val_acc is None and single.val_accs == []


def test_feature_table_with_tuple_keys_matches_plain_tensors():
    x, y = blobs(500, seed=4)
    wide, _ = blobs(500, dim=12, seed=5)
    wide = (wide + x[:, :12]).half()  # another width and dtype
    columns = {("a", 1): raw_features(x), ("b", 2): wide}
    train = FeatureTable.from_tensors({key: value[:350] for key, value in columns.items()})
    val = FeatureTable.from_tensors({key: value[350:] for key, value in columns.items()})
    Cs = (1e-2, 1.0)
    fits = train_logistic(train, y[:350], 4, val, y[350:], Cs=Cs)
    assert list(fits) == [("a", 1), ("b", 2)]
    assert fits["b", 2].head.weight.shape == (4, 12) and fits["b", 2].head.weight.dtype == torch.float32
    plain = train_logistic(
        {("a", 1): columns["a", 1][:350]}, y[:350], 4, {("a", 1): columns["a", 1][350:]}, y[350:], Cs
    )
    assert plain["a", 1].val_accs == fits["a", 1].val_accs and plain["a", 1].C == fits["a", 1].C
    torch.testing.assert_close(plain["a", 1].head.weight, fits["a", 1].head.weight)
    for key, fit in fits.items():
        assert fit.head.accuracy(val.read(np.arange(150))[key], y[350:]) == pytest.approx(fit.val_acc)


def one_line_error(call) -> str:
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_bad_inputs_raise_one_line_usage_errors():
    x, y = blobs(100)
    assert "match" in one_line_error(lambda: fit_logistic(x, y[:90], 4, 1.0))
    for C in (0.0, -1.0, float("nan"), float("inf"), "strong"):
        assert "C " in one_line_error(lambda C=C: fit_logistic(x, y, 4, C))
    assert "[0, 3)" in one_line_error(lambda: fit_logistic(x, y, 3, 1.0))
    assert "init" in one_line_error(
        lambda: fit_logistic(x, y, 4, 1.0, init=LinearHead(torch.zeros(4, 5), torch.zeros(4)))
    )
    assert "max_iter" in one_line_error(lambda: fit_logistic(x, y, 4, 1.0, max_iter=0))
    train, val = {"x": x[:60]}, {"x": x[60:]}
    assert "match" in one_line_error(lambda: train_logistic(train, y, 4, val, y[60:]))
    assert "match" in one_line_error(lambda: train_logistic(train, y[:60], 4, val, y[:10]))
    assert "C " in one_line_error(lambda: train_logistic(train, y[:60], 4, val, y[60:], Cs=(1.0, 0.0)))
    assert "sequence" in one_line_error(lambda: train_logistic(train, y[:60], 4, val, y[60:], Cs=1.0))
    assert "validation" in one_line_error(lambda: train_logistic(train, y[:60], 4, None, None))
    assert "lack" in one_line_error(lambda: train_logistic(train, y[:60], 4, {"other": x[60:]}, y[60:]))
    assert "max_rows_in_memory" in one_line_error(
        lambda: train_logistic(train, y[:60], 4, val, y[60:], max_rows_in_memory=50)
    )
