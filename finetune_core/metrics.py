"""Classification metrics: top-k hits, confusion matrix, per-class accuracy, and a split's
scores gathered batch by batch (SplitScores)."""

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


class SplitScores:
    """A split's scores gathered batch by batch (evaluation, and test-time augmentation with
    its averaged probabilities): summed loss, top-1 and top-5 hits, and per image the true
    class, the prediction and its confidence, in the split's order."""

    def __init__(self, num_classes: int, classes: list[str]):
        self.num_classes, self.classes = num_classes, classes
        self.loss, self.n, self.top1, self.top5 = 0.0, 0, 0, 0
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.confidences: list[torch.Tensor] = []

    def add(
        self,
        scores: torch.Tensor,
        targets: torch.Tensor,
        loss_sum: float,
        probabilities: torch.Tensor | None = None,
    ) -> None:
        """Adds a batch: scores ranked for top-k (logits or probabilities), the batch's summed
        loss, and the probabilities its confidences come from (scores' softmax unless given)."""
        self.loss += loss_sum
        self.top1 += topk_correct(scores, targets, 1)
        self.top5 += topk_correct(scores, targets, 5)
        self.n += len(targets)
        p = scores.softmax(1) if probabilities is None else probabilities
        confidence, pred = p.max(1)
        self.preds.append(pred.cpu())
        self.confidences.append(confidence.cpu())
        self.targets.append(targets.cpu())

    def part(self) -> tuple:
        """Returns what this process scored (one rank's part of a split), for merge."""
        none = torch.zeros(0, dtype=torch.long)
        pred, target = torch.cat(self.preds or [none]), torch.cat(self.targets or [none])
        confidence = torch.cat(self.confidences or [none.float()])
        return self.loss, self.n, self.top1, self.top5, pred, target, confidence

    def result(self, parts: list[tuple] | None = None) -> dict:
        """Returns loss, acc, acc5 (None for 5 classes or fewer), the confusion matrix,
        per-class accuracy and per image true, pred and confidence: of this process's batches,
        or of `parts` (each process's part(), in the split's order) as one split."""
        parts = parts or [self.part()]
        loss, n, top1, top5 = (sum(p[i] for p in parts) for i in range(4))
        pred, target, confidence = (torch.cat([p[i] for p in parts]) for i in (4, 5, 6))
        k = self.num_classes
        cm = confusion_matrix(pred, target, k)
        return {
            "loss": loss / max(n, 1),
            "acc": top1 / max(n, 1),
            "acc5": top5 / max(n, 1) if k > 5 else None,
            "confusion_matrix": cm.tolist(),
            "per_class_acc": per_class_accuracy(cm, self.classes),
            # per image, in the split's order: what the intervals and comparisons resample
            "true": target.tolist(),
            "pred": pred.tolist(),
            "confidence": confidence.tolist(),
        }
