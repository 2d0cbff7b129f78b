"""Tasks: the loss a model trains on and the metrics it is scored by, per kind of target."""

from __future__ import annotations

from typing import Literal, Protocol

from torch import Tensor

from gradwise.config import TaskConfig
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.tasks.classification import ClassificationMeter, ClassificationTask
from gradwise.tasks.regression import RegressionMeter, RegressionTask

__all__ = [
    "ClassificationMeter",
    "ClassificationTask",
    "MetricMeter",
    "RegressionMeter",
    "RegressionTask",
    "Task",
    "build_task",
]


class MetricMeter(Protocol):
    """Running sufficient statistics of a split's metrics; ranks combine by summing :meth:`stats`."""

    def update(self, outputs: Tensor, targets: Tensor) -> None: ...
    def stats(self) -> Tensor: ...
    def load_stats(self, t: Tensor) -> None: ...
    def compute(self) -> dict[str, float]: ...
    def confusion(self) -> list[list[int]] | None: ...


class Task(Protocol):
    """A loss (mean and summed over a batch), a meter factory and the metric to monitor by default."""

    kind: Literal["classification", "regression", "language_modeling", "ranking", "preference"]
    loss_name: str
    default_monitor: str

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...
    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor: ...
    def count(self, targets: Tensor) -> int: ...
    def new_meter(self) -> MetricMeter: ...


def build_task(cfg: TaskConfig, info: DataInfo) -> Task:
    """The task ``cfg`` describes, checked against the data.

    Raises:
        ConfigError: ``task.kind`` or ``task.loss`` does not fit the data's kind.
    """
    label = info.name or info.source
    if info.kind == "language_modeling" or cfg.kind == "language_modeling":
        from gradwise.tasks.language_modeling import build_language_modeling_task

        if info.kind != "language_modeling":
            raise ConfigError(f"task.kind 'language_modeling' needs a text corpus; {label!r} is a {info.kind} dataset")
        return build_language_modeling_task(cfg, info)
    if info.kind == "preference" or cfg.kind == "preference":
        from gradwise.tasks.preference import PreferenceTask

        if info.kind != "preference" or info.text_stats is None:
            raise ConfigError(f"task.kind 'preference' needs chosen/rejected pairs; {label!r} is a {info.kind} dataset")
        # The reference table is indexed by a pair's place among all pairs read (kept or not).
        pairs = int(info.text_stats.get("pairs_read", info.text_stats["examples"]))
        return PreferenceTask(cfg.beta, "ipo" if cfg.loss == "ipo" else "dpo", pairs)
    if info.kind == "ranking" or cfg.kind == "ranking":
        from gradwise.tasks.ranking_task import RankingTask

        if info.kind != "ranking" or info.interactions is None:
            raise ConfigError(f"task.kind 'ranking' needs interactions data; {label!r} is a {info.kind} dataset")
        return RankingTask(cfg.k, int(info.interactions["n_items"]))
    if cfg.kind != "auto" and cfg.kind != info.kind:
        raise ConfigError(
            f"task.kind {cfg.kind!r} does not match the data: {label!r} is a {info.kind} dataset "
            f"(use task.kind=auto or {info.kind})"
        )
    if info.kind == "classification":
        if cfg.loss not in ("auto", "cross_entropy"):
            raise ConfigError(f"task.loss {cfg.loss!r} needs regression data; {label!r} is a classification dataset")
        return ClassificationTask(info.n_outputs, cfg.label_smoothing)
    if cfg.loss == "cross_entropy":
        raise ConfigError(f"task.loss 'cross_entropy' needs classification data; {label!r} is a regression dataset")
    if cfg.label_smoothing > 0:
        raise ConfigError("task.label_smoothing only applies to classification; set it to 0 for regression")
    scale = info.target_scale if info.target_scale is not None else 1.0
    return RegressionTask("mse" if cfg.loss == "auto" else cfg.loss, cfg.huber_delta, scale)
