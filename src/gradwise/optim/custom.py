"""The optimizers gradwise needs that torch.optim does not provide.

Two update rules (:class:`EMAMomentum`, :class:`AdaptiveLR`), plain
:class:`torch.optim.Optimizer` subclasses whose state goes through torch's own
``state_dict`` / ``load_state_dict``; and :class:`MuonWithAdamW`, which runs
torch's Muon and AdamW side by side as the Muon authors prescribe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradwise.optim.partitioned import PartitionedOptimizer

Groups = list[dict[str, Any]]


# Written here because no maintained library (torch.optim, timm, torch-optimizer) offers this rule.
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

    References:
        Polyak 1964, "Some methods of speeding up the convergence of iteration methods" (heavy ball);
        the EMA form is the first moment of Kingma & Ba 2015, "Adam", without bias correction.
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


# Written here because no maintained library offers this rule (AdaGrad-Norm divides by the square root).
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

    # Kept in the param groups but state, not a hyperparameter: a run branched with a new lr keeps it.
    stateful_group_keys = ("grad_sq_sum",)

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
        squares = sum(g.detach().double().pow(2).sum() for g in grads)
        # Over FSDP-sharded gradients each rank holds a partial sum; the rule needs the whole model's norm.
        sq_norm = float(squares.full_tensor() if hasattr(squares, "full_tensor") else squares)
        total = float(self.param_groups[0]["grad_sq_sum"]) + sq_norm
        for group in self.param_groups:
            group["grad_sq_sum"] = total
            step_size = float(group["lr"]) / (1.0 + float(group["beta"]) * total)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-step_size)
        return loss


# torch ships Muon but no pairing with AdamW; the authors' MuonWithAuxAdam is a git-only package with its own Muon.
class MuonWithAdamW(PartitionedOptimizer):
    """torch.optim.Muon on hidden weight matrices and torch.optim.AdamW on every other parameter.

    torch's Muon accepts only 2-D parameters, and its docs (like the Muon
    authors) say the rest — biases, gains, embeddings, the input layer and the
    classifier head — belong to AdamW (see :func:`muon_hidden_weights`).
    The state dict is ``{"muon": ..., "adamw": ...}`` (see :class:`PartitionedOptimizer`).

    Args:
        groups: Parameter groups, each with ``use_muon`` True (all params
            exactly 2-D) or False.
        lr: Learning rate of both parts.
        muon_kwargs: Further arguments of torch.optim.Muon.
        adamw_kwargs: Further arguments of torch.optim.AdamW.

    References:
        Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
        Liu et al. 2025, "Muon is Scalable for LLM Training" (arXiv:2502.16982).
    """

    def __init__(self, groups: Groups, lr: float, muon_kwargs: dict[str, Any], adamw_kwargs: dict[str, Any]) -> None:
        muon_groups = [g for g in groups if g["use_muon"]]
        adamw_groups = [g for g in groups if not g["use_muon"]]
        self.muon = torch.optim.Muon(muon_groups, lr=lr, **muon_kwargs) if muon_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, **adamw_kwargs) if adamw_groups else None
        super().__init__({"muon": self.muon, "adamw": self.adamw})


def muon_hidden_weights(model: nn.Module) -> set[int]:
    """``id()`` of the parameters Muon should own: the exactly-2-D weights of hidden layers.

    torch's docs call Muon "an optimizer for 2D parameters of neural network
    hidden layers", and its authors keep the input and output layers on AdamW
    even though they are 2-D. So the weights of the first and the last layer
    (the first/last ``nn.Linear``, ``nn.Conv*`` or embedding module registered
    in the model) and every embedding table are excluded. Conv filters are
    4-D, which torch's Muon refuses, so they stay on AdamW as well.
    """
    embeddings = nn.Embedding | nn.EmbeddingBag
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd | embeddings)]
    excluded = {id(p) for m in layers if isinstance(m, embeddings) for p in m.parameters()}
    for outer in layers[:1] + layers[-1:]:
        excluded.update(id(p) for p in outer.parameters())
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in excluded}


def split_for_muon(groups: Groups, is_muon: Callable[[torch.Tensor], bool]) -> Groups:
    """Split each group into a Muon part and an AdamW part (``use_muon``), dropping empty parts."""
    out: Groups = []
    for group in groups:
        names = group.get("param_names", [None] * len(group["params"]))
        for use_muon in (True, False):
            picked = [(p, n) for p, n in zip(group["params"], names, strict=True) if is_muon(p) == use_muon]
            if not picked:
                continue
            part = {**group, "params": [p for p, _ in picked], "use_muon": use_muon}
            if "param_names" in group:
                part["param_names"] = [n for _, n in picked]
            part["group_name"] = f"{group.get('group_name', 'group')} {'muon' if use_muon else 'adamw'}"
            out.append(part)
    return out
