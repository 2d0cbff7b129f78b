"""Recommenders: the batch protocol, sparse vs dense gradients, and the zero padding row (cold start)."""

from __future__ import annotations

import pytest
import torch

from gradwise.models.recsys import BiasedMF, NeuMF, Recommender, TwoTower

N_USERS, N_ITEMS = 7, 11
GENRE_IDS = torch.tensor([0, 1, 2, 2, 3, 1, 0, 3, 1, 2, 3, 1, 2])
GENRE_OFFSETS = torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # item 1 has two genres, item 10 three


def models(sparse: bool = False) -> list[Recommender]:
    torch.manual_seed(0)
    return [
        BiasedMF(N_USERS, N_ITEMS, 4, global_mean=3.5, sparse=sparse),
        NeuMF(N_USERS, N_ITEMS, 4, [8, 4], dropout=0.0, sparse=sparse, global_mean=3.5),
        TwoTower(N_USERS, N_ITEMS, GENRE_IDS, GENRE_OFFSETS, 4, 4, [8, 4], sparse=sparse),
    ]


def batch() -> dict[str, torch.Tensor]:
    return {
        "user": torch.tensor([1, 2, 6, 0]),
        "item": torch.tensor([3, 10, 1, 5]),
        "negative": torch.tensor([4, 2, 9, 7]),
    }


@pytest.mark.parametrize("model", models(), ids=lambda m: type(m).__name__)
def test_the_batch_keys_choose_the_output(model: Recommender):
    model.eval()
    b = batch()
    pairs = model({"user": b["user"], "item": b["item"]})
    both = model(b)
    every = model({"user": b["user"]})
    assert pairs.shape == (4, 1) and both.shape == (4, 2) and every.shape == (4, N_ITEMS)
    torch.testing.assert_close(both[:, :1], pairs)
    torch.testing.assert_close(every.gather(1, b["item"][:, None]), pairs)
    torch.testing.assert_close(every.gather(1, b["negative"][:, None]), both[:, 1:])


@pytest.mark.parametrize("index", [0, 1, 2], ids=["BiasedMF", "NeuMF", "TwoTower"])
def test_sparse_parameters_get_sparse_gradients(index: int):
    dense, sparse = models(False)[index], models(True)[index]
    assert dense.sparse_parameters() == []
    assert len(dense.dense_parameters()) == len(list(dense.parameters()))
    sparse(batch()).sum().backward()
    assert sparse.sparse_parameters() and all(p.grad.is_sparse for p in sparse.sparse_parameters())
    assert all(not p.grad.is_sparse for p in sparse.dense_parameters() if p.grad is not None)
    names = {id(p) for p in sparse.sparse_parameters()}
    assert len(names) + len(sparse.dense_parameters()) == len(list(sparse.parameters()))


def train_mf(sparse: bool, steps: int = 5) -> BiasedMF:
    torch.manual_seed(0)
    model = BiasedMF(N_USERS, N_ITEMS, 4, global_mean=3.0, sparse=sparse, init_std=0.1).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        user = torch.randint(0, N_USERS, (16,), generator=gen)  # includes the unseen user 0
        item = torch.randint(0, N_ITEMS, (16,), generator=gen)
        rating = torch.rand(16, 1, generator=gen, dtype=torch.float64) * 4.5 + 0.5
        loss = torch.nn.functional.mse_loss(model({"user": user, "item": item}), rating)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_sparse_and_dense_mf_train_to_the_same_weights():
    dense, sparse = train_mf(False), train_mf(True)
    for (name, a), (_, b) in zip(dense.state_dict().items(), sparse.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(dense.item_bias.weight, torch.zeros_like(dense.item_bias.weight))  # it did train


@pytest.mark.parametrize("sparse", [False, True])
def test_the_padding_row_stays_zero_so_an_unseen_user_gets_the_bias_only_prediction(sparse: bool):
    model = train_mf(sparse)
    for table in (model.user_factors, model.item_factors, model.user_bias, model.item_bias):
        assert torch.count_nonzero(table.weight[0]) == 0
    item = torch.tensor([2, 5])
    cold = model({"user": torch.tensor([0, 0]), "item": item}).squeeze(1)
    torch.testing.assert_close(cold, model.global_mean + model.item_bias.weight[item, 0])


def test_neumf_rejects_an_odd_mlp_input_width():
    with pytest.raises(ValueError, match="even"):
        NeuMF(N_USERS, N_ITEMS, 4, [7, 4])


def test_two_tower_uses_genres_for_items_and_keeps_buffers():
    model = TwoTower(N_USERS, N_ITEMS, GENRE_IDS, GENRE_OFFSETS, 4, 4, [])
    assert {"genre_ids", "genre_offsets", "genre_lengths"} <= set(dict(model.named_buffers()))
    expected = model.genre_embedding(GENRE_IDS, GENRE_OFFSETS)
    torch.testing.assert_close(model.genre_vectors(torch.arange(N_ITEMS)), expected)
    torch.testing.assert_close(model.genre_vectors(torch.tensor([10, 1])), expected[[10, 1]])
