"""Training strategies that live above the loop plug into a run by config section.

The training layer must not import the packages that build on it (compress/
uses the loop to prune, quantize-aware train and distill). A strategy
package declares a :class:`RunStrategy` and registers it under the entry-point
group ``gradwise.strategies`` in its ``pyproject.toml``; the run builder loads
the strategy of each config section that is set. Third-party packages add
strategies the same way, without touching gradwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn

from gradwise.config import OptimSection, RunConfig
from gradwise.data import Dataset
from gradwise.errors import ConfigError
from gradwise.tasks import Task
from gradwise.train.hooks import Hook

ENTRY_POINT_GROUP = "gradwise.strategies"


@dataclass(frozen=True)
class Prepared:
    """What a strategy's preparation hands the run: another optimizer section (None: keep it) and hooks."""

    optim: OptimSection | None = None
    hooks: list[Hook] = field(default_factory=list)


@dataclass(frozen=True)
class RunStrategy:
    """What one config section adds to a run; each part is optional.

    Attributes:
        section: The config section that switches the strategy on (``finetune``, ``prune``, ``qat``, ``distill``).
        active: Whether ``cfg`` uses the strategy; default: its section is set (not None).
        adapt_model: ``(cfg, model, training) -> model``: a structural change evaluation repeats too
            (LoRA adapters; with ``training``, weights from another run).
        prepare_model: Changes the model in place before the optimizer is built (freezing, fake
            quantization) and may return a :class:`Prepared` with another optimizer section and hooks.
        attach_data: Returns the task and data to train on (distillation joins the teacher's outputs).
        hooks: Builds, from ``(model, cfg, total_steps)``, the strategy's :class:`Hook` objects once the
            run's length is known (gradual pruning); their state is checkpointed by ``state_key``.
        finished: ``(cfg, model, run_dir)`` on rank 0 after the summary is written, with the final
            weights loaded (fine-tuning saves the LoRA adapter alone).
    """

    section: str
    active: Callable[[RunConfig], bool] | None = None
    adapt_model: Callable[[RunConfig, nn.Module, bool], nn.Module] | None = None
    prepare_model: Callable[[RunConfig, nn.Module], Prepared | None] | None = None
    attach_data: Callable[[RunConfig, Task, Dataset, nn.Module, torch.device], tuple[Task, Dataset]] | None = None
    hooks: Callable[[nn.Module, RunConfig, int], list[Hook]] | None = None
    finished: Callable[[RunConfig, nn.Module, Path], None] | None = None

    def is_active(self, cfg: RunConfig) -> bool:
        return self.active(cfg) if self.active is not None else getattr(cfg, self.section, None) is not None


# The sections strategies plug in by, in the order they apply (fine-tuning's transfer and adapters first).
STRATEGY_SECTIONS = ("finetune", "distill", "prune", "qat")


# Strategies added in-process (a plugin module or a test calls register_strategy): no config section of their own.
_REGISTERED: dict[str, RunStrategy] = {}


def register_strategy(added: RunStrategy) -> RunStrategy:
    """Add a strategy that applies wherever its ``active(cfg)`` says (one module, no edit elsewhere)."""
    if added.active is None:
        raise ValueError(f"strategy {added.section!r}: a registered strategy needs active(cfg)")
    if added.section in STRATEGY_SECTIONS or added.section in _REGISTERED:
        raise ValueError(f"strategy {added.section!r} is registered already")
    _REGISTERED[added.section] = added
    return added


def unregister_strategy(section: str) -> None:
    _REGISTERED.pop(section, None)


def active_strategies(cfg: RunConfig, sections: tuple[str, ...] = STRATEGY_SECTIONS) -> list[RunStrategy]:
    """The strategies ``cfg`` uses: the config sections' in ``sections`` order, then the registered ones."""
    # A section-switched strategy loads only when its section is set (compress/ is slow to import).
    found = [strategy(s) for s in sections if s == "finetune" or getattr(cfg, s, None) is not None]
    return [s for s in (*found, *_REGISTERED.values()) if s.is_active(cfg)]


@cache
def strategy(section: str) -> RunStrategy:
    """The strategy registered for ``section``.

    Raises:
        ConfigError: no installed package registers one (an install without its entry points).
    """
    found = entry_points(group=ENTRY_POINT_GROUP, name=section)
    if not found:
        raise ConfigError(
            f"{section}: no installed strategy handles this section (entry point group {ENTRY_POINT_GROUP!r}); "
            "reinstall gradwise (pip install -e .) so its strategies are registered"
        )
    loaded = next(iter(found)).load()
    if not isinstance(loaded, RunStrategy) or loaded.section != section:
        raise ConfigError(f"{section}: the entry point {next(iter(found)).value} is not a RunStrategy for it")
    return loaded
