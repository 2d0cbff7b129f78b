"""A compressed variant is a run directory: how one is written when no training made it, and read back.

Steps that train (gradual pruning, QAT, distillation, recovery) get their run
directory from the one loop. Steps that only transform weights (one-shot or
structured pruning, post-training quantization) write the same layout here:
``config.yaml`` (the config that builds the fp32 model), ``data_info.json``,
``checkpoints/best`` (weights only), ``summary.json`` with the final
evaluation, and ``compression.json`` saying what was done, so ``gradwise eval``
and the next step read it like any run.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from gradwise.compress.measure import count_weights
from gradwise.config import RunConfig
from gradwise.data import Dataset
from gradwise.models import weight_sparsity
from gradwise.store.checkpoint import MODEL_FILE, save_checkpoint
from gradwise.store.records import (
    TOKENIZER_DIR,
    compressed_weight_file,
    copy_tree_into,
    read_compression,
    write_compression,
    write_data_record,
)
from gradwise.store.rundir import write_config, write_summary
from gradwise.tasks import Task
from gradwise.train.evaluate import evaluate


def evaluate_splits(model: nn.Module, task: Task, data: Dataset, cfg: RunConfig, device: Any) -> dict[str, float]:
    """Validation and test metrics of ``model`` (test only when the run has a test split)."""
    metrics = dict(evaluate(model, task, data.val, "val", cfg.eval.batch_size, device, cfg.precision).metrics)
    if len(data.test.y):
        metrics.update(evaluate(model, task, data.test, "test", cfg.eval.batch_size, device, cfg.precision).metrics)
    return metrics


def start_model_run(run_dir: Path, cfg: RunConfig, state: dict[str, Any], data: Dataset, source: Path) -> None:
    """Create ``run_dir`` with the config, data record, tokenizer and a weights-only ``best`` checkpoint."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a half-written variant of an earlier, interrupted compress
    run_dir.mkdir(parents=True)
    write_config(run_dir, cfg)
    write_data_record(run_dir, asdict(data.info))
    if not (run_dir / TOKENIZER_DIR).exists():
        copy_tree_into(source / TOKENIZER_DIR, run_dir / TOKENIZER_DIR)
    save_checkpoint(run_dir / "checkpoints", 0, state, {}, ["best"], weights_only=True)


def finish_model_run(
    run_dir: Path,
    cfg: RunConfig,
    model: nn.Module,
    task: Task,
    data: Dataset,
    device: Any,
    *,
    monitor: str,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Write ``compression.json`` and a summary whose ``final`` metrics are those of ``model`` as given."""
    write_compression(run_dir, record)
    summary = {
        "name": run_dir.name,
        "status": "completed",
        "stop_reason": f"compressed from {record.get('source', '?')}",
        "task": data.info.kind,
        "loss": task.loss_name,
        "data": data.info.source,
        "monitor": monitor,
        "final": evaluate_splits(model, task, data, cfg, device),
        "final_weights": "best",
        "steps": 0,
        "parameters": count_weights(model)[0],  # an ONNX graph's weights too (it has no torch parameters)
    }
    sparsity = weight_sparsity(model)  # None for an ONNX Runtime session (its weights are not parameters)
    if sparsity is not None:
        summary["sparsity"] = round(sparsity, 6)
    write_summary(run_dir, summary)
    return summary


def weight_files(run_dir: Path) -> list[Path]:
    """The files that hold a variant's weights as deployed: the quantized file, else the best checkpoint."""
    quantization = read_compression(run_dir).get("quantization")
    if quantization:
        return [compressed_weight_file(run_dir, quantization)]
    return [run_dir / "checkpoints" / "best" / MODEL_FILE]
