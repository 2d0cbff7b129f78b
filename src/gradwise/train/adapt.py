"""Turning a freshly built model into the one a run trains: transfer, adapters, freezing, hooks.

Structural changes that evaluation must repeat (LoRA adapters) happen in
:func:`adapt_structure`; what only training needs (weights from another run,
frozen parameters, gradual unfreezing, layer-wise LR decay, NEFTune noise,
compilation) happens in :func:`prepare_for_training`. Both are no-ops for a
run without a ``finetune`` section or ``model.init_from``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gradwise.config import OptimConfig, RunConfig
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.train.strategies import active_strategies


def model_dir(cfg: RunConfig) -> Path | None:
    """The pretrained model's directory (it also holds the tokenizer), for ``hf_encoder``."""
    if cfg.model.name != "hf_encoder":
        return None
    from gradwise.models.hf_encoder import resolve_model_dir

    return resolve_model_dir(cfg.model)


def adapt_structure(cfg: RunConfig, model: nn.Module, *, training: bool) -> nn.Module:
    """Weights from ``model.init_from`` (training only, before adapters wrap the body), then LoRA."""
    if training and cfg.model.init_from is not None:
        from gradwise.finetune.transfer import load_from_run

        report = load_from_run(model, cfg.model.init_from)
        notes = []
        if report.skipped_head:
            notes.append(f"new head (skipped {', '.join(report.skipped_head)})")
        if report.missing:
            notes.append(f"not in the run, left as initialised: {', '.join(report.missing[:8])}")
        if report.unexpected:
            notes.append(f"in the run but not in this model: {', '.join(report.unexpected[:8])}")
        if notes:
            warnings.warn(f"model.init_from {cfg.model.init_from}: " + "; ".join(notes), GradwiseWarning, stacklevel=2)
    if cfg.finetune.lora is not None:
        from gradwise.finetune.lora import apply_lora

        model = apply_lora(model, cfg.finetune.lora)
    return model


@dataclass
class TrainingAdaptation:
    """What the loop keeps from :func:`prepare_for_training`."""

    optim: OptimConfig
    unfreezer: Any | None  # gradwise.finetune.freezing.GradualUnfreezer; imported lazily with transformers


def prepare_for_training(cfg: RunConfig, model: nn.Module) -> TrainingAdaptation:
    """Freeze, set up gradual unfreezing, add layer-wise LR factors and NEFTune, compile.

    Call before building the optimizer: the returned ``optim`` section carries
    the layer-wise LR multipliers, and every parameter that will train at some
    point has ``requires_grad`` set, so the optimizer covers it from the start.
    """
    ft = cfg.finetune
    optim = cfg.optim
    unfreezer = None
    freezes = ft.head_only or ft.freeze_embeddings or ft.freeze_layers or ft.freeze
    if freezes or ft.unfreeze_every_epochs or ft.layer_lr_decay or ft.neftune_alpha:
        from gradwise.models.transformer import TransformerModel

        needs_transformer = ft.freeze_embeddings or ft.freeze_layers or ft.unfreeze_every_epochs or ft.layer_lr_decay
        if needs_transformer and not isinstance(model, TransformerModel):
            raise ConfigError(
                f"finetune: embeddings/layers/unfreezing/layer_lr_decay need a transformer; "
                f"model.name is {cfg.model.name!r}"
            )
    if freezes:
        from gradwise.finetune.freezing import apply_freezing

        apply_freezing(model, ft)
    if ft.unfreeze_every_epochs:
        from gradwise.finetune.freezing import GradualUnfreezer

        unfreezer = GradualUnfreezer(model, ft.unfreeze_every_epochs)
        unfreezer.unfreeze_all()  # the optimizer is built over every stage; the loop then applies epoch 0
    if ft.layer_lr_decay is not None:
        from gradwise.finetune.llrd import layer_lr_multipliers

        # The user's own patterns come first: the first matching pattern wins.
        computed = layer_lr_multipliers(model, ft.layer_lr_decay)
        merged = {**optim.lr_multipliers, **{k: v for k, v in computed.items() if k not in optim.lr_multipliers}}
        optim = optim.model_copy(update={"lr_multipliers": merged})
    if ft.neftune_alpha > 0:
        from gradwise.finetune.neftune import attach_neftune

        attach_neftune(model, ft.neftune_alpha)
    for strategy in active_strategies(cfg):
        if strategy.prepare_model is not None:
            # QAT: fake quantization in the forward; weights stay fp32 and keep their names.
            strategy.prepare_model(cfg, model)
    if cfg.model.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    return TrainingAdaptation(optim=optim, unfreezer=unfreezer)
