"""Language modeling: next-token cross-entropy, with perplexity and top-1 accuracy as metrics.

Losses are per token, not per sequence: the loop divides the summed loss of
an optimizer step by :meth:`LanguageModelingTask.count`, the step's number of
target tokens, so accumulated micro-batches give exactly the large-batch
gradient. Targets equal to ``IGNORE_INDEX`` (torch's default ``-100``) are
left out of the loss, the count and the metrics.

A model may hand the training loss its final hidden states and output
projection instead of logits (a :class:`~gradwise.tasks.chunked_loss.ProjectedHidden`,
``model.chunked_loss``); the loss is then computed chunk by chunk and the
``(tokens, vocab)`` logits never exist (:mod:`gradwise.tasks.chunked_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwise.config import TaskConfig
from gradwise.data.types import DataInfo, TaskKind
from gradwise.errors import ConfigError
from gradwise.tasks.chunked_loss import ProjectedHidden, chunked_cross_entropy_sum

IGNORE_INDEX = -100


class LanguageModelingTask:
    """Mean next-token cross-entropy over ``vocab_size`` logits, with optional label smoothing.

    Args:
        vocab_size: Width of the model's output.
        label_smoothing: Applied to the training loss only; the meter scores plain cross-entropy,
            so perplexities stay comparable across smoothing settings.

    References:
        Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision" (label smoothing).
    """

    kind: TaskKind = "language_modeling"
    loss_name: str = "cross_entropy"
    default_monitor: str = "val_loss"

    def __init__(self, vocab_size: int, label_smoothing: float = 0.0) -> None:
        self.vocab_size = vocab_size
        self.label_smoothing = label_smoothing

    def loss(self, outputs: Tensor | ProjectedHidden, targets: Tensor) -> Tensor:
        """Mean cross-entropy per target token; ``outputs`` ``(B, L, V)`` logits, ``targets`` ``(B, L)`` ids."""
        if isinstance(outputs, ProjectedHidden):
            return self.loss_sum(outputs, targets) / max(1, self.count(targets))
        return F.cross_entropy(
            _flat(outputs), targets.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing
        )

    def loss_sum(self, outputs: Tensor | ProjectedHidden, targets: Tensor) -> Tensor:
        """Summed cross-entropy over the target tokens (``loss_sum / count == loss``).

        ``outputs`` is ``(B, L, V)`` logits, or hidden states with their head (chunked, same value).
        """
        if isinstance(outputs, ProjectedHidden):
            hidden = outputs.hidden
            return chunked_cross_entropy_sum(
                hidden.reshape(-1, hidden.shape[-1]),
                outputs.head_weight,
                outputs.head_bias,
                targets.reshape(-1).long(),
                ignore_index=IGNORE_INDEX,
                label_smoothing=self.label_smoothing,
                compute_dtype=outputs.compute_dtype,
                loss_dtype=outputs.dtype,
            )
        return F.cross_entropy(
            _flat(outputs),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    def count(self, targets: Tensor) -> int:
        """Number of target tokens in ``targets`` (those not equal to ``IGNORE_INDEX``)."""
        return int((targets != IGNORE_INDEX).sum())

    def new_meter(self) -> LanguageModelingMeter:
        """An empty meter of plain (unsmoothed) cross-entropy."""
        return LanguageModelingMeter()


class LanguageModelingMeter:
    """Accumulates ``[n_tokens, Σloss, n_correct]`` over batches; metrics come from those sums alone.

    Because the state is plain sums, meters on several ranks combine by
    all-reducing :meth:`stats` and calling :meth:`load_stats` with the result.
    """

    def __init__(self) -> None:
        self._stats = torch.zeros(3, dtype=torch.float64)

    @torch.no_grad()
    def update(self, outputs: Tensor | ProjectedHidden, targets: Tensor) -> None:
        """Add a batch of logits ``(B, L, V)`` and next-token ids ``(B, L)``."""
        if isinstance(outputs, ProjectedHidden):  # models return real logits in eval mode; this is a fallback
            outputs = outputs.materialize()
        logits = _flat(outputs.detach())
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        targets = targets.detach().reshape(-1).long()
        keep = targets != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(dim=1) == targets) & keep).sum()
        # One small host transfer per batch keeps the sums in float64 on any device (MPS has no float64).
        self._stats += torch.tensor([float(keep.sum()), float(loss_sum), float(correct)], dtype=torch.float64)

    def stats(self) -> Tensor:
        """The sufficient statistics ``[n_tokens, Σloss, n_correct]`` as one float64 CPU tensor (a copy)."""
        return self._stats.clone()

    def load_stats(self, t: Tensor) -> None:
        """Replace the state with ``t`` (e.g. the sum of every rank's :meth:`stats`)."""
        if t.numel() != 3:
            raise ValueError(f"expected 3 statistics [n_tokens, loss_sum, n_correct], got {t.numel()}")
        self._stats = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    def confusion(self) -> list[list[int]] | None:
        """None: a vocabulary-sized confusion matrix says nothing useful."""
        return None

    def compute(self) -> dict[str, float]:
        """``loss`` (mean per token), ``perplexity`` = exp(loss) and next-token ``accuracy``; NaN before any token."""
        n = float(self._stats[0])
        if n == 0:
            return {"loss": math.nan, "perplexity": math.nan, "accuracy": math.nan}
        loss = float(self._stats[1]) / n
        # exp overflows past ~709 nats; a diverged model is reported as inf, not an exception.
        perplexity = math.inf if loss > 700 else math.exp(loss)
        return {"loss": loss, "perplexity": perplexity, "accuracy": float(self._stats[2]) / n}


def build_language_modeling_task(cfg: TaskConfig, info: DataInfo) -> LanguageModelingTask:
    """The language-modeling task for tokenized data ``info``.

    Raises:
        ConfigError: ``task.loss`` is not cross-entropy, or the data is not a language-modeling set.
    """
    label = info.name or info.source
    if info.kind != "language_modeling" or info.vocab_size is None:
        raise ConfigError(f"task.kind 'language_modeling' needs a token corpus; {label!r} is a {info.kind} dataset")
    if cfg.loss not in ("auto", "cross_entropy"):
        raise ConfigError(f"task.loss {cfg.loss!r} does not apply to language modeling (use auto or cross_entropy)")
    return LanguageModelingTask(info.vocab_size, cfg.label_smoothing)


def _flat(outputs: Tensor) -> Tensor:
    return outputs.reshape(-1, outputs.shape[-1])
