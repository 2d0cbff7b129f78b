"""The recommenders as registered model components (``model.name`` mf, neumf, two_tower).

Each reads interactions batches (``{"user", "item"}`` id columns; see gradwise.data.recsys) and is
sized by the data's ``interactions`` record: user and item counts (row 0 = unseen in training),
the training mean rating, and the item genre bags for the two-tower model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from gradwise.config.base import Fraction, NonNegFloat, PositiveFloat, PositiveInt
from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.recsys.mf import BiasedMF
from gradwise.models.recsys.neumf import NeuMF
from gradwise.models.recsys.two_tower import TwoTower


class _RecommenderSection(ModelSection):
    """Shared by the recommenders: ``sparse`` makes the embedding tables' gradients sparse (only the rows a
    batch touched), which ``optim.sparse`` (SparseAdam or Adagrad) then updates while ``optim.name`` takes
    the dense rest."""

    sparse: bool = False

    takes: ClassVar[tuple[str, ...]] = ("interactions",)


class MFConfig(_RecommenderSection):
    """``mf``: biased matrix factorisation r̂ = μ + b_u + b_i + p_u·q_i of ``dim`` factors (Koren et al. 2009);
    ``l2`` / ``bias_l2`` penalize the factor / bias rows each rating looks up (the paper's regularized loss);
    ``row_l2`` / ``row_bias_l2`` do so divided by the row's training count (λ once per row per epoch)."""

    name: Literal["mf"] = "mf"
    dim: PositiveInt = 64
    init_std: PositiveFloat = 0.01
    l2: NonNegFloat = 0.0
    bias_l2: NonNegFloat = 0.0
    row_l2: NonNegFloat = 0.0
    row_bias_l2: NonNegFloat = 0.0


class NeuMFConfig(_RecommenderSection):
    """``neumf``: neural collaborative filtering, GMF of ``mf_dim`` + an MLP tower of ``hidden`` widths (He et al.
    2017); the first width is split between the user and the item embedding."""

    name: Literal["neumf"] = "neumf"
    mf_dim: PositiveInt = 32
    hidden: list[PositiveInt] = [64, 32, 16]
    dropout: Fraction = 0.0

    @model_validator(mode="after")
    def _even(self) -> NeuMFConfig:
        if self.hidden[0] % 2:
            raise ValueError(f"model.hidden[0] must be even (half user, half item embedding); got {self.hidden[0]}")
        return self


class TwoTowerConfig(_RecommenderSection):
    """``two_tower``: a user tower and an item tower (item id + genres as an embedding bag), each an MLP of
    ``hidden`` widths ending in ``dim``; the score is their dot product (Yi et al. 2019)."""

    name: Literal["two_tower"] = "two_tower"
    dim: PositiveInt = 32
    hidden: list[PositiveInt] = [64]


def _sizes(info: DataInfo, name: str) -> dict[str, Any]:
    if info.interactions is None:
        label = info.name or info.source
        raise ConfigError(f"model.name {name!r} needs interactions data (data.name=movielens); {label!r} is not")
    return info.interactions


def build_mf(cfg: MFConfig, info: DataInfo) -> BiasedMF:
    sizes = _sizes(info, cfg.name)
    # A ranking model scores; there is no rating mean to start from.
    mean = sizes["global_mean"] if info.kind == "regression" else 0.0
    model = BiasedMF(sizes["n_users"], sizes["n_items"], cfg.dim, mean, sparse=cfg.sparse, init_std=cfg.init_std)
    model.l2, model.bias_l2, model.row_l2, model.row_bias_l2 = cfg.l2, cfg.bias_l2, cfg.row_l2, cfg.row_bias_l2
    if cfg.row_l2 or cfg.row_bias_l2:
        if "user_counts" not in sizes:
            raise ConfigError("model.row_l2 needs the data's rating counts; this run's data record predates them")
        model.set_row_counts(torch.tensor(sizes["user_counts"]), torch.tensor(sizes["item_counts"]))
    return model


def build_neumf(cfg: NeuMFConfig, info: DataInfo) -> NeuMF:
    sizes = _sizes(info, cfg.name)
    mean = sizes["global_mean"] if info.kind == "regression" else 0.0
    return NeuMF(
        sizes["n_users"], sizes["n_items"], cfg.mf_dim, list(cfg.hidden), cfg.dropout, cfg.sparse, global_mean=mean
    )


def build_two_tower(cfg: TwoTowerConfig, info: DataInfo) -> TwoTower:
    sizes = _sizes(info, cfg.name)
    genre_ids = torch.tensor(sizes["genre_ids"], dtype=torch.int64)
    genre_offsets = torch.tensor(sizes["genre_offsets"], dtype=torch.int64)
    return TwoTower(
        sizes["n_users"], sizes["n_items"], genre_ids, genre_offsets, sizes["n_genres"], cfg.dim, list(cfg.hidden),
        sparse=cfg.sparse,
    )  # fmt: skip


COMPONENTS: dict[str, Component] = {
    "mf": Component(MFConfig, build_mf),
    "neumf": Component(NeuMFConfig, build_neumf),
    "two_tower": Component(TwoTowerConfig, build_two_tower),
}
