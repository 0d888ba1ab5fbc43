"""Weighted k-nearest-neighbour classification on frozen features (as in DINO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted classes (Q,) for ``query_features`` (Q, D) from a bank (N, D) with labels (N,).

    Cosine similarity; each of the ``k`` nearest neighbours votes for its class with
    weight ``exp(similarity / temperature)``.
    """
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes)
        votes.scatter_add_(1, labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` on ``eval_features``."""
    num_classes = int(max(train_labels.max(), eval_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, eval_features, num_classes, k, temperature)
    return (predicted == eval_labels.long()).float().mean().item()
