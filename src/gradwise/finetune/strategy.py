"""Fine-tuning as a run strategy: what ``finetune.*`` and ``model.init_from`` do to a run.

Registered under the entry point ``gradwise.strategies: finetune`` so the training layer never
imports this package. Structural changes that evaluation must repeat (LoRA adapters) happen in
:func:`adapt_model`; what only training needs (weights from another run, frozen parameters,
gradual unfreezing as a hook, layer-wise LR decay, NEFTune noise) in :func:`prepare_model`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from gradwise.config import FinetuneConfig, RunConfig
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.finetune.freezing import GradualUnfreezer
from gradwise.train.hooks import Hook
from gradwise.train.strategies import Prepared, RunStrategy


class UnfreezingHook(Hook):
    """Gradual unfreezing at the start of every step: a pure function of the epoch, so it needs no state."""

    changes_trainable = True

    def __init__(self, unfreezer: GradualUnfreezer) -> None:
        self.unfreezer = unfreezer

    def before_step(self, step: int, epoch: int) -> None:
        self.unfreezer.apply(epoch)


def _active(cfg: RunConfig) -> bool:
    return cfg.finetune != FinetuneConfig() or cfg.model.init_from is not None


def adapt_model(cfg: RunConfig, model: nn.Module, training: bool) -> nn.Module:
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


def prepare_model(cfg: RunConfig, model: nn.Module) -> Prepared:
    """Freeze, set up gradual unfreezing, add layer-wise LR factors and NEFTune.

    Runs before the optimizer is built: the returned ``optim`` section carries the layer-wise LR
    multipliers, and every parameter that will train at some point has ``requires_grad`` set, so
    the optimizer covers it from the start (the unfreezing hook freezes the later stages at step 0).
    """
    ft = cfg.finetune
    optim = cfg.optim
    hooks: list[Hook] = []
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
        if ft.head_only:
            from gradwise.finetune.freezing import run_frozen_parts_as_at_inference

            run_frozen_parts_as_at_inference(model)
    if ft.unfreeze_every_epochs:
        unfreezer = GradualUnfreezer(model, ft.unfreeze_every_epochs)
        unfreezer.unfreeze_all()  # the optimizer is built over every stage; the hook then applies epoch 0
        hooks.append(UnfreezingHook(unfreezer))
    if ft.layer_lr_decay is not None:
        from gradwise.finetune.llrd import layer_lr_multipliers

        # The user's own patterns come first: the first matching pattern wins.
        computed = layer_lr_multipliers(model, ft.layer_lr_decay)
        merged = {**optim.lr_multipliers, **{k: v for k, v in computed.items() if k not in optim.lr_multipliers}}
        optim = optim.model_copy(update={"lr_multipliers": merged})
    if ft.neftune_alpha > 0:
        from gradwise.finetune.neftune import attach_neftune

        attach_neftune(model, ft.neftune_alpha)
    return Prepared(optim=optim, hooks=hooks)


def save_lora_adapter(cfg: RunConfig, model: nn.Module, run_dir: Path) -> None:
    """The run's adapter alone (PEFT format) beside its checkpoints, when it trained one."""
    if cfg.finetune.lora is not None:
        from gradwise.finetune.lora import save_adapter

        save_adapter(model, run_dir / "adapter")


FINETUNE_STRATEGY = RunStrategy(
    section="finetune",
    active=_active,
    adapt_model=adapt_model,
    prepare_model=prepare_model,
    finished=save_lora_adapter,
)
