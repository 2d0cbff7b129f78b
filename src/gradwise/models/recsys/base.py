"""The batch protocol every recommender shares, and embedding tables whose row 0 means "unseen"."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def padded_embedding(n: int, dim: int, sparse: bool, init_std: float) -> nn.Embedding:
    """``nn.Embedding(n, dim)`` drawn from N(0, init_std²), row 0 zero and never trained (``padding_idx=0``).

    Row 0 is the index of every user or item unseen in training, so a zero row there
    turns its contribution into nothing and the prediction into the bias-only one.
    """
    table = nn.Embedding(n, dim, padding_idx=0, sparse=sparse)
    with torch.no_grad():
        if init_std > 0:
            table.weight.normal_(0.0, init_std)
        else:
            table.weight.zero_()
        table.weight[0].zero_()
    return table


class Recommender(nn.Module):
    """Scores (user, item) pairs; subclasses define :meth:`score` and :meth:`score_all`.

    :meth:`forward` takes a batch ``dict[str, Tensor]`` and answers by its keys:

    - ``{"user", "item"}`` (each ``(B,)``) → ``(B, 1)`` scores (rating regression on ``(B, 1)`` targets);
    - ``{"user", "item", "negative"}`` → ``(B, 2)`` = ``[score(u, item), score(u, negative)]`` (BPR),
      or ``(B, 1 + K)`` for ``(B, K)`` negatives;
    - ``{"user"}`` alone → ``(B, n_items)`` scores of every item (full ranking; column 0 is the
      unseen item, which rankers exclude).
    """

    n_items: int

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        user = batch["user"]
        if "item" not in batch:
            return self.score_all(user)
        positive = self.score(user, batch["item"])
        if "negative" in batch:
            negative = batch["negative"]
            if negative.ndim == 2:  # several negatives per row: (B, 1 + K)
                users = user[:, None].expand_as(negative).reshape(-1)
                scores = self.score(users, negative.reshape(-1)).view(negative.shape)
                return torch.cat([positive[:, None], scores], dim=1)
            return torch.stack([positive, self.score(user, negative)], dim=1)
        return positive.unsqueeze(1)

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        """Scores ``(B,)`` of the pairs ``(user[b], item[b])``."""
        raise NotImplementedError

    def score_all(self, user: Tensor) -> Tensor:
        """Scores ``(B, n_items)`` of every item for each user."""
        raise NotImplementedError

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (embedding tables built with ``sparse=True``).

        These go to an optimizer that takes sparse gradients (``torch.optim.SparseAdam``,
        ``SGD``, ``Adagrad``); :meth:`dense_parameters` lists the rest (for AdamW and the like).
        """
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter not in :meth:`sparse_parameters`."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]
