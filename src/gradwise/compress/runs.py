"""A run directory's model, as trained or as compressed: what eval, export, generate and compress load.

It lives with compression because a quantized variant (``gradwise compress``)
is rebuilt as its fp32 structure and then swapped to the quantized weights its
``compression.json`` names; every other run is the model its config builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gradwise.config import RunConfig, read_saved_config, validate
from gradwise.data import Dataset
from gradwise.data.types import DataInfo
from gradwise.errors import CheckpointError
from gradwise.store.checkpoint import load_model_state, load_weights_into, resolve_checkpoint
from gradwise.store.records import DATA_INFO_FILE, read_compression, read_data_record
from gradwise.store.rundir import CONFIG_FILE
from gradwise.tasks import Task
from gradwise.train.setup import build_model_and_data, build_model_for


def load_run_model(
    run_dir: Path, checkpoint: str = "best", *, with_data: bool = True
) -> tuple[RunConfig, Dataset | None, nn.Module, Task, Any]:
    """Rebuild a run's model (with its adapters) and task from its config, load ``checkpoint``.

    With ``with_data`` the data splits are rebuilt too (for evaluation); without, the model is sized
    from the run's recorded ``data_info.json`` so export and generate never need the data (a language
    model's corpus and tokenizer training, for one). Returns ``(cfg, data or None, model, task, device)``.
    """
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = validate(read_saved_config(config_file), source=str(config_file))
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    info = None if with_data else read_data_info(run_dir)
    data: Dataset | None
    if info is None:
        data, model, task, device = build_model_and_data(cfg)
    else:
        data = None
        model, task, device = build_model_for(cfg, info)
    load_weights_into(model, load_model_state(ckpt), ckpt)
    model = _restore_compression(run_dir, model)
    model.eval()
    return cfg, data, model, task, device


def read_data_info(run_dir: Path) -> DataInfo | None:
    """The recorded DataInfo of a run, or None for runs made before it was recorded."""
    raw = read_data_record(run_dir)
    if raw is None:
        return None
    info = DataInfo.from_record(raw, str(run_dir / DATA_INFO_FILE))
    if info.preprocessing is not None:
        from gradwise.data.tabular import check_record

        check_record(info.preprocessing, str(run_dir / DATA_INFO_FILE))
    return info


def _restore_compression(run_dir: Path, model: nn.Module) -> nn.Module:
    """A quantized variant swaps in its quantized weights after the fp32 structure."""
    quantization = read_compression(run_dir).get("quantization")
    if not quantization:
        return model
    from gradwise.compress.quantize import restore_quantized

    return restore_quantized(run_dir, model, quantization)
