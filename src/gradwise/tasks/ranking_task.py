"""Implicit-feedback ranking as a task: BPR on sampled negatives, scored by full-ranking HR@K / NDCG@K."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from gradwise.errors import ConfigError
from gradwise.tasks.ranking import RankingMeter, bpr_loss_sum


class RankingTask:
    """BPR loss over ``(B, 2)`` [positive, negative] scores; the meter ranks every item for each user.

    The meter needs each user's training items (to exclude them), which only the loaded data knows:
    :meth:`bind` receives the data's extras before any evaluation.

    References:
        Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback".
    """

    kind: Literal["ranking"] = "ranking"
    loss_name = "bpr"

    def __init__(self, k: int, n_items: int) -> None:
        self.k, self.n_items = k, n_items
        self.default_monitor = f"val_ndcg@{k}"
        self._seen: tuple[Tensor, Tensor] | None = None

    def bind(self, extras: Mapping[str, Any]) -> None:
        """Take the training interactions (CSR ``seen_indptr`` / ``seen_items``) the ranking excludes."""
        self._seen = (extras["seen_indptr"], extras["seen_items"])

    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return bpr_loss_sum(outputs)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_sum(outputs, targets) / max(len(outputs), 1)

    def count(self, targets: Tensor) -> int:
        return int(targets.shape[0])

    def new_meter(self) -> RankingMeter:
        if self._seen is None:
            raise ConfigError("task.kind 'ranking' is scored against the training interactions; load the data")
        return RankingMeter(self.k, self._seen[0], self._seen[1], self.n_items)
