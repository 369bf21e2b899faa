"""Classification metrics: top-k hits, confusion matrix, per-class accuracy."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """Returns how many rows have their target among the k highest logits."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == targets[:, None]).any(dim=1).sum())


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Returns an int64 [K, K] matrix: rows are true classes, columns predicted classes."""
    index = targets.long() * num_classes + preds.long()
    counts = torch.bincount(index.cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor, classes: list[str]) -> dict[str, float | None]:
    """Returns {class: fraction of its images predicted right}, None for a class with none."""
    totals = cm.sum(dim=1)
    hits = cm.diagonal()
    return {
        name: (float(hits[i]) / float(totals[i]) if totals[i] > 0 else None)
        for i, name in enumerate(classes)
    }
