"""Which examples go into each optimizer step.

:class:`EpochSampler` walks a seeded permutation of the training set and can
stop and resume anywhere inside an epoch; :class:`BatchPlan` says how many
examples the next optimizer step takes (fixed, full batch, or a batch-size
schedule), how they split into accumulation micro-batches, and how the LR
scales when the batch size changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gradwise.config import BatchConfig
from gradwise.data.batches import gather

__all__ = ["BatchPlan", "EpochSampler", "gather"]


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

    def take(self, size: int) -> tuple[torch.Tensor, bool]:
        """The next ``size`` indices (fewer at the end of an epoch) and whether the epoch ended."""
        perm = self._permutation()
        end = min(self.cursor + size, self.n)
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

    def size(self, step: int, epoch: int) -> int:
        """Examples in optimizer step ``step`` (0-based) during epoch ``epoch``."""
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

    def _walk(self, max_steps: int | None, epochs: int | None = None) -> Iterator[int]:
        """The batch sizes the loop will take, step by step, as the sampler cuts them."""
        step = epoch = cursor = 0
        while (epochs is None or epoch < epochs) and (max_steps is None or step < max_steps):
            taken = min(self.size(step, epoch), self.n_train - cursor)
            yield taken
            cursor += taken
            step += 1
            if cursor >= self.n_train:
                epoch, cursor = epoch + 1, 0
