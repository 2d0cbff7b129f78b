"""Stateless negative sampling for implicit-feedback training: a negative is a pure function of (seed, epoch, row)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gradwise.errors import DataError

# The rounds of vectorized redraws before the few leftover rows are drawn exactly from their unseen items.
NEGATIVE_ROUNDS = 4
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, epoch: int, rows: np.ndarray, attempt: int) -> np.ndarray:
    """A 64-bit hash of (seed, epoch, row, attempt) per row: the random stream is a counter, not a state."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(1, seed % 2**64, dtype=np.uint64) + np.uint64(_GOLDEN))
        h = _mix(h ^ np.uint64(epoch % 2**64))
        h = _mix(h ^ rows.astype(np.uint64))
        return _mix(h ^ np.uint64(attempt))


def negatives(
    users: Tensor,
    rows: Tensor,
    epoch: int,
    seed: int,
    n_items: int,
    seen_indptr: Tensor,
    seen_items: Tensor,
    rounds: int = NEGATIVE_ROUNDS,
) -> Tensor:
    """One negative item per (user, row): uniform over items ``1..n_items−1`` the user has NOT seen in training.

    Counter-based and stateless: the draw for a row is a pure function of
    ``(seed, epoch, row)`` (a splitmix64 hash of the four counters with the attempt
    number), so there is no generator state to checkpoint; a resumed run, or the same
    row drawn by any rank of any process count, gets bit-for-bit the same negative.
    Each round redraws, vectorized, the rows whose candidate the user has seen; after
    ``rounds`` rounds the few rows left are drawn from their user's unseen items directly.
    Both stages are uniform over the unseen items, so the whole draw is too.

    Args:
        users: User index per row, ``(B,)`` int64.
        rows: The rows' GLOBAL indices in the training split (not positions in the batch), ``(B,)``.
        epoch: The epoch (a new epoch gives new negatives).
        seed: The run's seed.
        n_items: Item index range, including the reserved index 0.
        seen_indptr: CSR row pointers of each user's training items.
        seen_items: CSR item indices, sorted within each user.
        rounds: Vectorized redraw rounds before the exact fallback.

    Raises:
        DataError: there are no items to draw (``n_items < 2``) or a user has seen every item.

    References:
        Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3" (counter-based random numbers);
        Steele, Lea & Flood 2014, "Fast Splittable Pseudorandom Number Generators" (splitmix64).
    """
    if n_items < 2:
        raise DataError(f"negative sampling needs at least one item besides the reserved 0; n_items={n_items}")
    u = users.detach().cpu().numpy().astype(np.int64)
    r = rows.detach().cpu().numpy().astype(np.int64)
    indptr = seen_indptr.cpu().numpy().astype(np.int64)
    seen = seen_items.cpu().numpy().astype(np.int64)
    # Sorted (user, item) keys: the CSR is sorted by user then item, so user·n_items + item is sorted too.
    seen_keys = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr)) * n_items + seen
    span = np.uint64(n_items - 1)
    out = np.empty(len(u), dtype=np.int64)
    todo = np.arange(len(u))
    for attempt in range(rounds):
        candidate = (_hash(seed, epoch, r[todo], attempt) % span).astype(np.int64) + 1
        out[todo] = candidate
        keys = u[todo] * n_items + candidate
        pos = np.minimum(np.searchsorted(seen_keys, keys), max(len(seen_keys) - 1, 0))
        collided = seen_keys[pos] == keys if len(seen_keys) else np.zeros(len(keys), dtype=bool)
        todo = todo[collided]
        if not len(todo):
            break
    for j in todo:  # rare: only users who have seen most items get here
        user_seen = seen[indptr[u[j]] : indptr[u[j] + 1]]
        unseen = np.setdiff1d(np.arange(1, n_items, dtype=np.int64), user_seen)
        if not len(unseen):
            raise DataError(f"negative sampling: user {u[j]} has seen all {n_items - 1} items; none is left to draw")
        out[j] = unseen[int(_hash(seed, epoch, r[j : j + 1], rounds)[0] % np.uint64(len(unseen)))]
    return torch.from_numpy(out).to(users.device)
