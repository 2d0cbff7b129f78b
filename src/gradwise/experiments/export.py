"""Exporting a run's weights for use outside gradwise: plain, adapter, or adapters merged."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from gradwise.config import RunConfig, read_yaml, to_yaml, validate
from gradwise.errors import CheckpointError, ConfigError
from gradwise.experiments.rundir import CONFIG_FILE
from gradwise.train.checkpoint import load_model_state, load_weights_into, resolve_checkpoint
from gradwise.train.setup import build_model_and_data

TOKENIZER_DIR = "tokenizer"


def load_run_model(run_dir: Path, checkpoint: str = "best"):
    """Rebuild a run's data, model (with its adapters) and task from its config and load ``checkpoint``."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = validate(read_yaml(config_file), source=str(config_file))
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    data, model, task, device = build_model_and_data(cfg)
    load_weights_into(model, load_model_state(ckpt), ckpt)
    model.eval()
    return cfg, data, model, task, device


def export_run(run_dir: Path, out: Path | None = None, *, merge: bool = False, checkpoint: str = "best") -> Path:
    """Write ``model.safetensors`` (merged when ``merge``), or the LoRA adapter alone, plus config and tokenizer."""
    config_file = run_dir / CONFIG_FILE
    if merge and config_file.exists():
        saved = validate(read_yaml(config_file), source=str(config_file))
        if saved.finetune.lora is None:
            raise ConfigError(f"export --merge: {run_dir} has no LoRA adapters to merge (finetune.lora is not set)")
    cfg, _, model, _, _ = load_run_model(run_dir, checkpoint)
    out = out or run_dir / "export"
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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"source": str(run_dir), "merged": str(merge)})
    _copy_extras(run_dir, out, cfg)
    return out


def _copy_extras(run_dir: Path, out: Path, cfg: RunConfig) -> None:
    (out / CONFIG_FILE).write_text(to_yaml(cfg))
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)


def copy_tokenizer(source: str | None, run_dir: Path) -> None:
    """Keep the tokenizer a run was trained with inside its run directory (for generate and export)."""
    if source is None:
        return
    target = run_dir / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for file in Path(source).iterdir():
        if file.is_file() and file.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
            shutil.copyfile(file, target / file.name)
