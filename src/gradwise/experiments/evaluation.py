"""Evaluating a finished (or interrupted) run from its directory alone."""

from __future__ import annotations

from pathlib import Path

from gradwise.compress.runs import load_run_model
from gradwise.errors import CheckpointError
from gradwise.train.evaluate import Evaluation, evaluate


def evaluate_run(run_dir: Path, checkpoint: str = "best", split: str = "test") -> Evaluation:
    """Rebuild the run's data split and model from its config, load ``checkpoint`` and evaluate ``split``."""
    cfg, data, model, task, device = load_run_model(run_dir, checkpoint)
    chosen = getattr(data, split)
    if len(chosen.y) == 0:
        raise CheckpointError(f"{run_dir}: the {split} split is empty (data.{split}_fraction is 0)")
    return evaluate(model, task, chosen, split, cfg.eval.batch_size, device, cfg.precision)
