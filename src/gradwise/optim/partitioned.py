"""One optimizer made of several, each over its own part of the parameters.

A model may need more than one update rule: Muon on hidden weight matrices and AdamW on the
rest (:class:`~gradwise.optim.custom.MuonWithAdamW`), or SparseAdam on embeddings with sparse
gradients and the configured optimizer on the dense rest (:func:`split_sparse`). The loop sees
one optimizer: ``param_groups`` is the union of the parts' group dicts (setting ``group["lr"]``
reaches the part that owns the group), ``step``/``zero_grad`` reach every part, and the state
dict is keyed by part name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Groups = list[dict[str, Any]]


class PartitionedOptimizer(torch.optim.Optimizer):
    """Several torch optimizers stepped as one; a part may be None when it owns no parameter.

    ``state`` on this object is empty; the state lives in the parts and in :meth:`state_dict`
    (``{part name: that optimizer's state_dict or None}``).
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer | None]) -> None:
        self.parts = parts
        super().__init__(self._inner_groups(), {})

    @property
    def inner_optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The torch optimizers that hold the state (what torch.distributed.checkpoint's state-dict API takes)."""
        return tuple(opt for opt in self.parts.values() if opt is not None)

    def _inner_groups(self) -> Groups:
        return [g for opt in self.inner_optimizers for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step every part (the closure, if any, is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.inner_optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter of every part."""
        for opt in self.inner_optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: opt.state_dict() if opt is not None else None for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load every part; ``param_groups`` then holds the parts' new group dicts."""
        for name, opt in self.parts.items():
            saved = state_dict.get(name)
            if (saved is None) != (opt is None):
                problem = "missing" if saved is None else "unexpected"
                raise ValueError(f"optimizer state: the {name} part is {problem} for this model")
            if opt is not None:
                opt.load_state_dict(saved)
        # torch's load_state_dict replaces the group dicts, so the union must be rebuilt.
        self.param_groups[:] = self._inner_groups()


def sparse_gradient_parameters(model: nn.Module) -> set[int]:
    """``id()`` of the parameters whose gradients are sparse: weights of embeddings built with ``sparse=True``."""
    sparse = (m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse)
    return {id(m.weight) for m in sparse}


def split_sparse(groups: Groups, sparse: set[int]) -> tuple[Groups, Groups]:
    """Each group split into its dense and its sparse-gradient parameters (empty parts dropped)."""
    dense_groups: Groups = []
    sparse_groups: Groups = []
    for group in groups:
        names = group.get("param_names", [None] * len(group["params"]))
        for wanted, out in ((False, dense_groups), (True, sparse_groups)):
            picked = [(p, n) for p, n in zip(group["params"], names, strict=True) if (id(p) in sparse) == wanted]
            if not picked:
                continue
            part = {**group, "params": [p for p, _ in picked]}
            if "param_names" in group:
                part["param_names"] = [n for _, n in picked]
            out.append(part)
    return dense_groups, sparse_groups
