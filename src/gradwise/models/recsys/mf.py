"""Biased matrix factorization: r̂ = μ + b_u + b_i + p_u · q_i."""

from __future__ import annotations

import torch
from torch import Tensor

from gradwise.models.recsys.base import Recommender, padded_embedding


class BiasedMF(Recommender):
    """Matrix factorization with a global mean and user and item biases.

    ``r̂(u, i) = μ + b_u + b_i + p_u · q_i``. Factors start at N(0, init_std²) and biases at
    zero; row 0 of every table (the user or item unseen in training) stays zero, so a
    cold-start prediction is ``μ + b_i`` (or ``μ + b_u``). Biases are 1-wide embeddings, so
    with ``sparse=True`` they, too, take sparse gradients.

    Args:
        n_users: User index range, including the reserved index 0.
        n_items: Item index range, including the reserved index 0.
        dim: Width of the factors ``p_u`` and ``q_i``.
        global_mean: μ, the mean training rating (a buffer, not trained); 0 for ranking.
        sparse: Sparse embedding gradients (for SparseAdam / SGD / Adagrad).
        init_std: Standard deviation of the initial factors.

    References:
        Koren, Bell & Volinsky 2009, "Matrix Factorization Techniques for Recommender Systems".
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        global_mean: float = 0.0,
        sparse: bool = False,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user_factors = padded_embedding(n_users, dim, sparse, init_std)
        self.item_factors = padded_embedding(n_items, dim, sparse, init_std)
        self.user_bias = padded_embedding(n_users, 1, sparse, 0.0)
        self.item_bias = padded_embedding(n_items, 1, sparse, 0.0)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    # λ of the L2 on the rows a batch looks up (Koren et al. 2009, eq. 5): factors and biases; the row_
    # ones are divided by the row's training count (set_row_counts), so each row gets λ once per epoch.
    l2: float = 0.0
    bias_l2: float = 0.0
    row_l2: float = 0.0
    row_bias_l2: float = 0.0

    def set_row_counts(self, user_counts: Tensor, item_counts: Tensor) -> None:
        """Training ratings per user and per item (non-persistent: rebuilt from the data record, not saved)."""
        self.register_buffer("user_weight", 1.0 / user_counts.clamp(min=1).float(), persistent=False)
        self.register_buffer("item_weight", 1.0 / item_counts.clamp(min=1).float(), persistent=False)

    def batch_penalty_sum(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The batch's share of the L2 on the rows its ratings use, or None when every λ is 0.

        Σ_b l2·(‖p_u‖² + ‖q_i‖²) + bias_l2·(b_u² + b_i²) is the regularized objective of Koren et al.
        2009: each observed rating penalizes the rows it uses, so a popular item is shrunk more often.
        The ``row_`` terms weigh each lookup by 1/count, which sums over an epoch to the same λ·‖row‖²
        for every row, applied only when the row has data in the step (a full-table ``regularize.l2``
        under Adam instead shrinks rows without data at the full step size, every step).
        """
        if not (self.l2 or self.bias_l2 or self.row_l2 or self.row_bias_l2) or "item" not in batch:
            return None
        user, item = batch["user"], batch["item"]
        p2, q2 = self.user_factors(user).pow(2).sum(-1), self.item_factors(item).pow(2).sum(-1)
        bu2, bi2 = self.user_bias(user).squeeze(-1).pow(2), self.item_bias(item).squeeze(-1).pow(2)
        total = self.l2 * (p2 + q2) + self.bias_l2 * (bu2 + bi2)
        if self.row_l2 or self.row_bias_l2:
            wu, wi = self.user_weight[user], self.item_weight[item]
            total = total + self.row_l2 * (wu * p2 + wi * q2) + self.row_bias_l2 * (wu * bu2 + wi * bi2)
        return total.sum()

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        p, q = self.user_factors(user), self.item_factors(item)
        bias = self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1)
        return self.global_mean + bias + (p * q).sum(-1)

    def score_all(self, user: Tensor) -> Tensor:
        # Lookups rather than .weight: a sparse table then still gets a sparse gradient.
        every = torch.arange(self.n_items, device=user.device)
        user_part = self.global_mean + self.user_bias(user)  # (B, 1)
        return user_part + self.item_bias(every).T + self.user_factors(user) @ self.item_factors(every).T
