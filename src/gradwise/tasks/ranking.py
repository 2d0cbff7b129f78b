"""Ranking: the BPR loss and HR@K / NDCG@K over a full ranking (negatives: gradwise.data.negatives).

Evaluation ranks EVERY item for a user (no sampled candidate list): the user's
training items are excluded (score −inf) except the held-out item itself, and item
0 (the index of items unseen in training) is never ranked. A held-out item that is
0 counts as a miss: the model cannot know it, and dropping such users would flatter
every model. Rank ``r`` (0-based) is the number of candidates with a STRICTLY
greater score than the held-out item, so ties resolve in the item's favour;
``HR@K = [r < K]`` and ``NDCG@K = [r < K] / log2(r + 2)`` (one relevant item, so the
ideal DCG is 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gradwise.data.negatives import NEGATIVE_ROUNDS, negatives

__all__ = ["NEGATIVE_ROUNDS", "RankingMeter", "bpr_loss_sum", "most_popular_baseline", "negatives"]


def bpr_loss_sum(outputs: Tensor) -> Tensor:
    """``Σ_b mean_k −log σ(s_pos − s_neg,k)`` over ``(B, 1 + K)`` scores ``[positive, negatives…]`` (K = 1: plain BPR).

    ``−log σ(x)`` is computed as ``softplus(−x)``, which stays finite for large margins.

    References:
        Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback".
    """
    return F.softplus(outputs[:, 1:] - outputs[:, :1]).mean(dim=1).sum()


def _segments(indptr: Tensor, users: Tensor) -> tuple[Tensor, Tensor]:
    """Positions into the CSR's item array of every (row, seen item) of ``users``, with the row of each."""
    starts, lengths = indptr[users], indptr[users + 1] - indptr[users]
    row = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.repeat_interleave(starts - offsets, lengths) + torch.arange(row.numel(), device=users.device)
    return row, position


class RankingMeter:
    """Accumulates ``[n, Σhit@K, Σndcg@K]`` over full rankings; metrics come from those sums alone.

    Because the state is plain sums, meters on several ranks combine by all-reducing
    :meth:`stats` and calling :meth:`load_stats` with the result.

    Args:
        k: The cut-off K.
        seen_indptr: CSR row pointers of each user's training items, ``(n_users + 1,)``.
        seen_items: CSR item indices (each user's training items).
        n_items: Item index range, including the reserved index 0.
    """

    N_STATS = 3

    def __init__(self, k: int, seen_indptr: Tensor, seen_items: Tensor, n_items: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        self.k, self.n_items = k, n_items
        self._indptr, self._items = seen_indptr.long().cpu(), seen_items.long().cpu()
        self._stats = torch.zeros(self.N_STATS, dtype=torch.float64)

    @torch.no_grad()
    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Add a batch of scores ``(B, n_items)`` and targets ``(B, 2)`` int64 = ``[user, held-out item]``."""
        if scores.shape[1] != self.n_items:
            raise ValueError(f"scores have {scores.shape[1]} columns; expected n_items={self.n_items}")
        device = scores.device
        users, held = targets[:, 0].long().to(device), targets[:, 1].long().to(device)
        scores = scores.detach().clone()
        target_score = scores.gather(1, held[:, None])
        row, position = _segments(self._indptr.to(device), users)
        scores[row, self._items.to(device)[position]] = -math.inf
        scores[:, 0] = -math.inf
        rank = (scores > target_score).sum(1)
        hit = (rank < self.k) & (held > 0)
        ndcg = torch.where(
            hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.float64, device=device)
        )
        batch = torch.tensor([float(users.numel()), float(hit.sum()), float(ndcg.sum())], dtype=torch.float64)
        self._stats += batch

    def stats(self) -> Tensor:
        """The sufficient statistics ``[n, Σhit, Σndcg]`` as one float64 CPU tensor (a copy)."""
        return self._stats.clone()

    def load_stats(self, t: Tensor) -> None:
        """Replace the state with ``t`` (e.g. the sum of every rank's :meth:`stats`)."""
        if t.numel() != self.N_STATS:
            raise ValueError(f"expected {self.N_STATS} statistics, got {t.numel()}")
        self._stats = t.detach().to("cpu", torch.float64).reshape(-1).clone()

    def confusion(self) -> list[list[int]] | None:
        """None: ranking has no confusion matrix."""
        return None

    def compute(self) -> dict[str, float]:
        """``hr@K`` and ``ndcg@K`` (K in the key names); NaN before any user."""
        n, hits, ndcg = (float(v) for v in self._stats)
        if n == 0:
            return {f"hr@{self.k}": math.nan, f"ndcg@{self.k}": math.nan}
        return {f"hr@{self.k}": hits / n, f"ndcg@{self.k}": ndcg / n}


def most_popular_baseline(
    train_items: Tensor,
    n_items: int,
    users: Tensor,
    items: Tensor,
    seen_indptr: Tensor,
    seen_items: Tensor,
    k: int,
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of ranking every item by its training count, with :class:`RankingMeter`'s definitions.

    Args:
        train_items: Item index of every training rating.
        n_items: Item index range, including the reserved index 0.
        users: The evaluated users, ``(N,)``.
        items: Each user's held-out item, ``(N,)``.
        seen_indptr: CSR row pointers of each user's training items.
        seen_items: CSR item indices.
        k: The cut-off K.
        batch_size: Users scored at once (bounds the memory to ``batch_size × n_items``).
    """
    popularity = torch.bincount(train_items.long(), minlength=n_items).double()
    meter = RankingMeter(k, seen_indptr, seen_items, n_items)
    for start in range(0, users.numel(), batch_size):
        u, i = users[start : start + batch_size], items[start : start + batch_size]
        meter.update(popularity.expand(u.numel(), -1), torch.stack([u.long(), i.long()], dim=1))
    return meter.compute()
