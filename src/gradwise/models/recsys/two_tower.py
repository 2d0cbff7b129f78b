"""Two-tower retrieval: a user tower and an item tower (id + genres) meet in a dot product."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradwise.models.recsys.base import Recommender, padded_embedding


def _tower(width_in: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, width_out in enumerate(hidden):
        layers.append(nn.Linear(width_in, width_out))
        if i < len(hidden) - 1:  # the last layer stays linear: its output is the vector the dot product reads
            layers.append(nn.ReLU())
        width_in = width_out
    return nn.Sequential(*layers)


class TwoTower(Recommender):
    """Score = ``user_tower(u) · item_tower(i)``.

    User tower: user id embedding → MLP. Item tower: ``[item id embedding, mean of its
    genre embeddings]`` → MLP (``hidden`` widths, ReLU between, the last layer linear; an
    empty list keeps the user embedding as is and maps the item's ``2·dim`` features by one
    linear layer to ``dim``). The genre bags are buffers, so they move with the model.
    Full ranking computes every item vector once per call. Item 0 (unseen in training) has
    a zero id embedding and the ``(none)`` genre, so it still gets a vector.

    Args:
        n_users: User index range, including the reserved index 0.
        n_items: Item index range, including the reserved index 0.
        genre_ids: Every item's genre indices, flat int64 (``nn.EmbeddingBag`` input).
        genre_offsets: Where item ``i``'s bag starts in ``genre_ids``, ``(n_items,)`` int64.
        n_genres: Genre index range.
        dim: Width of the id and genre embeddings.
        hidden: Tower widths; both towers end at ``hidden[-1]`` (or ``dim``).
        sparse: Sparse embedding gradients (for SparseAdam / SGD / Adagrad).
        init_std: Standard deviation of the initial embeddings.

    References:
        Covington, Adams & Sargin 2016, "Deep Neural Networks for YouTube Recommendations";
        Yi et al. 2019, "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations".
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        genre_ids: Tensor,
        genre_offsets: Tensor,
        n_genres: int,
        dim: int,
        hidden: list[int],
        sparse: bool = False,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        if genre_offsets.numel() != n_items:
            raise ValueError(f"genre_offsets has {genre_offsets.numel()} entries; expected n_items={n_items}")
        self.n_users, self.n_items = n_users, n_items
        self.user_embedding = padded_embedding(n_users, dim, sparse, init_std)
        self.item_embedding = padded_embedding(n_items, dim, sparse, init_std)
        self.genre_embedding = nn.EmbeddingBag(n_genres, dim, mode="mean", sparse=sparse)
        nn.init.normal_(self.genre_embedding.weight, 0.0, init_std)
        genre_ids, genre_offsets = genre_ids.long(), genre_offsets.long()
        self.register_buffer("genre_ids", genre_ids.clone())
        self.register_buffer("genre_offsets", genre_offsets.clone())
        self.register_buffer(
            "genre_lengths", torch.diff(genre_offsets, append=genre_offsets.new_tensor([len(genre_ids)]))
        )
        self.user_tower = _tower(dim, hidden)
        self.item_tower = _tower(2 * dim, hidden or [dim])

    def user_vectors(self, user: Tensor) -> Tensor:
        """``(B, d)`` user-tower outputs."""
        return self.user_tower(self.user_embedding(user))

    def genre_vectors(self, item: Tensor) -> Tensor:
        """``(B, dim)`` mean genre embedding of each item (its bag gathered from the flat buffers)."""
        lengths = self.genre_lengths[item]
        offsets = torch.cumsum(lengths, 0) - lengths
        # Position j of the batch's flat bag list reads genre_ids[start_of_its_item + j - offset_of_its_item].
        shift = torch.repeat_interleave(self.genre_offsets[item] - offsets, lengths)
        flat = self.genre_ids[shift + torch.arange(shift.numel(), device=shift.device)]
        return self.genre_embedding(flat, offsets)

    def item_vectors(self, item: Tensor | None = None) -> Tensor:
        """``(B, d)`` item-tower outputs of ``item``, or ``(n_items, d)`` of every item when None."""
        if item is None:
            item = torch.arange(self.n_items, device=self.genre_ids.device)
        return self.item_tower(torch.cat([self.item_embedding(item), self.genre_vectors(item)], dim=-1))

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        return (self.user_vectors(user) * self.item_vectors(item)).sum(-1)

    def score_all(self, user: Tensor) -> Tensor:
        return self.user_vectors(user) @ self.item_vectors().T
