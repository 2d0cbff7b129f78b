"""Evaluating a finished (or interrupted) run from its directory alone."""

from __future__ import annotations

from pathlib import Path

from gradwise.config import read_yaml, validate
from gradwise.errors import CheckpointError
from gradwise.experiments.rundir import CONFIG_FILE
from gradwise.train.checkpoint import load_model_state, load_weights_into, resolve_checkpoint
from gradwise.train.evaluate import Evaluation, evaluate
from gradwise.train.setup import build_model_and_data


def evaluate_run(run_dir: Path, checkpoint: str = "best", split: str = "test") -> Evaluation:
    """Rebuild the run's data split and model from its config, load ``checkpoint`` and evaluate ``split``."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = validate(read_yaml(config_file), source=str(config_file))
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    data, model, task, device = build_model_and_data(cfg)
    load_weights_into(model, load_model_state(ckpt), ckpt)
    chosen = getattr(data, split)
    if len(chosen.y) == 0:
        raise CheckpointError(f"{run_dir}: the {split} split is empty (data.{split}_fraction is 0)")
    return evaluate(model, task, chosen, split, cfg.eval.batch_size, device, cfg.precision)
