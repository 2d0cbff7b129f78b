"""MovieLens loading: re-indexing on the training split, the two splits, genre bags and the seen-items CSR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradwise.data.movielens import MovieLens, load_movielens
from gradwise.errors import DataError


@pytest.fixture(scope="module")
def random_split() -> MovieLens:
    return load_movielens("random", 0.1, 0.1, seed=0)


@pytest.fixture(scope="module")
def last_out() -> MovieLens:
    return load_movielens("leave_last_out", 0.0, 0.0, seed=0)


def test_random_split_counts_add_up_and_train_ids_are_one_to_n(random_split: MovieLens):
    m = random_split
    assert len(m.train) + len(m.val) + len(m.test) == 100_004
    assert (len(m.val), len(m.test)) == (10_001, 10_001)
    rows = torch.cat([m.train.row, m.val.row, m.test.row])
    assert torch.equal(rows.sort().values, torch.arange(100_004))
    assert torch.equal(m.train.user.unique(), torch.arange(1, m.n_users))
    assert torch.equal(m.train.item.unique(), torch.arange(1, m.n_items))
    assert m.train.rating.dtype == torch.float32 and m.train.user.dtype == torch.int64
    assert m.global_mean == pytest.approx(float(m.train.rating.double().mean()))


def test_ids_unseen_in_training_map_to_zero_and_the_maps_invert(random_split: MovieLens):
    m = random_split
    train_raw = set(m.raw_item_ids[m.train.item].tolist())
    test_raw = m.raw_item_ids[m.test.item]
    unseen = m.test.item == 0
    assert unseen.any()  # some test movies have no training rating
    assert all(int(r) in train_raw for r in test_raw[~unseen])
    for index in (1, 17, m.n_items - 1):
        assert m.item_index[int(m.raw_item_ids[index])] == index
    assert m.raw_user_ids[0] == -1 and len(m.user_index) == m.n_users - 1
    # Indices follow ascending raw ids.
    assert torch.all(m.raw_item_ids[2:] > m.raw_item_ids[1:-1])


def test_leave_last_out_puts_each_users_latest_rating_in_test(last_out: MovieLens):
    m = last_out
    assert len(m.train) + len(m.val) + len(m.test) == 100_004
    assert len(m.test) == len(m.val) == 671  # every user has at least 20 ratings
    last_train = torch.full((m.n_users,), -1, dtype=torch.int64).scatter_reduce(
        0, m.train.user, m.train.timestamp, reduce="amax"
    )
    val_time = torch.zeros(m.n_users, dtype=torch.int64).index_put_((m.val.user,), m.val.timestamp)
    test_time = torch.zeros(m.n_users, dtype=torch.int64).index_put_((m.test.user,), m.test.timestamp)
    users = m.test.user
    assert torch.all(test_time[users] >= val_time[users]) and torch.all(val_time[users] >= last_train[users])
    assert set(m.test.user.tolist()) == set(range(1, m.n_users))


def test_leave_last_out_keeps_users_with_few_ratings_in_training():
    m = load_movielens("leave_last_out", 0.5, 0.5, seed=3, limit=22)  # user 1: 20 ratings, user 2: 2
    assert (len(m.train), len(m.val), len(m.test)) == (20, 1, 1)
    assert m.n_users == 3 and m.raw_user_ids[m.test.user].tolist() == [1]


def test_limit_counts_add_up():
    m = load_movielens("random", 0.2, 0.1, seed=1, limit=500)
    assert (len(m.train), len(m.val), len(m.test)) == (350, 100, 50)


def test_genre_bags_work_with_embedding_bag(random_split: MovieLens):
    m = random_split
    assert m.genre_names[0] == "(none)" and "(no genres listed)" not in m.genre_names
    assert m.genre_offsets.shape == (m.n_items,) and m.genre_offsets[0] == 0
    lengths = torch.diff(m.genre_offsets, append=torch.tensor([len(m.genre_ids)]))
    assert torch.all(lengths >= 1)  # no empty bag: genre-less items carry the reserved genre 0
    assert m.genre_ids[0] == 0 and int(m.genre_ids.max()) == m.n_genres - 1
    toy_story = m.item_index[1]
    names = {m.genre_names[g] for g in m.genre_ids[m.genre_offsets[toy_story] : m.genre_offsets[toy_story] + 5]}
    assert {"Animation", "Children", "Comedy"} <= names
    assert m.titles[toy_story] == "Toy Story"
    bag = torch.nn.EmbeddingBag(m.n_genres, 4, mode="mean")
    assert torch.isfinite(bag(m.genre_ids, m.genre_offsets)).all()


def test_seen_csr_lists_each_users_training_items(random_split: MovieLens):
    m = random_split
    assert m.seen_indptr.shape == (m.n_users + 1,) and int(m.seen_indptr[-1]) == len(m.train)
    assert m.seen(0).numel() == 0
    user = int(m.train.user[0])
    expected = np.sort(m.train.item[m.train.user == user].numpy())
    assert np.array_equal(m.seen(user).numpy(), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "random", "limit": 0}, "limit=0"),
        ({"split": "random", "limit": 2}, "too few"),
        ({"split": "leave_last_out", "limit": 2}, "at least 3 ratings"),
        ({"split": "random", "val_fraction": 0.6, "test_fraction": 0.5}, "leaves no training"),
        ({"split": "random", "val_fraction": -0.1}, r"val_fraction=-0\.1"),
        ({"split": "sideways"}, "unknown"),
    ],
)
def test_bad_input_is_one_data_error_line(kwargs: dict, message: str):
    args = {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0} | kwargs
    with pytest.raises(DataError, match=message) as info:
        load_movielens(**args)
    assert "\n" not in str(info.value) and "movielens" in str(info.value)
