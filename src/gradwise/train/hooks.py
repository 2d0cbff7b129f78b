"""The points in a training step where strategies act, and how their state reaches the checkpoint.

A strategy that acts inside training — gradual unfreezing, gradual pruning, anything a plugin
adds — is a :class:`Hook`: it overrides the points it needs, in the order the step reaches them
(see ``_train_step`` in :mod:`gradwise.train.loop`)::

    before_step(step, epoch)        before the batch is taken (unfreezing is a function of the epoch)
    ... forward, backward, the gradient chain (gradwise.optim.transforms), optimizer.step() ...
    after_optimizer_step(steps)     after the update (pruning puts pruned weights back to zero)
    counts_evaluation(steps)        whether this evaluation may become "best" and count for patience

A hook with state names it by ``state_key``; the checkpoint holds ``{state_key: state_dict()}``
for every such hook, and resuming hands each its own back, so a new hook needs no edit to the
checkpoint code. (Lightning's callbacks keep state by key the same way; its 36 hook points are
more than a training step has.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class Hook:
    """A strategy acting at named points of the step; every point does nothing unless overridden.

    Attributes:
        state_key: The key of this hook's state in a checkpoint; None for a hook without state.
        changes_trainable: True when the hook freezes or unfreezes parameters during the run
            (DistributedDataParallel must then tolerate parameters without gradients).
    """

    state_key: ClassVar[str | None] = None
    changes_trainable: ClassVar[bool] = False

    def before_step(self, step: int, epoch: int) -> None:
        """Before optimizer step ``step`` (0-based) takes its batch, in epoch ``epoch``."""

    def after_optimizer_step(self, steps: int) -> None:
        """After ``optimizer.step()``; ``steps`` optimizer steps are done."""

    def counts_evaluation(self, steps: int) -> bool:
        """Whether an evaluation after ``steps`` steps may become the best and count for patience."""
        return True

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def hook_states(hooks: Sequence[Any]) -> dict[str, Any]:
    """``{state_key: state}`` of every stateful hook or transform, for the checkpoint."""
    states: dict[str, Any] = {}
    for hook in hooks:
        key = getattr(hook, "state_key", None)
        if key is None:
            continue
        if key in states:
            raise ValueError(f"two hooks keep their state under {key!r}; each needs its own state_key")
        states[key] = hook.state_dict()
    return states


def load_hook_states(hooks: Sequence[Any], state: dict[str, Any]) -> None:
    """Hand each stateful hook its state from a checkpoint; a hook the checkpoint predates starts fresh."""
    for hook in hooks:
        key = getattr(hook, "state_key", None)
        if key is not None and state.get(key) is not None:
            hook.load_state_dict(state[key])
