"""Recommenders over (user, item) ids: biased MF, NeuMF and a two-tower model, one batch protocol.

Every model's :meth:`forward` takes a batch ``dict[str, Tensor]`` (see
:class:`~gradwise.models.recsys.base.Recommender`), keeps row 0 of each embedding
(the user or item unseen in training) at zero, and lists its sparse-gradient
parameters in ``sparse_parameters()`` so they can go to SparseAdam and the rest to AdamW.
"""

from gradwise.models.recsys.base import Recommender, padded_embedding
from gradwise.models.recsys.mf import BiasedMF
from gradwise.models.recsys.neumf import NeuMF
from gradwise.models.recsys.two_tower import TwoTower

__all__ = ["BiasedMF", "NeuMF", "Recommender", "TwoTower", "padded_embedding"]
