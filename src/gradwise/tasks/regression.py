"""Regression: MSE, MAE or Huber loss and a meter of running sums (MSE, MAE, R²)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwise.data.types import TaskKind

RegressionLoss = Literal["mse", "mae", "huber"]


def _loss_fn(name: RegressionLoss, huber_delta: float) -> Callable[..., Tensor]:
    if name == "mse":
        return F.mse_loss
    if name == "mae":
        return F.l1_loss
    return functools.partial(F.huber_loss, delta=huber_delta)


def _scaled(fn: Callable[..., Tensor], scale: float) -> Callable[..., Tensor]:
    """``fn`` on outputs and targets divided by ``scale`` (the identity for 1)."""
    if scale == 1.0:
        return fn

    def scaled(outputs: Tensor, targets: Tensor, **kwargs: object) -> Tensor:
        return fn(outputs / scale, targets / scale, **kwargs)

    return scaled


class RegressionTask:
    """A regression loss over ``(N, 1)`` outputs and targets.

    Args:
        loss_name: ``mse``, ``mae`` or ``huber``.
        huber_delta: Where the Huber loss turns from quadratic to linear (in the loss's units).
        target_scale: For a standardized target, its training standard deviation: the model predicts in
            the target's units and the loss compares ``outputs / scale`` with ``targets / scale``, the
            standardized values it learns (the mean cancels in the difference). Metrics stay in the
            target's units. 1 when the target is not standardized.

    References:
        Huber 1964, "Robust Estimation of a Location Parameter" (Huber loss).
    """

    kind: TaskKind = "regression"
    default_monitor: str = "val_loss"

    def __init__(self, loss_name: RegressionLoss = "mse", huber_delta: float = 1.0, target_scale: float = 1.0) -> None:
        self.loss_name: str = loss_name
        self.huber_delta = huber_delta
        self.target_scale = target_scale
        self._fn = _scaled(_loss_fn(loss_name, huber_delta), target_scale)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss over the batch."""
        return self._fn(*_align(outputs, targets))

    def loss_sum(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed loss over the batch (``loss_sum / N == loss`` for one output)."""
        return self._fn(*_align(outputs, targets), reduction="sum")

    def count(self, targets: Tensor) -> int:
        """Loss terms in a batch (one per example): the loop divides summed losses by the step's total."""
        return int(targets.shape[0])

    def new_meter(self) -> RegressionMeter:
        """An empty meter that scores with this task's loss."""
        return RegressionMeter(self.loss_name, self.huber_delta, self.target_scale)


class RegressionMeter:
    """Accumulates ``[n, Σloss, Σerr², Σ|err|, Σy, Σy²]``; metrics come from those sums alone.

    Every output element counts as one example (one per row for the usual single
    output). Because the state is plain sums, meters on several ranks combine by
    all-reducing :meth:`stats` and calling :meth:`load_stats` with the result.
    """

    N_STATS = 6

    def __init__(self, loss_name: RegressionLoss = "mse", huber_delta: float = 1.0, target_scale: float = 1.0) -> None:
        self._fn = _scaled(_loss_fn(loss_name, huber_delta), target_scale)
        self._stats = torch.zeros(self.N_STATS, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Add a batch of predictions and targets, both ``(N, 1)``."""
        outputs, targets = _align(outputs.detach(), targets.detach())
        err = (outputs - targets).double()
        y = targets.double()
        batch = torch.stack(
            [
                torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device),
                self._fn(outputs, targets, reduction="sum").double(),
                (err * err).sum(),
                err.abs().sum(),
                y.sum(),
                (y * y).sum(),
            ]
        )
        self._stats += batch.cpu()

    def stats(self) -> Tensor:
        """The sufficient statistics ``[n, Σloss, Σerr², Σ|err|, Σy, Σy²]`` as one float64 CPU tensor (a copy)."""
        return self._stats.clone()

    def load_stats(self, t: Tensor) -> None:
        """Replace the state with ``t`` (e.g. the sum of every rank's :meth:`stats`)."""
        if t.numel() != self.N_STATS:
            raise ValueError(f"expected {self.N_STATS} statistics, got {t.numel()}")
        self._stats = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    def confusion(self) -> list[list[int]] | None:
        """None: regression has no confusion matrix."""
        return None

    def compute(self) -> dict[str, float]:
        """``loss``, ``mse``, ``rmse``, ``mae`` and ``r2``; NaN for all before any example.

        R² = 1 − SSE / SST with SST = Σy² − (Σy)²/n; a constant target (SST = 0)
        scores 1 for a perfect fit and 0 otherwise, as scikit-learn's ``r2_score`` does.
        """
        n, loss, sse, sae, sy, syy = (float(v) for v in self._stats)
        if n == 0:
            return {"loss": math.nan, "mse": math.nan, "rmse": math.nan, "mae": math.nan, "r2": math.nan}
        sst = max(syy - sy * sy / n, 0.0)
        if sst > 0:
            r2 = 1.0 - sse / sst
        else:
            r2 = 1.0 if sse == 0 else 0.0
        return {"loss": loss / n, "mse": sse / n, "rmse": math.sqrt(sse / n), "mae": sae / n, "r2": r2}


def _align(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs and targets in one shape and one dtype (at least float32, so bf16 outputs lose no target precision)."""
    # (N,) targets against (N, 1) outputs would broadcast to (N, N) and silently train on nonsense.
    if targets.shape != outputs.shape:
        if targets.numel() != outputs.numel():
            raise ValueError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
        targets = targets.reshape(outputs.shape)
    dtype = torch.promote_types(torch.promote_types(outputs.dtype, targets.dtype), torch.float32)
    return outputs.to(dtype), targets.to(dtype)
