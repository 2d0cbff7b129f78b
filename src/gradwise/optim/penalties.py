"""Loss penalties added to the training objective.

Decoupled weight decay is not here: it acts on the weights beside the
optimizer update (see :mod:`gradwise.optim.weight_decay`).
"""

from __future__ import annotations

import torch


def weight_penalty(optimizer: torch.optim.Optimizer, l1: float, l2: float) -> torch.Tensor | None:
    """l1·Σ|w| + (l2/2)·Σw² over the parameters of groups marked ``penalize``.

    Halving the L2 term makes its gradient l2·w, the same as torch's coupled
    ``weight_decay`` argument. Biases and norm weights sit in groups with
    ``penalize`` false, so they are exempt. Returns None when both are zero.
    """
    if l1 == 0.0 and l2 == 0.0:
        return None
    params = [p for group in optimizer.param_groups if group.get("penalize", True) for p in group["params"]]
    total = params[0].new_zeros(())
    for p in params:
        if l1:
            total = total + l1 * p.abs().sum()
        if l2:
            total = total + 0.5 * l2 * p.pow(2).sum()
    return total
