"""NEFTune: uniform noise on the token embeddings while training.

In training mode the embedding output ``E`` of shape ``(B, L, d)`` becomes
``E + U(−1, 1) · alpha / sqrt(L · d)``, with ``L`` the (padded) length of the
batch, as in the authors' and Hugging Face's implementations. Evaluation
(``model.eval()``) is untouched. The noise comes from torch's global
generator, which the training loop saves and restores, so a resumed run draws
the same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwise.errors import ConfigError
from gradwise.models.transformer import TransformerModel


def neftune_noise_bound(alpha: float, seq_len: int, dim: int) -> float:
    """The largest absolute noise value NEFTune adds: ``alpha / sqrt(L · d)``."""
    return alpha / math.sqrt(seq_len * dim)


def attach_neftune(model: nn.Module, alpha: float) -> RemovableHandle:
    """Add NEFTune noise to ``model.embeddings()``'s output in training mode; ``handle.remove()`` detaches it.

    Args:
        model: A :class:`TransformerModel` (the hook goes on its token-embedding module).
        alpha: The noise scale (``finetune.neftune_alpha``; the paper uses 5, 10 or 15).

    Raises:
        ConfigError: ``alpha`` is negative or the model is not a transformer.

    References:
        Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning".
    """
    if alpha < 0:
        raise ConfigError(f"finetune.neftune_alpha: got {alpha}; expected a non-negative scale")
    if not isinstance(model, TransformerModel):
        raise ConfigError(f"finetune.neftune_alpha needs a transformer; {type(model).__name__} has no embeddings")

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or alpha == 0:
            return None
        bound = neftune_noise_bound(alpha, output.shape[-2], output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return model.embeddings().register_forward_hook(hook)
