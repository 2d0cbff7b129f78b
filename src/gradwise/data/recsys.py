"""MovieLens as a dataset of interactions: id columns in, ratings or held-out items out.

Rating regression (``task.kind`` auto/regression): inputs ``{"user", "item"}``, targets the
ratings ``(N, 1)``. Ranking (``task.kind=ranking``): training rows are the observed (user, item)
pairs, each batch drawing one negative per row (:func:`gradwise.data.negatives.negatives`, a pure
function of seed, epoch and row); evaluation rows are users ``{"user"}`` with targets
``(user, held-out item)``, ranked against every item the user has not rated in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from gradwise.data.movielens import SOURCE, MovieLens, Ratings, load_movielens
from gradwise.data.negatives import negatives
from gradwise.data.sources import MovieLensData
from gradwise.data.types import DataInfo, Dataset, Split
from gradwise.errors import ConfigError

# Offsets keep the negatives' hash stream apart from the other seeded streams of a run.
NEGATIVE_SEED_OFFSET = 3


def build_movielens_dataset(
    cfg: MovieLensData, task_kind: str, seed: int, tokenizer_dir: Path | None = None
) -> Dataset:
    """The data component's builder (see the module docstring for the two shapes)."""
    if task_kind not in ("auto", "regression", "ranking"):
        raise ConfigError(f"task.kind {task_kind!r} does not apply to data.name 'movielens' (regression or ranking)")
    ranking = task_kind == "ranking"
    if cfg.negatives != 1 and not ranking:
        raise ConfigError("data.negatives is the BPR negatives per rating; it needs task.kind=ranking")
    ml = load_movielens(cfg.split, cfg.val_fraction, cfg.test_fraction, seed, cfg.limit)
    info = DataInfo(
        kind="ranking" if ranking else "regression",
        n_features=2,
        image_shape=None,
        n_outputs=1,
        class_names=None,
        feature_names=["user", "item"],
        target_name="held-out item" if ranking else "rating",
        source=f"{SOURCE}, {cfg.split} split",
        name="movielens",
        interactions={
            "n_users": ml.n_users,
            "n_items": ml.n_items,
            "n_genres": ml.n_genres,
            "global_mean": ml.global_mean,
            "genre_ids": ml.genre_ids.tolist(),
            "genre_offsets": ml.genre_offsets.tolist(),
            # Training ratings per user and per item (row 0: none), for penalties normalized by frequency.
            "user_counts": torch.bincount(ml.train.user, minlength=ml.n_users).tolist(),
            "item_counts": torch.bincount(ml.train.item, minlength=ml.n_items).tolist(),
        },
    )
    extras = {"movielens": ml, "seen_indptr": ml.seen_indptr, "seen_items": ml.seen_items}
    if not ranking:
        return Dataset(train=_ratings(ml.train), val=_ratings(ml.val), test=_ratings(ml.test), info=info, extras=extras)
    draw = partial(_draw_negatives, ml=ml, seed=seed + NEGATIVE_SEED_OFFSET, count=cfg.negatives)
    train = Split(x={"user": ml.train.user, "item": ml.train.item}, y=torch.ones(len(ml.train)), draw=draw)
    return Dataset(train=train, val=_held_out(ml.val), test=_held_out(ml.test), info=info, extras=extras)


def _ratings(split: Ratings) -> Split:
    return Split(x={"user": split.user, "item": split.item}, y=split.rating.reshape(-1, 1))


def _held_out(split: Ratings) -> Split:
    return Split(x={"user": split.user}, y=torch.stack([split.user, split.item], dim=1))


def _draw_negatives(
    inputs: Mapping[str, torch.Tensor], rows: torch.Tensor, epoch: int, *, ml: MovieLens, seed: int, count: int
) -> dict[str, torch.Tensor]:
    """``(B,)`` negatives, or ``(B, count)``: draw j of epoch e is the stream ``e·count + j`` (one stream per draw)."""
    user = inputs["user"]
    if count == 1:
        return {"negative": negatives(user, rows, epoch, seed, ml.n_items, ml.seen_indptr, ml.seen_items)}
    draws = [
        negatives(user, rows, epoch * count + j, seed, ml.n_items, ml.seen_indptr, ml.seen_items) for j in range(count)
    ]
    return {"negative": torch.stack(draws, dim=1)}
