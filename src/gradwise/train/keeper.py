"""When checkpoints are written, so that safety does not cost training time.

Writing a full checkpoint (weights, optimizer, RNGs; fsynced) at every
evaluation costs more than the training itself when epochs are short. The
keeper writes ``last`` at an evaluation only when ``checkpoint.min_interval_s``
has passed since the previous write (the first evaluation always writes),
and always every ``checkpoint.every_steps`` steps and when the run ends or is
interrupted. A new best between two writes is kept in memory (a CPU copy of
the weights) and written beside the next ``last``; both are committed by one
manifest rename (see :mod:`gradwise.store.checkpoint`), so the files on disk
always form a consistent pair: after a crash, resuming from ``last`` replays
the same steps and finds the same best again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gradwise.config import CheckpointConfig
from gradwise.store.checkpoint import CheckpointFiles

Snapshot = Callable[[], dict[str, Any]]


class CheckpointWriter(Protocol):
    """Stages checkpoint directories, then commits tags to them in one step (``gradwise.store``'s writers)."""

    def stage(
        self, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], *, weights_only: bool = False
    ) -> str: ...

    def commit(self, tags: Mapping[str, tuple[str, int]]) -> None: ...


class CheckpointKeeper:
    """Decides when to write ``last`` and ``best`` under ``root``.

    Args:
        root: The run's ``checkpoints/`` directory.
        cfg: The checkpoint section of the config.
        model: The model whose weights are saved.
        training_state: Returns the full training state at the moment of a write.
        before_write: Called before every write, e.g. to make the metrics log
            durable up to the checkpoint's step (resume cuts the log back to it).
        writer: Stages and commits checkpoints (default: ordinary files under ``root``; FSDP runs pass the
            sharded writer that every rank calls).
        agree: Makes a rank-local decision (the time since the last write) the same on every rank;
            needed when all ranks write together.
    """

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        model: nn.Module,
        training_state: Snapshot,
        before_write: Callable[[], None] = lambda: None,
        writer: CheckpointWriter | None = None,
        agree: Callable[[bool], bool] = lambda decision: decision,
    ) -> None:
        self.root = root
        self.cfg = cfg
        self.model = model
        self.training_state = training_state
        self.before_write = before_write
        self.writer = writer if writer is not None else CheckpointFiles(root)
        self.agree = agree
        self.saved_step = -1
        self._saved_at = -math.inf
        self._pending_best: tuple[int, dict[str, torch.Tensor]] | None = None

    def after_eval(self, step: int, improved: bool) -> None:
        """Remember a new best; write when the interval since the last write has passed."""
        if improved and self.cfg.keep_best:
            self._pending_best = (step, {k: _copy(v) for k, v in self.model.state_dict().items()})
        if self.agree(time.monotonic() - self._saved_at >= self.cfg.min_interval_s):
            self.save(step)

    def after_step(self, step: int) -> None:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``last`` at ``step`` (and a pending ``best``) unless that is already on disk."""
        if step == self.saved_step and self._pending_best is None:
            return
        self.before_write()
        tags: dict[str, tuple[str, int]] = {}
        if self._pending_best is not None:
            best_step, weights = self._pending_best
            if best_step != step:
                # Weights only: `best` is for evaluation and restore-best; runs resume from `last`.
                tags["best"] = (self.writer.stage(best_step, weights, {}, weights_only=True), best_step)
        name = self.writer.stage(step, self.model.state_dict(), self.training_state())
        tags["last"] = (name, step)
        if self._pending_best is not None and self._pending_best[0] == step:
            tags["best"] = (name, step)
        # One commit for both: `best` and the stopper state inside `last` can never disagree.
        self.writer.commit(tags)
        self._pending_best = None
        self.saved_step = step
        self._saved_at = time.monotonic()


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A pending best's copy: on the CPU, so it does not double the model's accelerator memory.

    A shard of a fully sharded parameter stays where it is: it is 1/N of the weights, and its layout
    is what the sharded writer needs.
    """
    if hasattr(tensor, "to_local"):
        return tensor.detach().clone()
    return tensor.detach().to("cpu", copy=True)
