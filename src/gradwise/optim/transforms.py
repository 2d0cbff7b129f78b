"""The gradient chain: what happens to the gradients between ``backward()`` and ``optimizer.step()``.

Each transform acts on the gradients of the optimizer's parameters in a declared order —
penalty gradients, clipping, noise, decoupled weight decay — so the noise added is exactly the
scheduled noise (it comes after clipping) and decay acts on the weights the update then moves.
This is optax's ``chain`` of gradient transformations, over torch's in-place gradients; a
transform with state names it by ``state_key`` and the checkpoint keeps it like a hook's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch

from gradwise.optim.noise import GradientNoise
from gradwise.optim.penalties import weight_penalty
from gradwise.optim.weight_decay import apply_decoupled_weight_decay


class GradientTransform(Protocol):
    """One link of the chain: changes the gradients (or weights) in place; may report 0-d tensors."""

    state_key: ClassVar[str | None]

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]: ...


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class PenaltyGradient:
    """Adds the gradient of l1·Σ|w| + (l2/2)·Σw² (groups marked ``penalize``) to the gradients."""

    state_key: ClassVar[str | None] = None

    def __init__(self, l1: float, l2: float) -> None:
        self.l1, self.l2 = l1, l2

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
        penalty = weight_penalty(optimizer, self.l1, self.l2)
        if penalty is not None:
            penalty.backward()
        return {}


class ClipGradNorm:
    """Rescales the gradients so their global L2 norm is at most ``max_norm``; reports the norm before.

    References:
        Pascanu et al. 2013, "On the difficulty of training recurrent neural networks".
    """

    state_key: ClassVar[str | None] = None

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
        norm = torch.nn.utils.clip_grad_norm_(_parameters(optimizer), self.max_norm)
        # Over sharded gradients the norm is a DTensor: its full value is the norm of the whole model.
        # A 0-d tensor, not a float: reading it would make the host wait for the device every step;
        # the loop's ledger reads it with the step's loss when it settles a window of steps.
        return {"grad_norm": (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()}


class AddGradientNoise:
    """Annealed Gaussian noise of variance η/(1+t)^γ at 0-based step t (see :class:`GradientNoise`)."""

    state_key: ClassVar[str | None] = "noise"

    def __init__(self, noise: GradientNoise) -> None:
        self.noise = noise

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
        self.noise.add_(_parameters(optimizer), step)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise.load_state_dict(state)


class DecoupledWeightDecay:
    """θ ← θ − η·λ·θ beside the update, for optimizers without their own (Loshchilov & Hutter 2019)."""

    state_key: ClassVar[str | None] = None

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
        apply_decoupled_weight_decay(optimizer)
        return {}


class GradientChain:
    """The transforms in order; :meth:`apply` runs them all and merges what they report."""

    def __init__(self, transforms: Sequence[GradientTransform]) -> None:
        self.transforms = list(transforms)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, torch.Tensor]:
        info: dict[str, torch.Tensor] = {}
        for transform in self.transforms:
            info.update(transform.apply(optimizer, step))
        return info


def gradient_chain(l1: float, l2: float, clip_grad_norm: float | None, noise: GradientNoise | None) -> GradientChain:
    """The chain of a run's ``regularize`` and ``noise`` settings, in the order that makes each exact."""
    transforms: list[GradientTransform] = []
    if l1 or l2:
        transforms.append(PenaltyGradient(l1, l2))
    if clip_grad_norm is not None:
        transforms.append(ClipGradNorm(clip_grad_norm))
    if noise is not None:  # after clipping, so the injected variance is exactly the scheduled one
        transforms.append(AddGradientNoise(noise))
    transforms.append(DecoupledWeightDecay())
    return GradientChain(transforms)
