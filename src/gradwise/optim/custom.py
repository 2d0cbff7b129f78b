"""The two optimizers gradwise needs that torch.optim does not provide.

Both are plain :class:`torch.optim.Optimizer` subclasses, so their state goes
through torch's own ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# Written here because no maintained library (torch.optim, timm, torch-optimizer) offers either rule.


class EMAMomentum(torch.optim.Optimizer):
    """Momentum as an exponential moving average of gradients.

    v ← β·v + (1 − β)·g with v₀ = 0, then θ ← θ − η·v.

    Not ``torch.optim.SGD(momentum=β, dampening=β)``: torch starts its buffer at
    g on the first step instead of (1 − β)·g, so the two differ by a factor
    that only fades as β^t.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate η.
        beta: EMA coefficient β in [0, 1).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta: float = 0.9) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta = float(group["lr"]), float(group["beta"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(beta).add_(p.grad, alpha=1.0 - beta)
                p.add_(buf, alpha=-lr)
        return loss


class AdaptiveLR(torch.optim.Optimizer):
    """Gradient descent whose step size shrinks with the accumulated squared gradient norm.

    α_t = lr / (1 + β·Σ_{i≤t} ‖g_i‖²), θ ← θ − α_t·g_t, where ‖g_i‖² is the squared
    global norm over all gradients of all groups at step i. Each group uses its
    own ``lr`` (so lr multipliers and schedules apply); the sum is shared.

    The running sum is a Python float stored under ``"grad_sq_sum"`` in every
    parameter group (all copies equal). Group dicts are what ``state_dict()``
    saves verbatim, so the sum survives checkpoints in full float64 precision
    even for float32 parameters, and it exists before the first step.

    The closest published rule is AdaGrad-Norm, which divides by the square
    root, η / √(b₀² + Σ‖g_i‖²); this one divides by the sum itself, so for a
    constant gradient the step decays like 1/t instead of 1/√t.

    Args:
        params: Parameters or parameter groups.
        lr: Base step size.
        beta: Weight β ≥ 0 of the accumulated squared norm (0 gives plain gradient descent).

    References:
        Ward, Wu & Bottou 2019, "AdaGrad stepsizes: sharp convergence over nonconvex landscapes" (ICML).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta: float = 1.0) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        super().__init__(params, {"lr": lr, "beta": beta, "grad_sq_sum": 0.0})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        sq_norm = float(sum(g.detach().double().pow(2).sum() for g in grads))
        total = float(self.param_groups[0]["grad_sq_sum"]) + sq_norm
        for group in self.param_groups:
            group["grad_sq_sum"] = total
            step_size = float(group["lr"]) / (1.0 + float(group["beta"]) * total)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-step_size)
        return loss
