"""Exporting a run's weights for use outside gradwise: plain, adapter, or adapters merged."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from gradwise.config import RunConfig, read_yaml, to_yaml, validate
from gradwise.data.types import DataInfo
from gradwise.errors import CheckpointError, ConfigError
from gradwise.experiments.rundir import CONFIG_FILE
from gradwise.train.checkpoint import atomic_write_text, load_model_state, load_weights_into, resolve_checkpoint
from gradwise.train.setup import build_model_and_data, build_model_for

TOKENIZER_DIR = "tokenizer"
DATA_INFO_FILE = "data_info.json"


def load_run_model(run_dir: Path, checkpoint: str = "best", *, with_data: bool = True):
    """Rebuild a run's model (with its adapters) and task from its config, load ``checkpoint``.

    With ``with_data`` the data splits are rebuilt too (for evaluation); without, the model is sized
    from the run's recorded ``data_info.json`` so export and generate never need the data (a language
    model's corpus and tokenizer training, for one). Returns ``(cfg, data or None, model, task, device)``.
    """
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = validate(read_yaml(config_file), source=str(config_file))
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    info = None if with_data else read_data_info(run_dir)
    if info is None:
        data, model, task, device = build_model_and_data(cfg)
    else:
        data = None
        model, task, device = build_model_for(cfg, info)
    load_weights_into(model, load_model_state(ckpt), ckpt)
    model = _restore_compression(run_dir, model)
    model.eval()
    return cfg, data, model, task, device


def _restore_compression(run_dir: Path, model: nn.Module) -> nn.Module:
    """A quantized variant (``gradwise compress``) swaps in its quantized weights after the fp32 structure."""
    from gradwise.compress.variant import read_compression

    quantization = read_compression(run_dir).get("quantization")
    if not quantization:
        return model
    from gradwise.compress.quantize import restore_quantized

    return restore_quantized(run_dir, model, quantization)


def record_data(info: DataInfo, run_dir: Path) -> None:
    """Keep what sizes the model (``data_info.json``) and the tokenizer inside the run directory."""
    atomic_write_text(run_dir / DATA_INFO_FILE, json.dumps(asdict(info), indent=1) + "\n")
    copy_tokenizer(info.tokenizer_dir, run_dir)


def read_data_info(run_dir: Path) -> DataInfo | None:
    """The recorded DataInfo of a run, or None for runs made before it was recorded."""
    file = run_dir / DATA_INFO_FILE
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text())
        if raw.get("image_shape") is not None:
            raw["image_shape"] = tuple(raw["image_shape"])
        return DataInfo(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{file}: corrupt ({exc})") from None


def export_run(run_dir: Path, out: Path | None = None, *, merge: bool = False, checkpoint: str = "best") -> Path:
    """Write ``model.safetensors`` (merged when ``merge``), or the LoRA adapter alone, plus config and tokenizer."""
    config_file = run_dir / CONFIG_FILE
    if merge and config_file.exists():
        saved = validate(read_yaml(config_file), source=str(config_file))
        if saved.finetune.lora is None:
            raise ConfigError(f"export --merge: {run_dir} has no LoRA adapters to merge (finetune.lora is not set)")
    out = out or run_dir / "export"
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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"source": str(run_dir), "merged": str(merge)})
    _copy_extras(run_dir, out, cfg)
    return out


def _export_quantized(run_dir: Path, out: Path) -> bool:
    """A quantized variant exports as written: its quantized file, compression record, config and tokenizer."""
    from gradwise.compress.variant import COMPRESSION_FILE, read_compression

    quantization = read_compression(run_dir).get("quantization")
    if not quantization:
        return False
    out.mkdir(parents=True, exist_ok=True)
    for name in (quantization["file"], COMPRESSION_FILE, CONFIG_FILE):
        shutil.copyfile(run_dir / name, out / name)
    if (run_dir / TOKENIZER_DIR).is_dir():
        shutil.copytree(run_dir / TOKENIZER_DIR, out / TOKENIZER_DIR, dirs_exist_ok=True)
    return True


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
