"""Which parameters train: fixed freezing for a whole run, and gradual unfreezing from the top.

A transformer's parameters fall into four parts (:func:`model_parts`):

- ``embeddings``: the token-embedding module's parameters and every other
  parameter registered before the first block (for a Hugging Face encoder that
  is the whole ``body.embeddings`` block: word, position and token-type
  embeddings and their LayerNorm);
- ``blocks``: one list per block, bottom first;
- ``head``: the parameters of ``model.head``;
- ``top``: anything else (e.g. a GPT's final LayerNorm), which trains with the head.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from gradwise.config import FinetuneConfig
from gradwise.errors import ConfigError
from gradwise.models.transformer import TransformerModel


@dataclass(frozen=True)
class ModelParts:
    """Parameter names of a transformer by part, each list in ``named_parameters()`` order."""

    embeddings: list[str]
    blocks: list[list[str]]
    head: list[str]
    top: list[str]


def model_parts(model: nn.Module) -> ModelParts:
    """Split a :class:`TransformerModel`'s parameter names into embeddings, blocks, head and the rest.

    Raises:
        ConfigError: ``model`` is not a transformer (it lacks ``embeddings()``/``blocks()``/``head``).
    """
    if not isinstance(model, TransformerModel):
        raise ConfigError(
            f"finetune: this setting needs a transformer (model.name hf_encoder or gpt); "
            f"{type(model).__name__} has no embeddings/blocks"
        )
    names = {id(p): name for name, p in model.named_parameters()}  # shared tensors keep their first name
    head = _names_of(model.head, names)
    token = set(_names_of(model.embeddings(), names)) - set(head)  # a tied output layer belongs to the head
    blocks = [[n for n in _names_of(block, names) if n not in head] for block in model.blocks()]
    in_blocks = {n for block in blocks for n in block}
    order = list(names.values())
    first_block = min((order.index(n) for n in in_blocks), default=len(order))
    embeddings, top = [], []
    for i, name in enumerate(order):
        if name in in_blocks or name in head:
            continue
        (embeddings if name in token or i < first_block else top).append(name)
    return ModelParts(embeddings=embeddings, blocks=blocks, head=head, top=top)


def apply_freezing(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Freeze (``requires_grad=False``) what stays frozen for the whole run; return the frozen names.

    ``head_only`` freezes everything but the head; ``freeze_embeddings`` the
    embeddings (see the module docstring); ``freeze_layers`` N the bottom N
    blocks; ``freeze`` every parameter matching one of its glob patterns.
    Parameters already frozen (e.g. by LoRA) stay frozen and are listed too.
    ``head_only`` and ``freeze`` also work on non-transformer models (an MLP
    started from another run with ``model.init_from``).

    Raises:
        ConfigError: a pattern matches nothing, ``freeze_layers`` exceeds the
            number of blocks, or nothing would be left to train.
    """
    named = dict(model.named_parameters())
    chosen: set[str] = set()
    if cfg.head_only:
        head = model.head if isinstance(getattr(model, "head", None), nn.Module) else None
        if head is None:
            raise ConfigError(f"finetune.head_only: {type(model).__name__} has no 'head' module")
        keep = {id(p) for p in head.parameters()}
        chosen |= {name for name, p in named.items() if id(p) not in keep}
    if cfg.freeze_embeddings or cfg.freeze_layers:
        parts = model_parts(model)
        if cfg.freeze_embeddings:
            chosen |= set(parts.embeddings)
        if cfg.freeze_layers > len(parts.blocks):
            raise ConfigError(
                f"finetune.freeze_layers: got {cfg.freeze_layers}, but the model has {len(parts.blocks)} layers"
            )
        for block in parts.blocks[: cfg.freeze_layers]:
            chosen |= set(block)
    for pattern in cfg.freeze:
        matched = [name for name in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(
                f"finetune.freeze: pattern {pattern!r} matches no parameter (names look like: {_examples(named)})"
            )
        chosen.update(matched)
    for name in chosen:
        named[name].requires_grad_(False)
    if not any(p.requires_grad for p in named.values()):
        raise ConfigError("finetune: every parameter is frozen, so there is nothing to train")
    return [name for name, p in named.items() if not p.requires_grad]


class GradualUnfreezer:
    """Start with only the head training, then unfreeze one block from the top every ``every_epochs`` epochs.

    During epoch ``e`` (0-based, i.e. after ``e`` completed epochs) the top
    ``k = e // every_epochs`` blocks train; once every block trains, the next
    step (``k = L + 1``) unfreezes the embeddings. The state is a pure function
    of the epoch, so a resumed run calls :meth:`apply` with its epoch and is
    exactly where it was. Parameters that were frozen when the unfreezer was
    built (``apply_freezing``, e.g. ``freeze_layers``) are never unfrozen, and
    parameters outside the embeddings and blocks (the head, a final norm)
    always train.

    Build the optimizer over every parameter that will ever train: call
    :meth:`unfreeze_all` first, then ``build_optimizer``, then
    ``apply(epoch)``. Frozen parameters get no gradient, and torch's optimizers
    (and gradwise's decoupled weight decay, clipping and gradient noise) skip
    parameters whose ``grad`` is None.

    Args:
        model: A :class:`TransformerModel`.
        every_epochs: Epochs between two unfreezing steps (``finetune.unfreeze_every_epochs``).

    References:
        Howard & Ruder 2018, "Universal Language Model Fine-tuning for Text Classification" (ULMFiT).
    """

    def __init__(self, model: nn.Module, every_epochs: int) -> None:
        if every_epochs < 1:
            raise ConfigError(f"finetune.unfreeze_every_epochs: got {every_epochs}; expected at least 1")
        parts = model_parts(model)
        named = dict(model.named_parameters())
        frozen_for_good = {name for name, p in named.items() if not p.requires_grad}
        # Stage s unfreezes stages[s]: the top block first, the embeddings last.
        stages = [*reversed(parts.blocks), parts.embeddings]
        self._stages = [[named[n] for n in stage if n not in frozen_for_good] for stage in stages]
        self.every_epochs = every_epochs
        self.unfrozen = -1
        self.apply(0)

    @property
    def n_stages(self) -> int:
        """Unfreezing steps until everything trains: one per block, then the embeddings."""
        return len(self._stages)

    @property
    def final_epoch(self) -> int:
        """The first epoch at which everything that may train does."""
        return self.n_stages * self.every_epochs

    def stages_at(self, epoch: int) -> int:
        """How many stages (blocks from the top, then the embeddings) train during ``epoch``."""
        return min(max(epoch, 0) // self.every_epochs, self.n_stages)

    def apply(self, epoch: int) -> int:
        """Set ``requires_grad`` for ``epoch`` (completed epochs) and return how many stages train."""
        k = self.stages_at(epoch)
        if k != self.unfrozen:
            for s, params in enumerate(self._stages):
                for p in params:
                    p.requires_grad_(s < k)
            self.unfrozen = k
        return k

    def unfreeze_all(self) -> None:
        """Make every parameter that will ever train trainable (before building the optimizer)."""
        self.apply(self.final_epoch)


def _names_of(module: nn.Module, names: dict[int, str]) -> list[str]:
    return [names[id(p)] for p in module.parameters() if id(p) in names]


def _examples(named: dict[str, nn.Parameter]) -> str:
    keys = list(named)
    picks = [*keys[:2], *keys[len(keys) // 2 : len(keys) // 2 + 1], *keys[-1:]]
    return ", ".join(dict.fromkeys(picks))


def run_frozen_parts_as_at_inference(model: nn.Module) -> list[str]:
    """Keep every child of ``model`` whose parameters are all frozen in eval mode, whatever ``train()`` says.

    A linear probe reads the features of a frozen body; with the body in training mode its dropout
    would make them noisy and different every epoch (and BatchNorm would move its running statistics).
    A forward pre-hook puts such a child in eval mode before each of its forwards, because the loop
    calls ``model.train()`` after every evaluation. Children without parameters (the dropout before
    the head) keep following ``train()``. Returns the names of the children kept in eval mode.
    """
    kept = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.register_forward_pre_hook(_to_eval)
            kept.append(name)
    return kept


def _to_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.eval()
