"""Weighted k-nearest-neighbour classification on frozen features (as in DINO).

Bank and queries are :class:`~ddae_diffusers.probing.table.FeatureTable` s read in blocks: each block of queries
keeps its running top-k over the bank's blocks, so memory holds two blocks and a (block, block) similarity matrix,
never the whole bank. Blocks of any device and float dtype are moved to one ``device`` (default: the features'
device, the CPU for tables read from the cache), where similarities, top-k and votes are computed.

Several k are scored in one pass: the running list holds the top max(k) neighbours, ordered by similarity and, among
equal similarities, by bank row, so its first k entries are exactly the top k that a run with that single k keeps
(ties included, whatever the block size) and every k votes with them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from .table import CHUNK_ROWS, Device, FeatureTable, compute_device, to_device

KNN_K = 20  # neighbours that vote (the headline k)
KNN_KS = (10, 20, 100, 200)  # the k reported together (as DINOv2 does)
KNN_TEMPERATURE = 0.07  # votes weigh exp(cosine similarity / temperature)

_ROW_SPAN = 1 << 32  # an order key is (similarity bits) * 2**32 + (2**32 - 1 - bank row)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` as distinct ints in the given order; empty or < 1 -> ``UsageError``."""
    try:
        checked = tuple(dict.fromkeys(int(k) for k in ks))
    except (TypeError, ValueError):
        raise UsageError(f"kNN ks must be positive integers, got {ks!r}.") from None
    if not checked or min(checked) < 1:
        raise UsageError(f"kNN ks must be one or more positive integers, got {list(ks)!r}.")
    return checked


def _order_keys(similarity: torch.Tensor, bank_rows: torch.Tensor) -> torch.Tensor:
    """int64 keys (B, C) of float32 ``similarity`` (B, C) to bank rows ``bank_rows`` (C,): larger key = larger
    similarity, and among equal similarities the lower bank row. Keys of distinct rows are distinct, so the top-k by
    key is one set in one order, whichever top-k kernel selects it (``topk`` leaves ties to the kernel). Bank rows
    must be below 2**32."""
    bits = similarity.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ordered as the floats are (-0.0 just below 0.0)
    return ordered.long() * _ROW_SPAN + (_ROW_SPAN - 1 - bank_rows)


