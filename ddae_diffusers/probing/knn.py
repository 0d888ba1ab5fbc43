"""Weighted k-nearest-neighbour classification on frozen features (as in DINO).

Bank and queries are :class:`~ddae_diffusers.probing.table.FeatureTable` s read in blocks: each block of queries
keeps its running top-k over the bank's blocks, so memory holds two blocks and a (block, block) similarity matrix,
never the whole bank. Blocks of any device and float dtype are moved to one ``device`` (default: the features'
device, the CPU for tables read from the cache), where similarities, top-k and votes are computed.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .table import CHUNK_ROWS, Device, FeatureTable, compute_device, to_device

KNN_K = 20  # neighbours that vote
KNN_TEMPERATURE = 0.07  # votes weigh exp(cosine similarity / temperature)


def knn_predictions(
    bank: FeatureTable,
    bank_labels: torch.Tensor,
    queries: FeatureTable,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = CHUNK_ROWS,
    device: Device | None = None,
) -> Iterator[tuple[np.ndarray, dict[Hashable, torch.Tensor]]]:
    """Per block of query rows: ``(rows, {key: predicted classes (len(rows),) on device})`` for every key of
    ``queries``.

    Cosine similarity; each of the ``k`` nearest bank rows (labels ``bank_labels`` (N,)) votes for its class with
    weight ``exp(similarity / temperature)``. Computed on ``device`` (default: the queries' or the bank's device,
    whichever is not the CPU).
    """
    device = compute_device(device, queries, bank)
    labels = to_device(bank_labels, device).long()
    keys = list(queries)
    bank = bank.select(keys)
    for rows, block in queries.chunks(chunk_size):
        query = {key: F.normalize(to_device(block[key], device).float(), dim=1) for key in keys}
        top_sim = {key: torch.empty(len(rows), 0, device=device) for key in keys}
        top_label = {key: torch.empty(len(rows), 0, dtype=torch.long, device=device) for key in keys}
        for bank_rows, bank_block in bank.chunks(chunk_size):
            block_labels = labels[to_device(torch.from_numpy(bank_rows), device)]
            for key in keys:
                similarity = query[key] @ F.normalize(to_device(bank_block[key], device).float(), dim=1).T
                similarity, index = similarity.topk(min(k, similarity.shape[1]), dim=1)
                merged = torch.cat([top_sim[key], similarity], dim=1)
                merged_labels = torch.cat([top_label[key], block_labels[index]], dim=1)
                top_sim[key], best = merged.topk(min(k, merged.shape[1]), dim=1)
                top_label[key] = merged_labels.gather(1, best)
        predictions = {}
        for key in keys:
            votes = torch.zeros(len(rows), num_classes, device=device)
            votes.scatter_add_(1, top_label[key], (top_sim[key] / temperature).exp())
            predictions[key] = votes.argmax(dim=1)
        yield rows, predictions


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
    bank, queries = FeatureTable.from_tensors(bank), FeatureTable.from_tensors(queries)
    device = compute_device(device, queries, bank)
    if num_classes is None:
        num_classes = max(int(bank_labels.max()), int(query_labels.max())) + 1
    expected_labels = to_device(query_labels, device).long()
    correct = {key: torch.zeros((), dtype=torch.long, device=device) for key in queries}
    for rows, predicted in knn_predictions(bank, bank_labels, queries, num_classes, k, temperature, device=device):
        expected = expected_labels[to_device(torch.from_numpy(rows), device)]
        for key, values in predicted.items():
            correct[key] += (values == expected).sum()
    return {key: int(count) / max(queries.num_rows, 1) for key, count in correct.items()}


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
