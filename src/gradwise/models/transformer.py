"""What fine-tuning needs to know about a transformer model, whatever its origin.

Both the pretrained Hugging Face encoder with a new head and our GPT expose
their embeddings, their blocks in order (bottom to top) and their head, so
freezing, gradual unfreezing, layer-wise LR decay, NEFTune and transfer work
on either without knowing its internals.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TransformerModel(Protocol):
    """A model made of token embeddings, a stack of blocks and a head.

    ``forward(input_ids)`` takes int64 ``(B, L)`` token ids (padding =
    ``pad_token_id``, which the model masks itself) and returns logits:
    ``(B, n_outputs)`` for sequence classification/regression, ``(B, L, V)``
    for language modeling.
    """

    head: nn.Module

    def embeddings(self) -> nn.Module:
        """The token-embedding module (NEFTune adds its noise to this module's output)."""
        ...

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, bottom (closest to the embeddings) first."""
        ...
