"""Token streams on disk: written once in chunks, read back as memory-mapped next-token blocks.

This is nanoGPT's approach (``data/openwebtext/prepare.py`` writes every token id of a corpus
into one flat ``uint16`` file; ``train.py`` reads blocks from it through ``np.memmap``): a
corpus of any size is tokenized once, and training reads only the rows a batch uses, so the
memory a run needs does not grow with the corpus. As in nanoGPT's ``get_batch``, the map is
opened anew for each batch and dropped after it, so pages read once are not kept resident by
the process.

The blocks are laid out as :func:`gradwise.data.corpus.pack_blocks` lays out the stdlib corpus:
non-overlapping windows of ``seq_len + 1`` tokens, inputs ``block[:-1]`` and targets
``block[1:]``, int64 ``(N, seq_len)`` — so the GPT model and the language-modeling task take a
:class:`TokenBlocks` split unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHUNK_TOKENS = 1 << 19  # ids buffered before a write: 1-2 MB whatever the corpus size


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of the vocabulary fits in it (nanoGPT's choice for GPT-2's 50,257), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenWriter:
    """Append token ids to a flat binary file of ``dtype``, buffering at most ``chunk`` ids in memory.

    Use as a context manager; on a clean exit the file is flushed and fsynced.
    """

    def __init__(self, path: Path, dtype: np.dtype, chunk: int = CHUNK_TOKENS) -> None:
        self.path = path
        self.dtype = dtype
        self.n_tokens = 0
        self._chunk = chunk
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._file = open(path, "wb")  # closed in __exit__

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._flush()
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def extend(self, ids: Sequence[int]) -> None:
        """Append ``ids`` (written out once the buffer holds ``chunk`` of them)."""
        # Held as arrays of the stored dtype: a list of Python ints would take 36 bytes an id.
        self._buffer.append(np.asarray(ids, dtype=self.dtype))
        self._buffered += len(ids)
        if self._buffered >= self._chunk:
            self._flush()

    def _flush(self) -> None:
        for array in self._buffer:
            self._file.write(array.data)
        self.n_tokens += self._buffered
        self._buffer.clear()
        self._buffered = 0


@dataclass(frozen=True)
class TokenBlocks:
    """Rows of a token file cut into non-overlapping blocks of ``seq_len + 1``, read lazily as int64.

    Row ``i`` is block ``first + i`` without its last token (``shift`` 0: the inputs) or without
    its first (``shift`` 1: the next-token targets). Indexing with a tensor, array or list of rows
    maps the file, copies those rows out and unmaps it; a slice is another view (nothing read).

    Attributes:
        path: The flat token file.
        stored: Its numpy dtype name (``uint16`` or ``uint32``).
        seq_len: Tokens per row.
        n_blocks: Rows in this view.
        shift: 0 for inputs, 1 for targets.
        first: The block row 0 of this view is.
    """

    path: Path
    stored: str
    seq_len: int
    n_blocks: int
    shift: int
    first: int = 0

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_blocks, self.seq_len))

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: Any) -> torch.Tensor | TokenBlocks:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.n_blocks)
            if step == 1:
                return replace(self, first=self.first + start, n_blocks=max(stop - start, 0))
            index = np.arange(start, stop, step)
        if isinstance(index, int):
            return self.rows(np.asarray([index]))[0]
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return self.rows(np.asarray(index, dtype=np.int64))

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """The rows ``index`` (negative ones count from the end) as an int64 ``(len(index), seq_len)`` tensor."""
        index = index.reshape(-1)
        if len(index) and (index.min() < -self.n_blocks or index.max() >= self.n_blocks):
            raise IndexError(f"row index out of range for {self.n_blocks} blocks of {self.path}")
        if len(index) == 0:
            return torch.empty((0, self.seq_len), dtype=torch.int64)
        width = self.seq_len + 1
        blocks = np.memmap(self.path, dtype=self.stored, mode="r", shape=(self.first + self.n_blocks, width))
        picked = blocks[self.first + index % self.n_blocks, self.shift : self.shift + self.seq_len]
        out = torch.from_numpy(picked.astype(np.int64))
        del blocks  # unmapped now: only the copied rows stay in memory
        return out

    def chunks(self, tokens: int = 1 << 18) -> Iterable[torch.Tensor]:
        """Every row in order, about ``tokens`` at a time (2 MiB of int64 ids: statistics over a whole split in
        memory that is bounded, and small beside a batch's activations)."""
        rows = max(1, tokens // self.seq_len)
        for start in range(0, self.n_blocks, rows):
            yield self.rows(np.arange(start, min(start + rows, self.n_blocks)))


def block_split(path: Path, stored: str, seq_len: int, n_tokens: int) -> tuple[TokenBlocks, TokenBlocks]:
    """Inputs and targets of the ``n_tokens // (seq_len + 1)`` whole blocks of a token file (the tail is dropped)."""
    n_blocks = n_tokens // (seq_len + 1)
    x = TokenBlocks(path=path, stored=stored, seq_len=seq_len, n_blocks=n_blocks, shift=0)
    return x, replace(x, shift=1)
