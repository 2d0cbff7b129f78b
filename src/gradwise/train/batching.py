"""Which examples go into each optimizer step.

:class:`EpochSampler` walks a seeded permutation of the training set and can
stop and resume anywhere inside an epoch; :class:`BatchPlan` says how many
examples the next optimizer step takes (fixed, full batch, or a batch-size
schedule), how they split into accumulation micro-batches, and how the LR
scales when the batch size changes.

BatchNorm cannot train on a micro-batch of 1 (its variance is undefined). When a
model has it, the plan asks every step to take at least ``2 · accumulate · world``
examples (:meth:`BatchPlan.require_micro_batches_of`), so every micro-batch on every
rank holds two or more. A full step always does (the setup refuses a smaller
``batch.size``); an epoch's last, short step may not, and then the step before it
leaves it the missing examples (:func:`step_end`). That is a pure function of the
cursor, so resuming stays bit-exact, and, unlike DataLoader's ``drop_last``, no
example is dropped and the number of steps per epoch (which the LR schedule and
the stopping step were sized by) does not change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gradwise.config import BatchConfig
from gradwise.data.batches import gather

__all__ = ["BatchPlan", "EpochSampler", "StepSize", "gather", "step_end"]


class StepSize(int):
    """A step's planned example count that also carries the fewest examples any step may take.

    The loop hands ``plan.size(...)`` to ``sampler.take`` unchanged, so the plan's rule reaches the sampler
    with the size (``take`` also takes ``min_take`` directly); as an ``int`` it scales the LR as before.
    """

    min_take: int

    def __new__(cls, value: int, min_take: int) -> StepSize:
        size = super().__new__(cls, value)
        size.min_take = min_take
        return size


def step_end(cursor: int, size: int, n: int, min_take: int = 1) -> int:
    """Where a step that starts at ``cursor`` ends: ``size`` examples on, or the epoch's end.

    If that would leave fewer than ``min_take`` examples for the epoch's last step, this step
    ends early enough to leave exactly ``min_take`` (when it can still take ``min_take`` itself).
    """
    end = min(cursor + size, n)
    rest = n - end
    if 0 < rest < min_take and end - (min_take - rest) - cursor >= min_take:
        end -= min_take - rest
    return end


class EpochSampler:
    """Shuffled epochs over ``n`` examples, resumable from (epoch, cursor).

    The permutation of epoch ``e`` is a pure function of ``(seed, e)``, so the
    sampler's whole state is two integers and resuming mid-epoch replays the
    exact same order. With ``lengths`` and a ``bucket`` size, each consecutive
    chunk of ``bucket`` shuffled examples is sorted by length (longest first),
    so batches hold sequences of similar length and dynamic padding wastes
    little — the length-grouping of Hugging Face's ``group_by_length``.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, lengths: torch.Tensor | None = None, bucket: int | None = None
    ) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.bucket = bucket
        self.epoch = 0
        self.cursor = 0
        self._perm_epoch = -1
        self._perm = torch.arange(n)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                entropy = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(entropy))
                self._perm = torch.randperm(self.n, generator=generator)
            if self.lengths is not None and self.bucket:
                self._perm = self._bucketed(self._perm)
            self._perm_epoch = self.epoch
        return self._perm

    def _bucketed(self, perm: torch.Tensor) -> torch.Tensor:
        assert self.lengths is not None and self.bucket
        chunks = []
        for chunk in torch.split(perm, self.bucket):
            order = torch.sort(self.lengths[chunk], descending=True, stable=True).indices
            chunks.append(chunk[order])
        return torch.cat(chunks)

    def take(self, size: int, min_take: int | None = None) -> tuple[torch.Tensor, bool]:
        """The next ``size`` indices (fewer at the end of an epoch) and whether the epoch ended.

        ``min_take`` (default: the size's own, see :class:`StepSize`, else 1) is the fewest a step may
        take: the step before an epoch's last one leaves that many for it (:func:`step_end`).
        """
        perm = self._permutation()
        floor = min_take if min_take is not None else getattr(size, "min_take", 1)
        end = step_end(self.cursor, size, self.n, floor)
        indices = perm[self.cursor : end]
        self.cursor = end
        epoch_ended = self.cursor >= self.n
        if epoch_ended:
            self.epoch += 1
            self.cursor = 0
        return indices, epoch_ended

    @property
    def progress(self) -> float:
        """Fractional epochs done."""
        return self.epoch + self.cursor / self.n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])


