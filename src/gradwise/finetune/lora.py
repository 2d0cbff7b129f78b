"""LoRA through PEFT: low-rank adapters on the body's Linear layers, the head trained in full.

``apply_lora`` wraps ``model.body`` with ``peft.get_peft_model`` (a plain
``PeftModel``: it passes every forward argument through to the body, so the
model's own forward is unchanged). Every body weight is frozen; the adapters
``lora_A`` (r × in) and ``lora_B`` (out × r) of each targeted Linear and the
head train. Parameter names become
``body.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight``;
:func:`merge_lora` folds the adapters back into the weights and restores the
plain names.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gradwise.config import LoraConfig
from gradwise.data.readers import first_line
from gradwise.errors import CheckpointError, ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HEAD_FILE = "head.safetensors"


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model.body`` with LoRA adapters (in place) and return ``model``.

    A target names a Linear module by its last name component (``query``) or
    any dotted suffix of its name (``attention.self.query``), as PEFT matches them.

    Args:
        model: A model with a ``body`` (e.g. :class:`~gradwise.models.hf_encoder.HFEncoderClassifier`) and a ``head``.
        cfg: ``finetune.lora``: rank ``r``, ``alpha`` (the update is scaled by alpha / r), ``dropout``
            on the adapter input, ``target_modules``.

    Raises:
        ConfigError: the model has no body, or a target matches no Linear module of the body.

    References:
        Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models".
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    body = getattr(model, "body", None)
    if not isinstance(body, nn.Module) or not isinstance(getattr(model, "head", None), nn.Module):
        raise ConfigError(f"finetune.lora needs a model with a 'body' and a 'head'; {type(model).__name__} has not")
    if is_lora(model):
        raise ConfigError("finetune.lora: the model already has LoRA adapters")
    linear = [name for name, module in body.named_modules() if _is_linear(module)]
    for target in cfg.target_modules or []:
        if not any(name == target or name.endswith("." + target) for name in linear):
            choices = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear))
            raise ConfigError(
                f"finetune.lora.target_modules: no Linear module named {target!r} in the body; available: {choices}"
            )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules is not None else None,
        bias="none",
        # Conv1D (GPT-2) stores its weight transposed; PEFT must know to adapt it the right way round.
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in body.modules()),
    )
    try:
        with _quiet_peft():
            model.body = get_peft_model(body, peft_cfg)
    except ValueError as exc:  # no default targets for this architecture
        raise ConfigError(f"finetune.lora.target_modules: {first_line(exc)}") from None
    return model


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 keeps its projections in transformers' Conv1D (a transposed Linear), which PEFT adapts too.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def head_in_body(model: nn.Module) -> bool:
    """Whether the head is part of the body (a causal LM's ``lm_head``): LoRA then leaves it frozen and unsaved."""
    body_params = {id(p) for p in model.body.parameters()}
    return all(id(p) in body_params for p in model.head.parameters())


def is_lora(model: nn.Module) -> bool:
    """Whether ``model.body`` is wrapped with PEFT adapters."""
    body = getattr(model, "body", None)
    return body is not None and hasattr(body, "merge_and_unload") and hasattr(body, "peft_config")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the body's weights (``W + (alpha/r)·B·A``) and drop PEFT; returns ``model``.

    The merged model computes the same function with the plain body's
    parameter names (``body.encoder.layer.0.attention.self.query.weight``). The
    body's weights keep ``requires_grad=False`` as PEFT left them.

    Raises:
        ConfigError: the model has no LoRA adapters.
    """
    if not is_lora(model):
        raise ConfigError("merge_lora: the model has no LoRA adapters (finetune.lora was not set)")
    model.body = model.body.merge_and_unload()
    return model


def save_adapter(model: nn.Module, out_dir: Path) -> None:
    """Write the adapters (``adapter_model.safetensors``, ``adapter_config.json``) and ``head.safetensors``
    (unless the head is part of the body, as a causal LM's ``lm_head``: then LoRA never trained it).

    The directory is written under a temporary name and renamed into place, so
    a run killed while saving leaves the previous one intact.

    Raises:
        ConfigError: the model has no LoRA adapters.
    """
    if not is_lora(model):
        raise ConfigError("save_adapter: the model has no LoRA adapters (finetune.lora was not set)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.body.save_pretrained(str(tmp), safe_serialization=True)
    if not head_in_body(model):
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE))
    for file in tmp.iterdir():
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_adapter(model: nn.Module, adapter_dir: Path, *, trainable: bool = False) -> nn.Module:
    """Put the adapters and head saved by :func:`save_adapter` on a plain model of the same body; returns ``model``.

    Args:
        model: A freshly built model (no adapters) whose body is the one the adapters were trained on.
        adapter_dir: The directory :func:`save_adapter` wrote.
        trainable: Keep the adapters trainable (to continue training) instead of frozen for inference.

    Raises:
        CheckpointError: the directory or a file in it is missing or does not fit the model.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    separate_head = not head_in_body(model)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *([HEAD_FILE] if separate_head else [])):
        if not (adapter_dir / file).is_file():
            raise CheckpointError(f"{adapter_dir}: no {file}; not a directory written by save_adapter")
    if is_lora(model):
        raise CheckpointError(f"{adapter_dir}: the model already has LoRA adapters; load into a fresh model")
    if separate_head:
        try:
            head = load_file(str(adapter_dir / HEAD_FILE))
            model.head.load_state_dict(head)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{adapter_dir / HEAD_FILE}: does not fit the model's head ({first_line(exc)})"
            ) from None
    try:
        with _quiet_peft():
            model.body = PeftModel.from_pretrained(model.body, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise CheckpointError(f"{adapter_dir}: adapters do not fit the model ({first_line(exc)})") from None
    return model


def count_trainable(model: nn.Module) -> int:
    """Elements of the parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        # PEFT still asks the body through transformers' deprecated is_gradient_checkpointing alias.
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
