"""Classification: cross-entropy loss and a confusion-matrix meter (accuracy, macro-F1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwise.data.types import TaskKind


class ClassificationTask:
    """Cross-entropy over ``n_classes`` logits, with optional label smoothing.

    Args:
        n_classes: Width of the model's output.
        label_smoothing: Mass spread uniformly over all classes (torch's ``label_smoothing``).

    References:
        Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (label smoothing).
    """

    kind: TaskKind = "classification"
    loss_name: str = "cross_entropy"
    default_monitor: str = "val_accuracy"

    def __init__(self, n_classes: int, label_smoothing: float = 0.0) -> None:
        self.n_classes = n_classes
        self.label_smoothing = label_smoothing

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over the batch; ``outputs`` ``(N, K)`` logits, ``targets`` ``(N,)`` class indices."""
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing)

    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy over the batch (``loss_sum / N == loss``)."""
        return F.cross_entropy(outputs, targets, label_smoothing=self.label_smoothing, reduction="sum")

    def count(self, targets: Tensor) -> int:
        """Loss terms in a batch (one per example): the loop divides summed losses by the step's total."""
        return int(targets.shape[0])

    def new_meter(self) -> ClassificationMeter:
        """An empty meter that scores with this task's loss."""
        return ClassificationMeter(self.n_classes)


class ClassificationMeter:
    """Accumulates ``[n, Σloss, confusion counts…]`` over batches; metrics come from those sums alone.

    Because the state is plain sums, meters on several ranks combine by
    all-reducing :meth:`stats` and calling :meth:`load_stats` with the result.
    """

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self._stats = torch.zeros(2 + n_classes * n_classes, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add a batch of logits ``(N, K)`` and class indices ``(N,)``."""
        k = self.n_classes
        outputs = outputs.detach()
        if outputs.dtype in (torch.float16, torch.bfloat16):
            outputs = outputs.float()
        targets = targets.detach().long()
        # Plain cross-entropy (no label smoothing): evaluation losses stay comparable across smoothing settings.
        loss_sum = F.cross_entropy(outputs, targets, reduction="sum")
        predictions = outputs.argmax(dim=1)
        confusion = torch.bincount(targets * k + predictions, minlength=k * k)
        # One small host transfer per batch keeps the sums in float64 on any device (MPS has no float64).
        head = torch.tensor([float(len(targets)), float(loss_sum)], dtype=torch.float64)
        self._stats += torch.cat([head, confusion.cpu().double()])

    def stats(self) -> Tensor:
        """The sufficient statistics ``[n, Σloss, C[0,0], C[0,1], …]`` as one float64 CPU tensor (a copy)."""
        return self._stats.clone()

    def load_stats(self, t: Tensor) -> None:
        """Replace the state with ``t`` (e.g. the sum of every rank's :meth:`stats`)."""
        if t.numel() != self._stats.numel():
            raise ValueError(f"expected {self._stats.numel()} statistics for {self.n_classes} classes, got {t.numel()}")
        self._stats = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    def confusion(self) -> list[list[int]] | None:
        """Counts ``C[true][predicted]``."""
        return self._matrix().long().tolist()

    def compute(self) -> dict[str, float]:
        """``loss`` (mean), ``accuracy`` and ``macro_f1``; NaN for all three before any example.

        Macro-F1 is the unweighted mean of per-class F1 = 2·TP / (2·TP + FP + FN) over
        the classes that occur in the targets or the predictions, as scikit-learn's
        ``f1_score(average="macro")`` computes it.
        """
        n = float(self._stats[0])
        if n == 0:
            return {"loss": math.nan, "accuracy": math.nan, "macro_f1": math.nan}
        matrix = self._matrix()
        tp = matrix.diagonal()
        actual = matrix.sum(dim=1)
        predicted = matrix.sum(dim=0)
        present = (actual + predicted) > 0
        f1 = 2 * tp[present] / (actual[present] + predicted[present])  # 2TP + FP + FN = actual + predicted
        return {
            "loss": float(self._stats[1]) / n,
            "accuracy": float(tp.sum()) / n,
            "macro_f1": float(f1.mean()),
        }

    def _matrix(self) -> Tensor:
        return self._stats[2:].reshape(self.n_classes, self.n_classes)
