"""Top-k recommendations of a trained recommender run for one user, with titles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gradwise.compress.runs import load_run_model
from gradwise.errors import ConfigError


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: int  # the item's id in the source data (MovieLens movieId)
    title: str
    score: float


def recommend(run_dir: Path, user_id: int, k: int = 10, checkpoint: str = "best") -> list[Recommendation]:
    """The ``k`` best-scored items ``user_id`` (an id of the source data) has not rated in the run's training split.

    Raises:
        ConfigError: the run is not a recommender, ``k`` is not positive, or the user has no training ratings
            (a user unseen in training would get the same list as every other unseen user: the item biases).
    """
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    cfg, data, model, _, device = load_run_model(run_dir, checkpoint)
    ml = data.extras.get("movielens") if data is not None else None
    if ml is None or not hasattr(model, "score_all"):
        raise ConfigError(f"{run_dir} is a {cfg.model.name!r} run on {cfg.data.name!r}, not a recommender")
    user = ml.user_index.get(int(user_id))
    if user is None:
        raise ConfigError(
            f"user {user_id} has no ratings in {run_dir}'s training split "
            f"(users are MovieLens userId values such as {int(ml.raw_user_ids[1])})"
        )
    with torch.no_grad():
        scores = model.score_all(torch.tensor([user], device=device)).float().cpu()[0]
    scores[0] = -math.inf  # the slot of items unseen in training
    scores[ml.seen(user)] = -math.inf  # what the user already rated
    k = min(k, int(torch.isfinite(scores).sum()))
    top = torch.topk(scores, k)
    return [
        Recommendation(rank + 1, int(ml.raw_item_ids[i]), ml.titles[i], float(s))
        for rank, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True))
    ]
