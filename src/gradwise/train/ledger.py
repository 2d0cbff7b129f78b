"""Train-step records that wait for their loss, so that data-parallel ranks talk once per window, not per step.

Every logged step has a loss, and under torch.distributed that loss is the sum
of every rank's share: one all-reduce. A gloo all-reduce costs about a
millisecond, more than a small model's whole step, so the ledger keeps each
step's record with its rank-local loss tensor and settles a window of steps at
once: one all-reduce of ``[loss_1 … loss_k, stop request]`` gives every rank
the global losses and the agreed stop decision together. The loop settles at
the points where every rank must be in the same state anyway (an evaluation, a
checkpoint, an epoch end, every ``STOP_CHECK_STEPS`` steps, the end); a
non-finite loss is found there, before anything is written.

One process settles in windows too: reading a loss (or a clipped gradient's norm)
makes the host wait for the device to finish the step, which on a GPU stalls the
queue of kernels the next step would already be launching. Settling replays the
window's records in order, so a non-finite loss is still reported at its own step,
and nothing after it is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwise.errors import TrainingError
from gradwise.train.distributed import Distributed


class LossLedger:
    """Holds train records until their losses are known on every rank, then logs and reports them.

    Args:
        ctx: This process's place in the job.
        write: Writes one metrics line (the run's MetricsLog; a no-op on ranks other than 0).
        report: ``report(step, loss, lr)`` updates the progress display.
    """

    def __init__(self, ctx: Distributed, write: Any, report: Any) -> None:
        self.ctx = ctx
        self.write = write
        self.report = report
        self._pending: list[tuple[dict[str, Any], torch.Tensor]] = []

    def add(self, record: dict[str, Any], loss: torch.Tensor) -> None:
        """Keep a step's record (its ``loss`` key is filled at settling) with this rank's share of the loss.

        Other 0-d tensors in the record (a clipped gradient's norm, the same on every rank) are read at
        settling too.
        """
        self._pending.append((record, loss.detach()))

    @property
    def pending(self) -> int:
        """Steps waiting to be settled."""
        return len(self._pending)

    def settle(self, stop_asked: bool) -> tuple[float | None, bool]:
        """Reduce the pending losses over ranks, check and log them; agree on a stop request.

        Returns:
            The last step's global loss (None when nothing was pending), and whether any rank asked to stop.

        Raises:
            TrainingError: A pending loss is not finite (named by its step and epoch).
        """
        if not self._pending:
            return None, self.ctx.any(stop_asked)
        # In the losses' own dtype: the sum is then the one a hand-written loop's all-reduce of them gives.
        shares = torch.stack([loss for _, loss in self._pending])
        if self.ctx.active:
            flag = torch.tensor([1.0 if stop_asked else 0.0], dtype=shares.dtype, device=shares.device)
            packed = self.ctx.sum(torch.cat([shares, flag]))
            shares, stop_asked = packed[:-1], bool(packed[-1].item() > 0)
        losses = shares.tolist()
        pending, self._pending = self._pending, []
        _read_tensors([record for record, _ in pending])
        for (record, _), loss in zip(pending, losses, strict=True):
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"training loss is {loss} at step {record['step']} (epoch {record['epoch']:.2f})", record["step"]
                )
            record["loss"] = loss
            self.write(record)
            self.report(record["step"], loss, record["lr"])
        return losses[-1], stop_asked

    def keep_what_is_known(self) -> None:
        """Log the pending records up to the first non-finite loss, without raising: the run is failing anyway.

        One process only: under torch.distributed the global losses need an all-reduce, which a rank on its
        way out of a failure cannot count on its peers joining; its pending records are dropped.
        """
        pending, self._pending = self._pending, []
        if self.ctx.active or not pending:
            return
        try:
            losses = torch.stack([loss for _, loss in pending]).tolist()
            _read_tensors([record for record, _ in pending])
        except RuntimeError:  # the device itself failed (e.g. a CUDA error): nothing more can be read
            return
        for (record, _), loss in zip(pending, losses, strict=True):
            if not math.isfinite(loss):
                return
            record["loss"] = loss
            self.write(record)


class NonFiniteLoss(TrainingError):
    """A settled loss is NaN or infinite; ``step`` is the step that produced it."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def _read_tensors(records: list[dict[str, Any]]) -> None:
    """Replace the tensor values of ``records`` by floats, with one device-to-host copy for all of them."""
    where = [(record, key) for record in records for key, value in record.items() if isinstance(value, torch.Tensor)]
    if not where:
        return
    # Stacked on their device in one dtype and widened on the host: MPS has no float64.
    dtype = where[0][0][where[0][1]].dtype
    values = torch.stack([record[key].reshape(()).to(dtype) for record, key in where]).cpu().double().tolist()
    for (record, key), value in zip(where, values, strict=True):
        record[key] = value
