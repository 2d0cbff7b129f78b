"""Start a model from the best weights of one of our own runs (``model.init_from``): same body, new head."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from gradwise.errors import CheckpointError
from gradwise.store.checkpoint import MODEL_FILE, load_model_state, resolve_checkpoint
from gradwise.store.rundir import CONFIG_FILE

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class TransferReport:
    """What :func:`load_from_run` did, key by key.

    Attributes:
        source: The weights file read.
        loaded: Keys copied from the run into the model.
        skipped_head: Head keys whose shape differs (a new task): the model keeps its fresh head.
        missing: Model keys the run does not have (they keep their initial values).
        unexpected: Run keys the model does not have (ignored).
    """

    source: Path
    loaded: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the console: counts, and the first few names of each non-empty list."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        for label, keys in (
            ("new head", self.skipped_head),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
        ):
            if keys:
                shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def load_from_run(model: nn.Module, run_dir: Path) -> TransferReport:
    """Copy the weights of ``run_dir``'s best checkpoint into ``model`` wherever names and shapes agree.

    Head keys (``head.*``) whose shape differs are skipped, so a model with a
    new number of classes keeps its freshly initialized head. Keys only one side
    has are reported, not refused: the caller prints them. A run trained with
    LoRA loads into a plain model with its adapters merged (scaling alpha / r
    from the run's config.yaml); into a model with the same LoRA settings it
    loads as saved, adapters included.

    Args:
        model: The freshly built model (any architecture: transformer, MLP, CNN).
        run_dir: A run directory holding ``checkpoints/best`` (``checkpoints/last`` if the run kept no best).

    Raises:
        CheckpointError: the run or its weights are missing or corrupt, a body key has a different
            shape (another architecture or size), or nothing at all matches.
    """
    run_dir = Path(run_dir)
    try:
        ckpt = resolve_checkpoint(run_dir, "best")
    except CheckpointError:
        ckpt = resolve_checkpoint(run_dir, "last")  # a run with checkpoint.keep_best false
    state = load_model_state(ckpt)
    own = model.state_dict()
    if _has_lora(state) and not _has_lora(own):
        state = fold_lora_state(state, _lora_scaling(run_dir))
    report = TransferReport(source=ckpt / MODEL_FILE)
    take = {}
    for key, own_tensor in own.items():  # the model's order, so the report reads top to bottom
        tensor = state.get(key)
        if tensor is None:
            report.missing.append(key)
        elif own_tensor.shape != tensor.shape:
            if not key.startswith(HEAD_PREFIX):
                raise CheckpointError(
                    f"{ckpt / MODEL_FILE}: {key} has shape {tuple(tensor.shape)} in the run but "
                    f"{tuple(own_tensor.shape)} in this model (model.init_from must have the same body)"
                )
            report.skipped_head.append(key)
        else:
            take[key] = tensor
            report.loaded.append(key)
    report.unexpected.extend(key for key in state if key not in own)
    if not take:
        raise CheckpointError(
            f"{ckpt / MODEL_FILE}: no weight fits this model (the run's keys look like "
            f"{', '.join(list(state)[:3])}; the model's like {', '.join(list(own)[:3])})"
        )
    model.load_state_dict(take, strict=False)
    return report


def fold_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's weights as the plain model's: ``W + scaling·B·A``, PEFT's name parts dropped.

    ``body.base_model.model.encoder.layer.0.attention.self.query.base_layer.weight`` plus its
    ``lora_A``/``lora_B`` becomes ``body.encoder.layer.0.attention.self.query.weight``; this is
    what :func:`gradwise.finetune.lora.merge_lora` computes, done on a saved state.
    """
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _LORA_PART.search(key) is None:
            plain[key.replace(_PEFT_PREFIX, "", 1).replace(".base_layer.", ".")] = tensor
    for key, a in state.items():
        match = _LORA_A.search(key)
        if match is None:
            continue
        stem = key[: match.start()]
        b = state[f"{stem}.lora_B.{match.group(1)}.weight"]
        weight = stem.replace(_PEFT_PREFIX, "", 1) + ".weight"
        delta = b.to(torch.float32) @ a.to(torch.float32)  # (out, in), a Linear's layout
        if delta.shape != plain[weight].shape or _is_conv1d_weight(weight):
            delta = delta.T  # GPT-2's Conv1D keeps its weight as (in, out) (PEFT's fan_in_fan_out)
        plain[weight] = plain[weight] + scaling * delta.to(plain[weight].dtype)
    return plain


def _is_conv1d_weight(name: str) -> bool:
    # transformers' GPT-2 family names its Conv1D projections c_attn, c_proj and c_fc.
    return any(f".{part}.weight" in f".{name}" for part in ("c_attn", "c_proj", "c_fc"))


_PEFT_PREFIX = "base_model.model."
_LORA_PART = re.compile(r"\.lora_(A|B|dropout|embedding_A|embedding_B|magnitude_vector)\.")
_LORA_A = re.compile(r"\.lora_A\.([^.]+)\.weight$")


def _has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(_LORA_A.search(key) for key in state)


def _lora_scaling(run_dir: Path) -> float:
    """alpha / r of the run's ``finetune.lora`` (PEFT's scaling), read from its resolved config.yaml."""
    file = run_dir / CONFIG_FILE
    try:
        lora = (yaml.safe_load(file.read_text()) or {})["finetune"]["lora"]
        return float(lora["alpha"]) / float(lora["r"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(
            f"{file}: the run trained LoRA adapters, but its finetune.lora alpha and r cannot be read "
            f"({type(exc).__name__}: {exc})"
        ) from None
