"""kNN at several k in one pass over the bank (probing/knn.py): the same predictions as one run per k, ties
included, whatever the block size; per-image correctness."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ddae_diffusers.errors import UsageError
from ddae_diffusers.probing import knn as knn_module
from ddae_diffusers.probing.knn import (
    KNN_K,
    KNN_KS,
    KNN_TEMPERATURE,
    _block_top,
    knn_accuracies,
    knn_accuracy,
    knn_correct,
    knn_predict,
    knn_predictions,
)
from ddae_diffusers.probing.table import FeatureTable

CLASSES = 5


def gaussian(num: int, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, dim, generator=g), torch.randint(0, CLASSES, (num,), generator=g)


def tied(num: int, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bank rows that are scaled one-hot vectors: the cosine similarity of a query to every row with the same hot
    column is exactly the same number, so neighbour lists are cut inside groups of ties (with different labels)."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.randint(0, dim, (num,), generator=g)
    features = F.one_hot(hot, dim).float() * torch.randint(1, 4, (num, 1), generator=g).float()
    return features, torch.randint(0, CLASSES, (num,), generator=g)


def reference(bank, bank_y, query, k):
    """Brute force: all similarities at once, nearest first and the lower bank row first among equals."""
    similarity = F.normalize(query.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    order = similarity.sort(dim=1, descending=True, stable=True).indices[:, :k]
    votes = torch.zeros(len(query), CLASSES)
    votes.scatter_add_(1, bank_y[order], (similarity.gather(1, order) / KNN_TEMPERATURE).exp())
    return votes.argmax(dim=1)


def multi(bank, bank_y, queries, ks, chunk_size):
    """``{key: {k: predictions (Q,)}}`` of one multi-k pass."""
    bank, queries = FeatureTable.from_tensors(bank), FeatureTable.from_tensors(queries)
    out: dict = {}
    for _, predicted in knn_predictions(bank, bank_y, queries, CLASSES, ks=ks, chunk_size=chunk_size):
        for key, by_k in predicted.items():
            for k, values in by_k.items():
                out.setdefault(key, {}).setdefault(k, []).append(values)
    return {key: {k: torch.cat(parts) for k, parts in by_k.items()} for key, by_k in out.items()}


def single(bank, bank_y, queries, k, chunk_size):
    """``{key: predictions (Q,)}`` of one single-k run."""
    bank, queries = FeatureTable.from_tensors(bank), FeatureTable.from_tensors(queries)
    blocks = list(knn_predictions(bank, bank_y, queries, CLASSES, k, chunk_size=chunk_size))
    return {key: torch.cat([predicted[key] for _, predicted in blocks]) for key in queries}


# ------------------------------------------------------------------ one pass = one run per k
@pytest.mark.parametrize("chunk_size", [3, 7, 16, 50, 4096])
def test_several_k_in_one_pass_equal_one_run_per_k(chunk_size):
    bank_g, bank_gy = gaussian(120, seed=1)
    query_g, _ = gaussian(45, seed=2)
    bank_t, bank_ty = tied(120, seed=3)
    query_t = torch.randint(0, 3, (45, 4), generator=torch.Generator().manual_seed(4)).float() + 0.5
    ks = (1, 2, 5, 20, 64)
    for bank, bank_y, query in [(bank_g, bank_gy, query_g), (bank_t, bank_ty, query_t)]:
        queries = {"x": query, "neg": -query}
        together = multi({"x": bank, "neg": bank}, bank_y, queries, ks, chunk_size)
        assert set(together) == {"x", "neg"} and all(set(by_k) == set(ks) for by_k in together.values())
        for k in ks:
            alone = single({"x": bank, "neg": bank}, bank_y, queries, k, chunk_size)
            for key in queries:
                assert torch.equal(together[key][k], alone[key]), (key, k, chunk_size)
            # ties at the cut go to the lower bank rows, whatever the blocks: the brute force agrees
            assert torch.equal(together["x"][k], reference(bank, bank_y, query, k)), (k, chunk_size)


def test_ties_decide_the_vote():
    """A query equally near to 3 rows of class 1 and then 3 rows of class 2: k=3 picks the first three rows of the
    bank whichever block they are in, so class 1 wins; the same rows in the other order make class 2 win."""
    bank = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 4)
    query = torch.tensor([[1.0, 0.0]])
    for labels, expected in [([1, 1, 1, 2, 2, 2, 0, 0, 0, 0], 1), ([2, 2, 2, 1, 1, 1, 0, 0, 0, 0], 2)]:
        labels = torch.tensor(labels)
        for chunk_size in (1, 2, 4, 5, 10):
            predicted = multi({"x": bank}, labels, {"x": query}, (3, 4, 6), chunk_size)["x"]
            assert int(predicted[3][0]) == expected
            assert int(predicted[4][0]) == expected  # 3 against 1
            assert int(predicted[6][0]) == 1  # 3 against 3 of equal weight: the lower class index
            assert int(knn_predict(bank, labels, query, CLASSES, k=3, chunk_size=chunk_size)[0]) == expected


@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_block_selection_is_the_same_with_and_without_keys_for_every_column(k):
    """The CPU selects with the float top-k and keys only its picks (all columns only where ties cross the cut);
    accelerators key every column. Both give one selection."""
    bank, _ = tied(40, seed=5)
    query = torch.randint(0, 3, (30, 4), generator=torch.Generator().manual_seed(6)).float()
    query[0] = 0  # a zero query: every similarity is 0
    similarity = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    rows = torch.arange(100, 140)
    keys, index = _block_top(similarity, rows, k, all_keys=False)
    all_keys, all_index = _block_top(similarity, rows, k, all_keys=True)
    assert torch.equal(keys, all_keys) and torch.equal(index, all_index)
    expected = similarity.sort(dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(index, expected)
    assert torch.equal(index[0], torch.arange(min(k, 40)))


def test_the_accelerator_way_predicts_the_same_end_to_end(monkeypatch):
    bank, bank_y = tied(90, seed=19)
    query = torch.randint(0, 3, (33, 4), generator=torch.Generator().manual_seed(20)).float()
    queries = {"x": query, "g": gaussian(33, dim=4, seed=21)[0]}
    cpu_way = multi({"x": bank, "g": bank}, bank_y, queries, (1, 4, 30), chunk_size=8)
    monkeypatch.setattr(knn_module, "_block_top", functools.partial(knn_module._block_top, all_keys=True))
    all_keys = multi({"x": bank, "g": bank}, bank_y, queries, (1, 4, 30), chunk_size=8)
    for key, by_k in cpu_way.items():
        for k, predicted in by_k.items():
            assert torch.equal(all_keys[key][k], predicted), (key, k)


# ------------------------------------------------------------------ small banks, defaults, mistakes
def test_a_bank_smaller_than_k_lets_every_row_vote():
    bank, bank_y = gaussian(15, seed=7)
    query, query_y = gaussian(30, seed=8)
    together = multi({"x": bank}, bank_y, {"x": query}, KNN_KS, chunk_size=4)["x"]
    everyone = reference(bank, bank_y, query, 15)
    for k in KNN_KS:  # 10 < 15 < 20, 100, 200
        expected = reference(bank, bank_y, query, k) if k < 15 else everyone
        assert torch.equal(together[k], expected), k
        assert torch.equal(knn_predict(bank, bank_y, query, CLASSES, k=k, chunk_size=4), expected), k
    correct = knn_correct({"x": bank}, bank_y, {"x": query}, query_y, num_classes=CLASSES)["x"]
    assert torch.equal(correct[100], correct[200]) and torch.equal(correct[20], correct[200])


def test_defaults_and_the_single_k_api_are_kept():
    assert KNN_K == 20 and KNN_KS == (10, 20, 100, 200) and KNN_K in KNN_KS
    bank, bank_y = gaussian(300, seed=9)
    query, _ = gaussian(20, seed=10)
    bank_table, query_table = FeatureTable.from_tensors({"x": bank}), FeatureTable.from_tensors({"x": query})
    rows, predicted = next(knn_predictions(bank_table, bank_y, query_table, CLASSES))
    assert list(rows) == list(range(20)) and isinstance(predicted["x"], torch.Tensor)
    assert torch.equal(predicted["x"], reference(bank, bank_y, query, KNN_K))
    _, by_k = next(knn_predictions(bank_table, bank_y, query_table, CLASSES, ks=[20, 10, 20]))
    assert list(by_k["x"]) == [20, 10]  # in the given order, once each
    assert torch.equal(by_k["x"][20], predicted["x"])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 5, "ks": (5, 10)}, "either k or ks"), ({"ks": ()}, "one or more"), ({"ks": (0, 5)}, "positive")],
)
def test_bad_k_is_a_one_line_usage_error(kwargs, match):
    bank, bank_y = gaussian(10)
    tables = FeatureTable.from_tensors({"x": bank}), FeatureTable.from_tensors({"x": bank})
    with pytest.raises(UsageError, match=match) as error:
        next(knn_predictions(tables[0], bank_y, tables[1], CLASSES, **kwargs))
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------ correctness per image
def test_correctness_masks_sum_to_the_accuracies():
    bank = {"a": gaussian(250, seed=11)[0], "b": gaussian(250, dim=5, seed=12)[0].half()}
    bank_y = gaussian(250, seed=11)[1]
    queries = {"a": gaussian(90, seed=13)[0], "b": gaussian(90, dim=5, seed=14)[0].half()}
    query_y = torch.randint(0, CLASSES, (90,), generator=torch.Generator().manual_seed(15))
    correct = knn_correct(bank, bank_y, queries, query_y, device="cpu")
    assert set(correct) == {"a", "b"} and all(list(by_k) == list(KNN_KS) for by_k in correct.values())
    for key, by_k in correct.items():
        for k, mask in by_k.items():
            assert mask.dtype == torch.bool and mask.device.type == "cpu" and mask.shape == (90,)
            accuracy = knn_accuracies(bank, bank_y, queries, query_y, k=k)[key]
            assert int(mask.sum()) / 90 == accuracy
            predicted = knn_predict(bank[key], bank_y, queries[key], CLASSES, k=k)
            assert torch.equal(mask, predicted == query_y)
    assert knn_accuracy(bank["a"], bank_y, queries["a"], query_y) == int(correct["a"][KNN_K].sum()) / 90
    # the masks differ between k here, so they are not one k copied
    assert len({tuple(mask.tolist()) for mask in correct["a"].values()}) > 1


def test_correctness_follows_the_query_rows_of_a_subset_table():
    bank, bank_y = gaussian(200, seed=16)
    query, query_y = gaussian(60, seed=17)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(18))
    table = FeatureTable.from_tensors({"x": query}).subset(order)
    correct = knn_correct({"x": bank}, bank_y, table, query_y[order], ks=(3,), num_classes=CLASSES)["x"][3]
    full = knn_correct({"x": bank}, bank_y, {"x": query}, query_y, ks=(3,), num_classes=CLASSES)["x"][3]
    assert torch.equal(correct, full[order])