def _block_top(
    similarity: torch.Tensor, bank_rows: torch.Tensor, k: int, all_keys: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, index)`` (B, k') of the k' = min(k, C) nearest of the C bank rows ``bank_rows`` (C,) to each query
    of ``similarity`` (B, C): their order keys (:func:`_order_keys`), decreasing, and their columns. ``all_keys``
    (default: off the CPU) keys every column; both ways select the same."""
    k = min(k, similarity.shape[1])
    if all_keys is None:
        all_keys = similarity.device.type != "cpu"
    if all_keys:
        return _order_keys(similarity, bank_rows).topk(k, dim=1)  # a few cheap passes, and no wait for the device
    # On the CPU, where those passes cost more than the top-k: the float top-k, with keys for the k found, and for
    # all C columns only in rows whose (k+1)-th similarity equals the k-th (a tie across the cut).
    values, index = similarity.topk(min(k + 1, similarity.shape[1]), dim=1)
    if values.shape[1] > k:
        tied = values[:, k] == values[:, k - 1]
        index = index[:, :k].contiguous()
        if tied.any():
            rows = tied.nonzero().squeeze(1)
            index[rows] = _order_keys(similarity[rows], bank_rows).topk(k, dim=1).indices
    keys, order = _order_keys(similarity.gather(1, index), bank_rows[index]).sort(dim=1, descending=True)
    return keys, index.gather(1, order)


def _votes(top_sim: torch.Tensor, top_label: torch.Tensor, k: int, num_classes: int, temperature: float):
    """Predicted classes (B,) from the first ``k`` of the sorted neighbour lists (B, K)."""
    # contiguous copies: the same k gives the same kernels on the same layout whatever the list's length K
    sim, label = top_sim[:, :k].contiguous(), top_label[:, :k].contiguous()
    votes = torch.zeros(len(sim), num_classes, device=sim.device)
    votes.scatter_add_(1, label, (sim / temperature).exp())
    return votes.argmax(dim=1)


def knn_predictions(
    bank: FeatureTable,
    bank_labels: torch.Tensor,
    queries: FeatureTable,
    num_classes: int,
    k: int | None = None,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = CHUNK_ROWS,
    device: Device | None = None,
    *,
    ks: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, dict[Hashable, torch.Tensor] | dict[Hashable, dict[int, torch.Tensor]]]]:
    """Per block of query rows: ``(rows, {key: predicted classes (len(rows),) on device})`` for every key of
    ``queries`` at one ``k`` (default :data:`KNN_K`), or ``(rows, {key: {k: predicted classes}})`` for every k of
    ``ks`` (one pass over the bank for all of them; give ``k`` or ``ks``, not both).

    Cosine similarity; each of the k nearest bank rows (labels ``bank_labels`` (N,)) votes for its class with weight
    ``exp(similarity / temperature)``; a k above N lets all N rows vote. Among equal similarities the lower bank row
    is nearer, so a k of ``ks`` predicts what a run with that single k predicts (bit for bit on the CPU). Computed on
    ``device`` (default: the queries' or the bank's device, whichever is not the CPU).
    """
    if k is not None and ks is not None:
        raise UsageError("Give knn_predictions either k or ks, not both.")
    nested = ks is not None
    ks = _check_ks(ks if nested else (KNN_K if k is None else k,))
    most = max(ks)
    device = compute_device(device, queries, bank)
    labels = to_device(bank_labels, device).long()
    keys = list(queries)
    bank = bank.select(keys)
    for rows, block in queries.chunks(chunk_size):
        query = {key: F.normalize(to_device(block[key], device).float(), dim=1) for key in keys}
        top_key = {key: torch.empty(len(rows), 0, dtype=torch.long, device=device) for key in keys}
        top_sim = {key: torch.empty(len(rows), 0, device=device) for key in keys}
        top_label = {key: torch.empty(len(rows), 0, dtype=torch.long, device=device) for key in keys}
        for bank_rows, bank_block in bank.chunks(chunk_size):
            bank_rows = to_device(torch.from_numpy(bank_rows), device)
            block_labels = labels[bank_rows]
            for key in keys:
                similarity = query[key] @ F.normalize(to_device(bank_block[key], device).float(), dim=1).T
                order, index = _block_top(similarity, bank_rows, most)
                merged = torch.cat([top_key[key], order], dim=1)
                merged_sim = torch.cat([top_sim[key], similarity.gather(1, index)], dim=1)
                merged_labels = torch.cat([top_label[key], block_labels[index]], dim=1)
                top_key[key], best = merged.topk(min(most, merged.shape[1]), dim=1)  # sorted, as keys are distinct
                top_sim[key] = merged_sim.gather(1, best)
                top_label[key] = merged_labels.gather(1, best)
        predictions = {
            key: {k: _votes(top_sim[key], top_label[key], k, num_classes, temperature) for k in ks} for key in keys
        }
        yield rows, (predictions if nested else {key: by_k[ks[0]] for key, by_k in predictions.items()})


def knn_correct(
    bank: FeatureTable | Mapping[Hashable, torch.Tensor],
    bank_labels: torch.Tensor,
    queries: FeatureTable | Mapping[Hashable, torch.Tensor],
    query_labels: torch.Tensor,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    device: Device | None = None,
    num_classes: int | None = None,
    chunk_size: int = CHUNK_ROWS,
) -> dict[Hashable, dict[int, torch.Tensor]]:
    """``{key: {k: correct (Q,) bool on the CPU}}``: whether :func:`knn_predictions` (one pass over the bank for
    all of ``ks``, on ``device``) gets each query right, for every key of ``queries``, with ``bank_labels`` (N,) and
    ``query_labels`` (Q,); ``num_classes`` defaults to the largest label + 1. Row i is the queries' row i."""
    bank, queries = FeatureTable.from_tensors(bank), FeatureTable.from_tensors(queries)
    ks = _check_ks(ks)
    device = compute_device(device, queries, bank)
    if num_classes is None:
        num_classes = max(int(bank_labels.max()), int(query_labels.max())) + 1
    expected_labels = to_device(query_labels, device).long()
    correct = {key: {k: torch.zeros(queries.num_rows, dtype=torch.bool) for k in ks} for key in queries}
    blocks = knn_predictions(bank, bank_labels, queries, num_classes, None, temperature, chunk_size, device, ks=ks)
    for rows, predicted in blocks:
        index = torch.from_numpy(rows)
        expected = expected_labels[to_device(index, device)]
        for key, by_k in predicted.items():
            for k, values in by_k.items():
                correct[key][k][index] = (values == expected).cpu()
    return correct


def knn_accuracies(
    bank: FeatureTable | Mapping[Hashable, torch.Tensor],
    bank_labels: torch.Tensor,
    queries: FeatureTable | Mapping[Hashable, torch.Tensor],
    query_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    device: Device | None = None,
    num_classes: int | None = None,
) -> dict[Hashable, float]:
    """``{key: top-1 accuracy in [0, 1]}`` of :func:`knn_predictions` (on ``device``) for every key of ``queries``,
    with ``bank_labels`` (N,) and ``query_labels`` (Q,); ``num_classes`` defaults to the largest label + 1."""
    correct = knn_correct(bank, bank_labels, queries, query_labels, (k,), temperature, device, num_classes)
    return {key: int(by_k[k].sum()) / max(len(by_k[k]), 1) for key, by_k in correct.items()}


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = CHUNK_ROWS,
    device: Device | None = None,
) -> torch.Tensor:
    """Predicted classes (Q,) for ``query_features`` (Q, D) from a bank (N, D) with labels (N,), computed and
    returned on ``device`` (default: the features' device)."""
    bank = FeatureTable.from_tensors({"x": train_features})
    queries = FeatureTable.from_tensors({"x": query_features})
    blocks = knn_predictions(bank, train_labels, queries, num_classes, k, temperature, chunk_size, device)
    return torch.cat([predicted["x"] for _, predicted in blocks])


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    device: Device | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` (on ``device``) on ``eval_features`` (Q, D)."""
    bank, queries = {"x": train_features}, {"x": eval_features}
    return knn_accuracies(bank, train_labels, queries, eval_labels, k, temperature, device)["x"]
