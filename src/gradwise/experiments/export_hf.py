"""``gradwise export --format hf``: a run as a directory Hugging Face libraries load as is.

What the directory holds, by the run's model component:

- ``hf_causal_lm``: the body's ``save_pretrained`` (``config.json``, ``model.safetensors``,
  ``generation_config.json``) and the tokenizer, its ``chat_template`` the one the run's data were
  rendered with; ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``
  load it. A LoRA run without ``--merge`` writes its adapters alone in PEFT format
  (``adapter_config.json``, ``adapter_model.safetensors``; the config's ``base_model_name_or_path``
  is ``model.path``), to be loaded with ``PeftModel.from_pretrained(base, OUT)``; with ``--merge``
  the adapters are folded in and the full model is written.
- ``gpt`` (gradwise's own GPT): a ``GPT2LMHeadModel`` (tied embedding and head) and gradwise's BPE as a
  transformers tokenizer (EOS, BOS and pad ``<|endoftext|>``), so the directory can be the
  ``model.path`` of an ``hf_causal_lm`` run (pre-train, then SFT, then DPO).
- ``hf_encoder``: the encoder body in Hugging Face format (``AutoModel``; BERT-like bodies get a new,
  untrained pooler on loading: gradwise never uses it), the tokenizer, the head as
  ``head.safetensors`` (``weight`` ``(n_outputs, hidden_size)``, ``bias``) and ``head_config.json``::

      {"pooling": "mean" | "cls", "n_outputs": 12, "class_names": [...] | null,
       "task": "classification" | "regression", "pad_token_id": 0, "hidden_size": 384}

  The prediction is ``head(pool(body(ids, attention_mask=ids != pad).last_hidden_state))``, where
  ``mean`` averages the non-pad tokens and ``cls`` takes the first token. A LoRA run without
  ``--merge`` writes the body's adapters in PEFT format instead of the body.

Every export also holds ``gradwise_export.json`` (the run, checkpoint and kind it came from). The
directory is written under a temporary name and renamed into place; an existing destination is
replaced only when it is an earlier export (it holds that record), never another directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gradwise.compress.runs import load_run_model, read_data_info
from gradwise.config import RunConfig, read_saved_config, validate
from gradwise.data.readers import first_line
from gradwise.data.types import DataInfo
from gradwise.errors import CheckpointError, ConfigError
from gradwise.experiments.export import export_destination
from gradwise.finetune.lora import is_lora, merge_lora
from gradwise.models.hf_encoder import quiet_transformers
from gradwise.store.files import fsync_dir, fsync_file
from gradwise.store.records import TOKENIZER_DIR, read_compression
from gradwise.store.rundir import CONFIG_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EXPORT_RECORD = "gradwise_export.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
DEFAULT_DIR = "export-hf"
EOT = "<|endoftext|>"  # gradwise's GPT tokenizer's one special token (gradwise.data.corpus.EOT)


@dataclass(frozen=True)
class HFExport:
    """What ``export_hf`` wrote.

    Attributes:
        out: The export directory.
        adapter_base: For adapters written alone, the base model directory they apply to; else None.
    """

    out: Path
    adapter_base: Path | None = None


def export_hf(run_dir: Path, out: Path | None = None, *, merge: bool = False, checkpoint: str = "best") -> HFExport:
    """Write ``run_dir``'s model and tokenizer in Hugging Face format to ``out`` (default ``RUN_DIR/export-hf``).

    Raises:
        ConfigError: the run's model has no Hugging Face form (only hf_causal_lm, gpt and hf_encoder
            have), it is a quantized variant, ``merge`` is asked without LoRA, or ``out`` is an existing
            file or a directory that is not an earlier export.
        CheckpointError: the run directory, its checkpoint or its tokenizer is missing or corrupt, or a
            link stands where the export would be written.
    """
    out = export_destination(run_dir, out, merge=merge, default=DEFAULT_DIR)
    out = Path(os.path.abspath(out))  # `-o .` has no name to stage a sibling under
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        raise CheckpointError(f"{run_dir}: not a run directory ({CONFIG_FILE} is missing)")
    saved = validate(read_saved_config(config_file), source=str(config_file))
    name = saved.model.name
    base_dir = saved.model.pretrained_dir()
    if base_dir is not None and Path(os.path.abspath(base_dir)) == out:
        raise ConfigError(
            f"export -o {out}: that is the model directory {run_dir} was trained from (model.path), which the "
            "run still reads (its base, its DPO reference); choose another directory"
        )
    writer = _WRITERS.get(name)
    if writer is None:
        raise ConfigError(
            f"export --format hf: {run_dir} is a {name!r} run; the Hugging Face format holds "
            f"{', '.join(sorted(_WRITERS))} runs (export it without --format hf)"
        )
    if read_compression(run_dir).get("quantization"):
        raise ConfigError(
            f"export --format hf: {run_dir} is a quantized variant, which has no Hugging Face form; "
            "export it without --format hf"
        )
    _refuse_foreign(out)
    cfg, _, model, _, _ = load_run_model(run_dir, checkpoint, with_data=False)
    info = read_data_info(run_dir)
    with quiet_transformers(), _staged(out) as staging:
        base = writer(_Source(run_dir, cfg, info, model, merge), staging)
        record = {
            "format": "hf",
            "source": os.path.abspath(run_dir),
            "checkpoint": checkpoint,
            "model": name,
            "merged": merge,
            "adapters_only": base is not None,
            "base_model": None if base is None else str(base),
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return HFExport(out, base)


@dataclass(frozen=True)
class _Source:
    """The loaded run an export writer reads."""

    run_dir: Path
    cfg: RunConfig
    info: DataInfo | None
    model: nn.Module
    merge: bool


# --------------------------------------------------------------------------- writers, one per component


def _write_causal_lm(source: _Source, out: Path) -> Path | None:
    tokenizer = _run_tokenizer(source.run_dir)
    if source.info is not None and source.info.chat_template is not None:
        tokenizer.chat_template = source.info.chat_template
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # what the run's data padded with
    tokenizer.save_pretrained(str(out))
    model = source.model
    if is_lora(model) and not source.merge:
        return _write_adapters(model.body, source.cfg, out)
    if is_lora(model):
        model = merge_lora(model)
    _save_model(model.body, tokenizer, out)
    return None


def _write_gpt(source: _Source, out: Path) -> Path | None:
    hf = source.model.hf
    tokenizer = _gpt_tokenizer(source.run_dir, int(hf.config.n_positions))
    if source.info is not None and source.info.chat_template is not None:
        tokenizer.chat_template = source.info.chat_template
    tokenizer.save_pretrained(str(out))
    _save_model(hf, tokenizer, out)
    return None


def _write_encoder(source: _Source, out: Path) -> Path | None:
    from safetensors.torch import save_file

    model = source.model
    _run_tokenizer(source.run_dir).save_pretrained(str(out))
    base = None
    if is_lora(model) and not source.merge:
        base = _write_adapters(model.body, source.cfg, out)
    else:
        if is_lora(model):
            model = merge_lora(model)
        model.body.save_pretrained(str(out))
    head = {key: value.detach().cpu().contiguous() for key, value in model.head.state_dict().items()}
    save_file(head, str(out / HEAD_WEIGHTS))
    info = source.info
    head_config = {
        "pooling": model.pooling,
        "n_outputs": int(model.head.out_features),
        "class_names": None if info is None else info.class_names,
        "task": source.cfg.task.kind if info is None else info.kind,
        "pad_token_id": int(model.pad_token_id),
        "hidden_size": int(model.head.in_features),
    }
    (out / HEAD_CONFIG).write_text(json.dumps(head_config, indent=1) + "\n", encoding="utf-8")
    return base


_WRITERS: dict[str, Callable[[_Source, Path], Path | None]] = {
    "hf_causal_lm": _write_causal_lm,
    "gpt": _write_gpt,
    "hf_encoder": _write_encoder,
}


# --------------------------------------------------------------------------- helpers


def _save_model(body: Any, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """``save_pretrained`` (safetensors, transformers' default) with caching on and the tokenizer's stop tokens."""
    body.config.use_cache = True  # gradwise trains without the cache; generation outside wants it
    generation = getattr(body, "generation_config", None)
    if generation is not None:
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        generation.use_cache = True
    body.save_pretrained(str(out))


def _write_adapters(body: Any, cfg: RunConfig, out: Path) -> Path:
    """The PEFT body's adapters alone; their config names the base model directory (absolute). Returns it."""
    body.save_pretrained(str(out))
    base = Path(os.path.abspath(cfg.model.pretrained_dir()))
    config_file = out / "adapter_config.json"
    adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return base


def _run_tokenizer(run_dir: Path) -> PreTrainedTokenizerBase:
    """The Hugging Face tokenizer a run keeps in ``RUN/tokenizer``."""
    from transformers import AutoTokenizer

    directory = _tokenizer_dir(run_dir)
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{directory}: no usable tokenizer ({first_line(exc)})") from None


def _gpt_tokenizer(run_dir: Path, n_positions: int) -> PreTrainedTokenizerBase:
    """gradwise's BPE (a bare ``tokenizers`` file) wrapped as a transformers fast tokenizer; ``<|endoftext|>`` ends,
    begins and pads."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    file = _tokenizer_dir(run_dir) / "tokenizer.json"
    try:
        bpe = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise CheckpointError(f"{file}: cannot load the tokenizer ({first_line(exc)})") from None
    if bpe.token_to_id(EOT) is None:
        raise CheckpointError(f"{file}: has no {EOT} token")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, pad_token=EOT, model_max_length=n_positions
    )


def _tokenizer_dir(run_dir: Path) -> Path:
    directory = run_dir / TOKENIZER_DIR
    if not directory.is_dir() or directory.is_symlink():
        raise CheckpointError(f"{directory}: missing; the run keeps no copy of its tokenizer")
    linked = [f.name for f in directory.iterdir() if f.is_symlink()]
    if linked:  # reading through a planted link would copy a file from outside the run into the export
        raise CheckpointError(f"{directory}: {', '.join(linked)} is a link; gradwise copies tokenizers as plain files")
    return directory


def _refuse_foreign(out: Path) -> None:
    """An existing ``out`` is replaced only when it is empty or an earlier export; anything else is refused."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"export -o {out}: a file stands there; choose a directory")
    if any(out.iterdir()) and not (out / EXPORT_RECORD).is_file():
        raise ConfigError(
            f"export -o {out}: the directory exists and is not an earlier gradwise export (no {EXPORT_RECORD}); "
            "choose a new or empty directory"
        )


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh sibling directory to write into, fsynced and renamed over ``out`` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file() and not file.is_symlink():
                fsync_file(file)
        fsync_dir(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
            os.replace(staging, out)
            _remove(old)
        else:
            os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