class BatchPlan:
    """Batch size per optimizer step, accumulation, and LR scaling.

    ``optim.lr`` is the LR for ``batch.size``; when a ramp or an epoch table
    changes the batch to ``b``, ``lr_scaling`` multiplies the LR by ``b/size``
    (linear) or its square root.

    References:
        Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (linear rule);
        Krizhevsky 2014, "One weird trick for parallelizing convolutional neural networks" (sqrt rule);
        Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size" (batch-size schedules).
    """

    def __init__(self, cfg: BatchConfig, n_train: int) -> None:
        self.cfg = cfg
        self.n_train = n_train
        self.reference = n_train if cfg.size == "full" else min(cfg.size, n_train)
        self._epoch_table = sorted((cfg.at_epochs or {}).items())
        self.min_take = 1  # the fewest examples a step may take (see require_micro_batches_of)

    def require_micro_batches_of(self, minimum: int, world: int = 1) -> None:
        """Make every micro-batch on every one of ``world`` ranks hold at least ``minimum`` examples.

        Each step then takes at least ``minimum · accumulate · world`` examples: every rank's stride holds
        ``minimum · accumulate`` or more and splits into ``accumulate`` micro-batches of ``minimum`` or more.
        """
        self.min_take = minimum * self.cfg.accumulate * world

    def size(self, step: int, epoch: int) -> int:
        """Examples in optimizer step ``step`` (0-based) during epoch ``epoch``."""
        planned = self._scheduled(step, epoch)
        return StepSize(planned, self.min_take) if self.min_take > 1 else planned

    def _scheduled(self, step: int, epoch: int) -> int:
        cfg = self.cfg
        if cfg.size == "full":
            return self.n_train
        size = cfg.size
        if cfg.ramp is not None:
            progress = min(step / cfg.ramp.steps, 1.0)
            size = round(cfg.ramp.start + (cfg.size - cfg.ramp.start) * progress)
        for start_epoch, table_size in self._epoch_table:
            if epoch >= start_epoch:
                size = table_size
        return max(1, min(size, self.n_train))

    def lr_scale(self, size: int) -> float:
        """Factor on the LR for a step of ``size`` examples."""
        if self.cfg.lr_scaling == "none" or size == self.reference:
            return 1.0
        ratio = size / self.reference
        return ratio if self.cfg.lr_scaling == "linear" else math.sqrt(ratio)

    def micro_batches(self, indices: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, ...]:
        """Split one step's indices into ``accumulate`` near-equal micro-batches (or ``count``, some maybe empty)."""
        return torch.tensor_split(indices, count if count is not None else min(self.cfg.accumulate, len(indices)))

    def total_steps(self, epochs: int | None, max_steps: int | None) -> int:
        """Optimizer steps in the run: ``epochs`` passes or ``max_steps``, whichever ends first."""
        if epochs is None:
            assert max_steps is not None
            return max_steps
        if self.cfg.ramp is None and not self._epoch_table:
            total = epochs * math.ceil(self.n_train / self.size(0, 0))
        else:
            total = self._simulate(epochs, max_steps)
        return total if max_steps is None else min(total, max_steps)

    def smallest_micro_batch(self, total_steps: int) -> int:
        """The fewest examples any micro-batch of the run will hold (epoch tails included)."""
        if self.cfg.ramp is None and not self._epoch_table:
            size = self.size(0, 0)
            smallest = min(size, self.n_train % size or size)
        else:
            smallest = min(self._walk(total_steps))
        return smallest // min(self.cfg.accumulate, smallest)

    def _simulate(self, epochs: int, max_steps: int | None) -> int:
        # A batch-size schedule changes steps per epoch; count them the way the loop takes them.
        return sum(1 for _ in self._walk(max_steps, epochs))

    def smallest_step(self, total_steps: int) -> int:
        """The fewest examples any step of the run will take, as the sampler cuts them."""
        return min(self._walk(total_steps))

    def lent_to_last_steps(self, total_steps: int) -> set[tuple[int, int]]:
        """``(short, lent)`` per kind of epoch end where the last step, ``short`` examples, is lent ``lent`` more
        by the step before it (see :func:`step_end`); empty when every step already takes ``min_take``."""
        lent = set()
        step = epoch = cursor = 0
        while step < total_steps:
            planned = self.size(step, epoch)
            uncut = min(cursor + planned, self.n_train)
            end = step_end(cursor, planned, self.n_train, self.min_take)
            if end < uncut:
                lent.add((self.n_train - uncut, uncut - end))
            if self.cfg.ramp is None and not self._epoch_table and (end < uncut or uncut == self.n_train):
                break  # a fixed size cuts every epoch alike: the first epoch end says it all
            cursor, step = end, step + 1
            if cursor >= self.n_train:
                epoch, cursor = epoch + 1, 0
        return lent

    def _walk(self, max_steps: int | None, epochs: int | None = None) -> Iterator[int]:
        """The batch sizes the loop will take, step by step, as the sampler cuts them."""
        step = epoch = cursor = 0
        while (epochs is None or epoch < epochs) and (max_steps is None or step < max_steps):
            end = step_end(cursor, self.size(step, epoch), self.n_train, self.min_take)
            yield end - cursor
            cursor = end
            step += 1
            if cursor >= self.n_train:
                epoch, cursor = epoch + 1, 0
