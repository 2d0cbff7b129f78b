"""Annealed Gaussian gradient noise.

At step t every gradient gets N(0, σ_t²) added elementwise, with variance
σ_t² = η / (1 + t)^γ. Note that η/(1 + t)^γ is the *variance*: using it as the
standard deviation is a common bug that shrinks the noise quadratically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def noise_std(step: int, eta: float, gamma: float) -> float:
    """The noise standard deviation at step ``step``: sqrt(eta / (1 + step)^gamma).

    References:
        Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep Networks".
    """
    return math.sqrt(eta / (1.0 + step) ** gamma)


class GradientNoise:
    """Adds annealed Gaussian noise to gradients from its own seeded generator.

    Noise is drawn on the CPU (so a run gives the same noise on any device and
    resumes bit-for-bit) in float64 for float64 gradients and float32 otherwise,
    then moved to each gradient's device and dtype.

    Args:
        eta: Variance at step 0 (η); 0 turns the noise off.
        gamma: Annealing exponent (γ, 0.55 in the paper).
        seed: Seed of the generator.

    References:
        Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep Networks".
    """

    def __init__(self, eta: float, gamma: float, seed: int) -> None:
        if eta < 0.0 or gamma < 0.0:
            raise ValueError(f"eta and gamma must be >= 0, got eta={eta}, gamma={gamma}")
        self.eta = eta
        self.gamma = gamma
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def add_(self, params: Iterable[torch.Tensor], step: int) -> None:
        """Add noise of step ``step`` (0-based optimizer step) to every ``p.grad`` that is not None."""
        std = noise_std(step, self.eta, self.gamma)
        if std == 0.0:
            return
        for p in params:
            grad = p.grad
            if grad is None:
                continue
            draw_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
            noise = torch.randn(grad.shape, generator=self.generator, dtype=draw_dtype)
            noise = noise.to(device=grad.device, dtype=grad.dtype)
            if hasattr(grad, "device_mesh"):
                # A sharded (FSDP) gradient: every rank drew the same full noise from the same generator and
                # keeps its own shard of it (no communication), so the run equals a single-process one.
                from torch.distributed.tensor import distribute_tensor

                noise = distribute_tensor(noise, grad.device_mesh, grad.placements, src_data_rank=None)
            grad.add_(noise, alpha=std)

    def state_dict(self) -> dict[str, Any]:
        """The generator state as a uint8 tensor."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator so the next draws continue the saved sequence."""
        self.generator.set_state(state["generator"].to(device="cpu", dtype=torch.uint8).contiguous())
