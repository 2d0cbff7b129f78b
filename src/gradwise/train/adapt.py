"""Turning a freshly built model into the one a run trains, through the run's strategies.

Structural changes that evaluation must repeat (LoRA adapters) happen in :func:`adapt_structure`;
what only training needs (weights from another run, freezing, layer-wise LR decay, NEFTune, fake
quantization, compilation) in :func:`prepare_for_training`. The strategies themselves live above
this layer (finetune/, compress/) and are found by their config section (see strategies.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from gradwise.config import OptimSection, RunConfig
from gradwise.train.hooks import Hook
from gradwise.train.strategies import active_strategies


def model_dir(cfg: RunConfig) -> Path | None:
    """The pretrained model's directory when the model has one (it also holds the tokenizer)."""
    return cfg.model.pretrained_dir()


def adapt_structure(cfg: RunConfig, model: nn.Module, *, training: bool) -> nn.Module:
    """The model after each active strategy's structural change (``model.init_from`` weights, LoRA)."""
    for strategy in active_strategies(cfg):
        if strategy.adapt_model is not None:
            model = strategy.adapt_model(cfg, model, training)
    return model


@dataclass
class TrainingAdaptation:
    """What the run keeps from :func:`prepare_for_training`: the optimizer section to build and the hooks."""

    optim: OptimSection
    hooks: list[Hook] = field(default_factory=list)


def prepare_for_training(cfg: RunConfig, model: nn.Module) -> TrainingAdaptation:
    """Every active strategy's preparation (before the optimizer is built), then ``model.compile``."""
    adaptation = TrainingAdaptation(optim=cfg.optim)
    for strategy in active_strategies(cfg):
        if strategy.prepare_model is None:
            continue
        prepared = strategy.prepare_model(cfg, model)
        if prepared is not None:
            adaptation.optim = prepared.optim or adaptation.optim
            adaptation.hooks.extend(prepared.hooks)
    if cfg.model.compile in (True, "model"):  # "step" compiles in the loop (gradwise.train.compiled)
        model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    return adaptation
