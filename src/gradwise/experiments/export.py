"""Exporting a run's weights for use outside gradwise: plain, adapter, or adapters merged.

This is the default format (``gradwise export RUN``): gradwise's own state dict, config.yaml and the
tokenizer, which gradwise reads back. ``--format hf`` (:mod:`gradwise.experiments.export_hf`) writes
what Hugging Face libraries load as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradwise.compress.runs import load_run_model
from gradwise.config import RunConfig, read_saved_config, to_yaml, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.store.checkpoint import save_tensors
from gradwise.store.files import atomic_write_text
from gradwise.store.paths import audit_for_writing
from gradwise.store.records import (
    COMPRESSION_FILE,
    DATA_INFO_FILE,
    TOKENIZER_DIR,
    compressed_weight_file,
    copy_file_into,
    copy_tree_into,
    read_compression,
)
from gradwise.store.rundir import CONFIG_FILE


def export_run(run_dir: Path, out: Path | None = None, *, merge: bool = False, checkpoint: str = "best") -> Path:
    """Write ``model.safetensors`` (merged when ``merge``), or the LoRA adapter alone, plus config and tokenizer.

    The default destination ``RUN_DIR/export`` is inside the run directory, which may have come from
    anyone: a link planted there (or anywhere in the run) is refused rather than written through.
    """
    out = export_destination(run_dir, out, merge=merge)
    if _export_quantized(run_dir, out):
        return out
    cfg, _, model, _, _ = load_run_model(run_dir, checkpoint, with_data=False)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.finetune.lora is not None:
        from gradwise.finetune.lora import merge_lora, save_adapter

        if not merge:
            save_adapter(model, out / "adapter")
            _copy_extras(run_dir, out, cfg)
            return out
        model = merge_lora(model)
        # The merged weights have the plain body's names: the exported config must not ask for adapters.
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"lora": None})})
    save_tensors(out / "model.safetensors", model.state_dict(), metadata={"source": str(run_dir), "merged": str(merge)})
    _copy_extras(run_dir, out, cfg)
    return out


def export_destination(run_dir: Path, out: Path | None, *, merge: bool, default: str = "export") -> Path:
    """Where an export of ``run_dir`` goes (``out``, else ``RUN_DIR/<default>``), checked before anything is written.

    Raises:
        ConfigError: ``merge`` is asked of a run without LoRA adapters.
        CheckpointError: ``out`` is a symbolic link, or it lies inside the run and the run holds a link
            gradwise did not make (see :func:`~gradwise.store.paths.audit_for_writing`).
    """
    config_file = run_dir / CONFIG_FILE
    if merge and config_file.exists():
        saved = validate(read_saved_config(config_file), source=str(config_file))
        if saved.finetune.lora is None:
            raise ConfigError(f"export --merge: {run_dir} has no LoRA adapters to merge (finetune.lora is not set)")
    out = out or run_dir / default
    if _within(out, run_dir) or out.is_symlink():
        audit_for_writing(run_dir)
        if out.is_symlink():
            raise CheckpointError(f"{out}: a symbolic link; gradwise never writes through links")
    return out


def _within(path: Path, run_dir: Path) -> bool:
    """Whether ``path`` lies in ``run_dir`` as written (``RUN/plots/x``, even where ``plots`` is a link) or resolved."""
    for a, b in ((Path(os.path.abspath(path)), Path(os.path.abspath(run_dir))), (path.resolve(), run_dir.resolve())):
        if a == b or b in a.parents:
            return True
    return False


def _export_quantized(run_dir: Path, out: Path) -> bool:
    """A quantized variant exports as written: its quantized file, compression record, config and tokenizer."""
    quantization = read_compression(run_dir).get("quantization")
    if not quantization:
        return False
    out.mkdir(parents=True, exist_ok=True)
    weights = compressed_weight_file(run_dir, quantization)  # refused unless it lies inside the run
    for source in (weights, run_dir / COMPRESSION_FILE, run_dir / CONFIG_FILE):
        copy_file_into(source, out / source.name)
    copy_tree_into(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    _copy_data_record(run_dir, out)
    return True


def _copy_extras(run_dir: Path, out: Path, cfg: RunConfig) -> None:
    atomic_write_text(out / CONFIG_FILE, to_yaml(cfg))
    copy_tree_into(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR)
    _copy_data_record(run_dir, out)


def _copy_data_record(run_dir: Path, out: Path) -> None:
    """``data_info.json`` beside the weights: a table's column encoding and a regression target's mean and
    scale (the un-standardizing buffers are not in the weights file) are needed to use the model at all."""
    record = run_dir / DATA_INFO_FILE
    if record.is_file() and not record.is_symlink():
        copy_file_into(record, out / DATA_INFO_FILE)
