"""Chunked cross-entropy from hidden states against F.cross_entropy on the full logits, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradwise.models.lazy_logits import LazyLogits, lazy_logits
from gradwise.tasks.chunked_loss import ProjectedHidden, chunk_rows, chunked_cross_entropy_sum
from gradwise.tasks.language_modeling import IGNORE_INDEX, LanguageModelingMeter, LanguageModelingTask

N, H, V = 37, 8, 23


def problem(bias: bool, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:9]] = IGNORE_INDEX  # prompt tokens, padding
    return hidden, weight, b, targets


def grads(loss: torch.Tensor, *inputs: torch.Tensor | None) -> list[torch.Tensor]:
    present = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(loss, present))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 5, N, 64])  # 5 does not divide 37; 64 is one chunk larger than N
def test_loss_and_gradients_equal_full_logits_in_float64(bias: bool, smoothing: float, chunk: int):
    hidden, weight, b, targets = problem(bias)
    full = F.cross_entropy(
        F.linear(hidden, weight, b), targets, ignore_index=IGNORE_INDEX, label_smoothing=smoothing, reduction="sum"
    )
    chunked = chunked_cross_entropy_sum(
        hidden, weight, b, targets, label_smoothing=smoothing, loss_dtype=torch.float64, chunk_size=chunk
    )
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-10)
    upstream = 0.37  # the loop divides by the token count before backward
    got, want = grads(chunked * upstream, hidden, weight, b), grads(full * upstream, hidden, weight, b)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-10)
    assert torch.all(got[0][targets == IGNORE_INDEX] == 0)  # ignored rows get exactly zero gradient


def test_tied_weight_accumulates_both_gradients():
    """The head weight is also the embedding: its gradient is the embedding's plus the head's."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:4] = IGNORE_INDEX

    def loss(chunked: bool) -> torch.Tensor:
        hidden = torch.tanh(F.embedding(ids, table) * 1.5)
        if chunked:
            return chunked_cross_entropy_sum(hidden, table, None, targets, loss_dtype=torch.float64, chunk_size=6)
        return F.cross_entropy(hidden @ table.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    (want,) = torch.autograd.grad(loss(False), table)
    (got,) = torch.autograd.grad(loss(True), table)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_every_target_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, b, targets = problem(bias=True)
    targets = torch.full_like(targets, IGNORE_INDEX)
    loss = chunked_cross_entropy_sum(hidden, weight, b, targets, chunk_size=4)
    assert float(loss.detach()) == 0.0
    # Zeros rather than None: DDP expects a gradient for every parameter.
    for grad in grads(loss, hidden, weight, b):
        assert grad is not None and torch.all(grad == 0)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, _, targets = problem(bias=False)
    frozen = weight.detach()
    loss = chunked_cross_entropy_sum(hidden, frozen, None, targets, loss_dtype=torch.float64, chunk_size=7)
    full = F.cross_entropy(hidden @ frozen.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(grads(loss, hidden)[0], grads(full, hidden)[0], rtol=0, atol=1e-10)


def test_bf16_hidden_multiplies_in_bf16_and_reduces_in_float32():
    """As under autocast: the product in bf16 (like the head's), the softmax and the loss in float32."""
    hidden, weight, _, targets = problem(bias=False, dtype=torch.float32)
    h16 = hidden.detach().bfloat16().requires_grad_()
    reference = F.cross_entropy(
        (h16 @ weight.bfloat16().T).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    chunked = chunked_cross_entropy_sum(h16, weight, None, targets, compute_dtype=torch.bfloat16, chunk_size=8)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-4)
    got_h, got_w = grads(chunked, h16, weight)
    want_h, want_w = grads(reference, h16, weight)
    assert got_h.dtype == torch.bfloat16 and got_w.dtype == torch.float32
    torch.testing.assert_close(got_h.float(), want_h.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_w, want_w, rtol=2e-2, atol=2e-2)


def test_autocast_dtype_is_recorded_by_the_lazy_output():
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(2, 3, H)
    assert lazy_logits(hidden, head).compute_dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lazy_logits(hidden, head).compute_dtype == torch.bfloat16


def test_task_uses_the_chunked_loss_for_lazy_logits_and_matches_full_logits():
    hidden, weight, b, targets = problem(bias=True)
    lazy = LazyLogits(hidden.reshape(1, N, H), weight, b, torch.float64).to(torch.float64)
    assert isinstance(lazy, ProjectedHidden) and not isinstance(torch.zeros(1), ProjectedHidden)
    assert lazy.shape == (1, N, V)
    task = LanguageModelingTask(V, label_smoothing=0.2)
    logits = lazy.materialize()
    y = targets.reshape(1, N)
    torch.testing.assert_close(task.loss_sum(lazy, y), task.loss_sum(logits, y), rtol=0, atol=1e-10)
    torch.testing.assert_close(task.loss(lazy, y), task.loss(logits, y), rtol=0, atol=1e-12)
    # A meter handed lazy logits scores their materialized values.
    a, m = LanguageModelingMeter(), LanguageModelingMeter()
    a.update(lazy, y)
    m.update(logits, y)
    assert a.compute() == m.compute()


def test_chunk_rows_bound_the_chunk_size():
    assert chunk_rows(50257) * 50257 <= 1 << 24
    assert chunk_rows(1 << 30) == 1


def test_shapes_are_checked():
    hidden, weight, _, targets = problem(bias=False)
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_cross_entropy_sum(hidden.reshape(1, N, H), weight, None, targets)


def test_without_gradients_the_value_is_the_same():
    hidden, weight, b, targets = problem(bias=True)
    with_grad = chunked_cross_entropy_sum(hidden, weight, b, targets, loss_dtype=torch.float64, chunk_size=5)
    with torch.no_grad():
        without = chunked_cross_entropy_sum(hidden, weight, b, targets, loss_dtype=torch.float64, chunk_size=5)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)
