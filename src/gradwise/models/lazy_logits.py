"""A language model's training output before its output projection: the logits, not yet computed.

In training, a model set up for chunked cross-entropy returns :class:`LazyLogits`
(the final hidden states and the head's weight) instead of the ``(B, L, V)``
logits; the language-modeling task computes the loss from it chunk by chunk
(:mod:`gradwise.tasks.chunked_loss`) and the full logits never exist. Anything
else that needs real logits calls :meth:`LazyLogits.materialize`.

:func:`chunking_applies` decides, at each forward, whether the lazy output can be
used: only while training with gradients on, through a plain ``nn.Linear`` head
without hooks (LoRA, QAT or pruning wrappers change what the head computes), and
not under FSDP2, whose sharded weights are gathered only inside the forward.

References:
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models";
    Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training".
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator
from torch import Tensor, nn


def _from_yaml_bool(value: object) -> object:
    # YAML 1.1 reads a bare on/off (and yes/no) as a bool: `model.chunked_loss=off` arrives as False.
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# ``model.chunked_loss``: auto, on or off (true/false too).
ChunkedLoss = Annotated[Literal["auto", "on", "off"], BeforeValidator(_from_yaml_bool)]

# ``chunked_loss: auto`` turns on from this vocabulary size. Per token the full logits cost about
# 12·V bytes in training (float32 logits, their softmax and gradient) against roughly 34·H bytes of
# activations per layer (Korthikanti et al. 2022): at V = 8192 the head already outweighs a few layers
# of a small model, while below it (character and small BPE vocabularies) the saving is small and the
# chunk loop's own costs (a host sync to find the target rows, per-chunk kernel launches) are not worth it.
AUTO_MIN_VOCAB = 8192


@dataclasses.dataclass(frozen=True)
class LazyLogits:
    """``logits = hidden @ head_weight.T + head_bias``, kept as its factors.

    Attributes:
        hidden: ``(*lead, H)`` final hidden states (after the last norm).
        head_weight: ``(V, H)`` output projection (the token embedding when tied).
        head_bias: ``(V,)`` or None.
        compute_dtype: The dtype the head would have multiplied in (the autocast dtype during the forward).
        dtype: The dtype the loss is computed in; :meth:`to` sets it, as the loop's ``outputs.to(dtype)``.
    """

    hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None
    compute_dtype: torch.dtype
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have, ``(*lead, V)``."""
        return torch.Size((*self.hidden.shape[:-1], self.head_weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def to(self, dtype: torch.dtype) -> LazyLogits:
        """The same factors with the loss computed in ``dtype`` (nothing is copied)."""
        return dataclasses.replace(self, dtype=dtype)

    def materialize(self) -> Tensor:
        """The full logits ``(*lead, V)`` in :attr:`dtype` (for callers that need them; costs the memory saved)."""
        w = self.head_weight.to(self.compute_dtype)
        bias = None if self.head_bias is None else self.head_bias.to(self.compute_dtype)
        return F.linear(self.hidden.to(self.compute_dtype), w, bias).to(self.dtype)


def head_is_plain(head: nn.Module) -> bool:
    """Whether ``head`` computes exactly ``F.linear(x, weight, bias)``: a bare ``nn.Linear`` with no hooks."""
    hooks = head._forward_hooks or head._forward_pre_hooks
    return type(head) is nn.Linear and not hooks


def use_chunked_loss(setting: ChunkedLoss, vocab_size: int) -> bool:
    """Whether ``model.chunked_loss`` turns chunking on for a head of ``vocab_size`` outputs.

    ``auto`` turns it on from :data:`AUTO_MIN_VOCAB` tokens.
    """
    return setting == "on" or (setting == "auto" and vocab_size >= AUTO_MIN_VOCAB)


def chunking_applies(model: nn.Module, head: nn.Module) -> bool:
    """Whether this forward of ``model`` may return :class:`LazyLogits` through ``head``.

    Not in eval mode or without gradients (evaluation, generation, export and compression read real
    logits), not through a wrapped head, and not under FSDP2: there the head's weight is a shard
    outside the forward, and the loss is computed after it.
    """
    if not (model.training and torch.is_grad_enabled() and head_is_plain(head)):
        return False
    return not _fully_sharded(model)


def lazy_logits(hidden: Tensor, head: nn.Linear) -> LazyLogits:
    """The head's output on ``hidden`` as :class:`LazyLogits`, recording the autocast dtype now in force."""
    device = hidden.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return LazyLogits(hidden, head.weight, head.bias, compute)


def _fully_sharded(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
