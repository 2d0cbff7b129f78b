"""When checkpoints are written, so that safety does not cost training time.

Writing a full checkpoint (weights, optimizer, RNGs; fsynced) at every
evaluation costs more than the training itself when epochs are short. The
keeper writes ``last`` at an evaluation only when ``checkpoint.min_interval_s``
has passed since the previous write, and always every ``checkpoint.every_steps``
steps and when the run ends or is interrupted. A new best between two writes
is kept in memory (a copy of the weights) and written beside the next
``last``, so the files on disk always form a consistent pair: after a crash,
resuming from ``last`` replays the same steps and finds the same best again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwise.config import CheckpointConfig
from gradwise.train.checkpoint import save_checkpoint

Snapshot = Callable[[], dict[str, Any]]


class CheckpointKeeper:
    """Decides when to write ``last`` and ``best`` under ``root``.

    Args:
        root: The run's ``checkpoints/`` directory.
        cfg: The checkpoint section of the config.
        model: The model whose weights are saved.
        training_state: Returns the full training state at the moment of a write.
    """

    def __init__(self, root: Path, cfg: CheckpointConfig, model: nn.Module, training_state: Snapshot) -> None:
        self.root = root
        self.cfg = cfg
        self.model = model
        self.training_state = training_state
        self.saved_step = -1
        self._saved_at = time.monotonic()  # the first write waits for the interval too
        self._pending_best: tuple[int, dict[str, torch.Tensor]] | None = None

    def after_eval(self, step: int, improved: bool) -> None:
        """Remember a new best; write when the interval since the last write has passed."""
        if improved and self.cfg.keep_best:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._pending_best = (step, weights)
        if time.monotonic() - self._saved_at >= self.cfg.min_interval_s:
            self.save(step)

    def after_step(self, step: int) -> None:
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``last`` at ``step`` (and a pending ``best``) unless that is already on disk."""
        if step == self.saved_step and self._pending_best is None:
            return
        tags = ["last"]
        if self._pending_best is not None:
            best_step, weights = self._pending_best
            if best_step == step:
                tags.append("best")
            else:
                # Weights only: `best` is for evaluation and restore-best; runs resume from `last`.
                save_checkpoint(self.root, best_step, weights, {"counters": {"step": best_step}}, ["best"])
            self._pending_best = None
        save_checkpoint(self.root, step, self.model.state_dict(), self.training_state(), tags)
        self.saved_step = step
        self._saved_at = time.monotonic()
