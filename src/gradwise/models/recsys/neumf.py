"""Neural matrix factorization: a GMF and an MLP tower fused by one linear layer."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from gradwise.models.recsys.base import Recommender, padded_embedding

# Full ranking scores B × n_items pairs through the MLP; chunks of about this many pairs bound the memory.
PAIRS_PER_CHUNK = 1 << 18


class NeuMF(Recommender):
    """GMF (``p_u ⊙ q_i``) and an MLP over ``[p'_u, q'_i]``, concatenated into a final linear layer.

    The two towers have their own embeddings, as in the paper. ``mlp_layers[0]`` is the
    width of the MLP's input (user and item halves of ``mlp_layers[0] // 2`` each); each
    further entry is a ReLU layer. ``global_mean`` (optional) is added to every score, so
    the same model fits ratings (regression around μ) or rankings (leave it 0).

    Args:
        n_users: User index range, including the reserved index 0.
        n_items: Item index range, including the reserved index 0.
        mf_dim: Width of the GMF embeddings.
        mlp_layers: MLP widths, e.g. ``[64, 32, 16]``; the first must be even.
        dropout: Dropout after each MLP layer.
        sparse: Sparse embedding gradients (for SparseAdam / SGD / Adagrad).
        global_mean: Constant added to every score.
        init_std: Standard deviation of the initial embeddings.

    References:
        He et al. 2017, "Neural Collaborative Filtering".
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        mf_dim: int,
        mlp_layers: list[int],
        dropout: float = 0.0,
        sparse: bool = False,
        global_mean: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if not mlp_layers or mlp_layers[0] % 2:
            raise ValueError(f"mlp_layers must start with an even width (user + item halves); got {mlp_layers}")
        self.n_users, self.n_items = n_users, n_items
        half = mlp_layers[0] // 2
        self.gmf_user = padded_embedding(n_users, mf_dim, sparse, init_std)
        self.gmf_item = padded_embedding(n_items, mf_dim, sparse, init_std)
        self.mlp_user = padded_embedding(n_users, half, sparse, init_std)
        self.mlp_item = padded_embedding(n_items, half, sparse, init_std)
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(mlp_layers):
            layers += [nn.Linear(width_in, width_out), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(mf_dim + mlp_layers[-1], 1)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))

    def _fuse(self, gu: Tensor, gi: Tensor, mu: Tensor, mi: Tensor) -> Tensor:
        hidden = self.mlp(torch.cat([mu, mi], dim=-1))
        return self.head(torch.cat([gu * gi, hidden], dim=-1)).squeeze(-1) + self.global_mean

    def score(self, user: Tensor, item: Tensor) -> Tensor:
        return self._fuse(self.gmf_user(user), self.gmf_item(item), self.mlp_user(user), self.mlp_item(item))

    def score_all(self, user: Tensor) -> Tensor:
        b = user.shape[0]
        gu, mu = self.gmf_user(user)[:, None], self.mlp_user(user)[:, None]  # (B, 1, d)
        chunk = max(1, PAIRS_PER_CHUNK // max(b, 1))
        parts = []
        for start in range(0, self.n_items, chunk):
            # Lookups rather than .weight slices: a sparse table then still gets a sparse gradient.
            items = torch.arange(start, min(start + chunk, self.n_items), device=user.device)
            gi, mi = self.gmf_item(items)[None], self.mlp_item(items)[None]  # (1, C, d)
            c = gi.shape[1]
            parts.append(self._fuse(gu.expand(b, c, -1), gi.expand(b, c, -1), mu.expand(b, c, -1), mi.expand(b, c, -1)))
        return torch.cat(parts, dim=1)
