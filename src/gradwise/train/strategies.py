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
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from gradwise.config import RunConfig
from gradwise.data import Dataset
from gradwise.errors import ConfigError
from gradwise.tasks import Task

ENTRY_POINT_GROUP = "gradwise.strategies"


@dataclass(frozen=True)
class RunStrategy:
    """What one config section adds to a run; each part is optional.

    Attributes:
        section: The config section that switches the strategy on (``prune``, ``qat``, ``distill``).
        prepare_model: Changes the model in place before the optimizer is built (fake quantization).
        attach_data: Returns the task and data to train on (distillation joins the teacher's outputs).
        after_step: Builds, from ``(model, cfg, total_steps)``, an object with ``after_step(step)``,
            ``state_dict()`` and ``load_state_dict()``, called after every optimizer step and
            checkpointed with the run (gradual pruning).
    """

    section: str
    prepare_model: Callable[[RunConfig, nn.Module], None] | None = None
    attach_data: Callable[[RunConfig, Task, Dataset, nn.Module, torch.device], tuple[Task, Dataset]] | None = None
    after_step: Callable[[nn.Module, RunConfig, int], Any] | None = None


def active_strategies(cfg: RunConfig, sections: tuple[str, ...] = ("distill", "prune", "qat")) -> list[RunStrategy]:
    """The registered strategies of the sections ``cfg`` sets, in ``sections`` order."""
    return [strategy(section) for section in sections if getattr(cfg, section, None) is not None]


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
