"""Next-token cross-entropy from hidden states and the output projection, one chunk of tokens at a time.

A language model's loss usually materializes the logits ``(tokens, vocab)`` in
float32, a copy for the softmax and a gradient of the same size: at vocabulary
50k and 2k tokens that is ~1.2 GB, more than the rest of a small model's
activations. :func:`chunked_cross_entropy_sum` never holds more than one chunk
of logits: each chunk's logits give its loss and, at once, its softmax
gradient, from which the gradients of the hidden states, the weight and the
bias accumulate; then the chunk is freed. The backward pass only scales those
gradients by the upstream one (the loss is a sum).

Forming the gradients in the forward (Liger Kernel's order) rather than
recomputing each chunk's logits in the backward (Cut Cross-Entropy's) saves one
``(chunk, H) @ (H, V)`` product per chunk, ~13% of a CPU step of a 4-layer
GPT-2 at vocabulary 50257 (benchmarks/chunked_ce.py). It costs no peak memory:
the weight's ``(V, H)`` gradient that it holds from the forward to the backward
is allocated anyway as the backward's first step, when the activations, and so
the memory in use, are at their peak.

Models hand the pieces over as an object of the :class:`ProjectedHidden`
protocol (``gradwise.models.lazy_logits.LazyLogits``); tasks and models are
sibling layers, so the task recognizes it by its attributes, not its class.

References:
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (Cut Cross-Entropy);
    Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training" (fused linear cross-entropy);
    Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (label smoothing).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

# About 16M logits per chunk (64 MB in float32): small beside the full (tokens, vocab) tensor at a large
# vocabulary, and still a large enough matrix product to run near full speed on a CPU or a GPU.
CHUNK_ELEMENTS = 1 << 24


@runtime_checkable
class ProjectedHidden(Protocol):
    """What a model returns in place of logits: ``logits = hidden @ head_weight.T + head_bias``, not yet computed.

    ``hidden`` is ``(*lead, H)``, ``head_weight`` ``(V, H)``, ``head_bias`` ``(V,)`` or None;
    ``compute_dtype`` is the dtype the output projection would have multiplied in (bf16 under
    autocast) and ``dtype`` the one the loss is computed in.
    """

    hidden: Tensor
    head_weight: Tensor
    head_bias: Tensor | None
    compute_dtype: torch.dtype
    dtype: torch.dtype

    def materialize(self) -> Tensor:
        """The full logits ``(*lead, V)`` in ``dtype``."""
        ...


def chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk so that a chunk holds about :data:`CHUNK_ELEMENTS` logits."""
    return max(1, CHUNK_ELEMENTS // max(vocab_size, 1))


def chunked_cross_entropy_sum(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compute_dtype: torch.dtype | None = None,
    loss_dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum", ...)`` without the full logits.

    Rows whose target is ``ignore_index`` are skipped (they cost nothing); label smoothing is
    ``F.cross_entropy``'s: ``(1 − ε)·(lse − z_t) + ε·(lse − mean_j z_j)`` per token.

    Args:
        hidden: ``(N, H)`` final hidden states (any float dtype).
        weight: ``(V, H)`` output projection (may be the tied token embedding: its two gradients add up).
        bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 next-token ids.
        ignore_index: Targets left out of the loss.
        label_smoothing: ε in [0, 1].
        compute_dtype: The dtype of the matrix products (default: ``hidden``'s); bf16 under autocast.
        loss_dtype: The dtype of the logits once multiplied and of the softmax (at least float32).
        chunk_size: Tokens per chunk (default: :func:`chunk_rows` of the vocabulary).

    Returns:
        The summed loss, a 0-d tensor of ``loss_dtype``.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or targets.ndim != 1 or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected hidden (N, H), weight (V, H), targets (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    loss_dtype = torch.promote_types(loss_dtype, torch.float32)
    compute = compute_dtype or hidden.dtype
    rows = chunk_size or chunk_rows(weight.shape[0])
    grad_enabled = torch.is_grad_enabled()  # inside the Function's forward it is always off
    return _ChunkedCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, float(label_smoothing), compute, loss_dtype, rows, grad_enabled
    )


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward: each chunk's logits, loss and gradients, then the chunk is freed. Backward: scale the gradients."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        smoothing: float,
        compute: torch.dtype,
        loss_dtype: torch.dtype,
        rows: int,
        grad_enabled: bool,
    ) -> Tensor:
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        # Only the rows that carry a target: SFT masks every prompt token, often most of a batch.
        kept = (targets != ignore_index).nonzero().squeeze(1)
        w = weight.to(compute)
        vocab = weight.shape[0]
        # Zeros, not None, for an input that needs a gradient: DDP expects every parameter to get one, even
        # from a batch with no target token. The weight's is summed in (at least) float32 over the chunks.
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=accumulate, device=weight.device) if need_bias else None
        total = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        for start in range(0, kept.shape[0], rows):
            index = kept[start : start + rows]
            logits = _logits(hidden, w, bias, index, loss_dtype)
            lse = torch.logsumexp(logits, dim=1)
            target = logits.gather(1, targets[index].unsqueeze(1)).squeeze(1)
            loss = lse - (1.0 - smoothing) * target
            if smoothing:
                loss = loss - (smoothing / vocab) * logits.sum(dim=1)
            total += loss.sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = softmax − (1 − ε)·onehot(target) − ε / V, formed in place of the logits.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, targets[index].unsqueeze(1), grad.new_full((index.shape[0], 1), smoothing - 1.0))
            if smoothing:
                grad.sub_(smoothing / vocab)
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
            grad = grad.to(compute)
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, index, (grad @ w).to(hidden.dtype))
            if grad_weight is not None:
                grad_weight += (grad.T @ hidden[index].to(compute)).to(accumulate)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        # The loss is a sum, so each gradient is the one formed in the forward times the upstream scalar.
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total.to(grad_weight.dtype)).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total.to(grad_bias.dtype)).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _logits(hidden: Tensor, w: Tensor, bias: Tensor | None, index: Tensor, loss_dtype: torch.dtype) -> Tensor:
    """One chunk's logits in ``loss_dtype``: the product in ``w``'s dtype (bf16 under autocast), as the head would."""
    logits = (hidden[index].to(w.dtype) @ w.T).to(loss_dtype)
    return logits if bias is None else logits + bias.to(loss_dtype)
