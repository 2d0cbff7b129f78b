"""Device choice and mixed precision."""

from __future__ import annotations

import contextlib

import torch

from gradwise.data.batches import to_device
from gradwise.errors import ConfigError

__all__ = ["autocast", "parameter_dtype", "resolve_device", "to_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; asking for a missing accelerator is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: got 'cuda' but no CUDA device is visible to torch; use device=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: got 'mps' but MPS is not available on this machine; use device=cpu or auto")
    return torch.device(name)


def parameter_dtype(precision: str) -> torch.dtype:
    """Weights stay fp32 under bf16 autocast; fp64 is for exact numerical comparisons."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast for the forward pass when asked; a (cheap) no-op otherwise.

    bf16 keeps fp32's exponent range, so unlike fp16 it needs no loss scaling.
    """
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
