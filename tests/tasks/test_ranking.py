"""Ranking: BPR loss, HR/NDCG on a hand-computed full ranking, most-popular, stateless negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradwise.errors import DataError
from gradwise.tasks.ranking import RankingMeter, bpr_loss_sum, most_popular_baseline, negatives

# 3 users (1..3, 0 reserved) × 5 items (1..4, 0 reserved). Training items: user 1 {1}, user 2 {2, 3}, user 3 {}.
INDPTR = torch.tensor([0, 0, 1, 3, 3])
ITEMS = torch.tensor([1, 2, 3])
N_ITEMS = 5


def test_bpr_loss_sum_is_the_summed_negative_log_sigmoid_of_the_margin():
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [50.0, -50.0]])
    expected = -F.logsigmoid(out[:, 0] - out[:, 1]).sum()
    torch.testing.assert_close(bpr_loss_sum(out), expected)
    assert math.isfinite(float(bpr_loss_sum(torch.tensor([[-100.0, 100.0]]))))


def test_hr_and_ndcg_against_a_hand_computed_ranking():
    scores = torch.tensor(
        [
            [9.0, 5.0, 4.0, 3.0, 1.0],  # user 1, held out 4: item 1 (5.0) is seen → excluded; 2, 3 beat it → rank 2
            [9.0, 1.0, 8.0, 7.0, 2.0],  # user 2, held out 4: 2, 3 seen → excluded; only item 1 is left → rank 0
            [0.0, 2.0, 2.0, 1.0, 3.0],  # user 3, held out 2: item 4 beats it, item 1 ties (not counted) → rank 1
        ]
    )
    targets = torch.tensor([[1, 4], [2, 4], [3, 2]])
    meter = RankingMeter(2, INDPTR, ITEMS, N_ITEMS)
    meter.update(scores, targets)
    hits = [0, 1, 1]
    ndcg = [0.0, 1.0, 1 / math.log2(3)]
    result = meter.compute()
    assert result == pytest.approx({"hr@2": sum(hits) / 3, "ndcg@2": sum(ndcg) / 3})
    assert math.isnan(RankingMeter(3, INDPTR, ITEMS, N_ITEMS).compute()["hr@3"])
    wide = RankingMeter(3, INDPTR, ITEMS, N_ITEMS)
    wide.update(scores, targets)
    assert wide.compute() == pytest.approx({"hr@3": 1.0, "ndcg@3": (0.5 + 1 + 1 / math.log2(3)) / 3})
    assert meter.confusion() is None


def test_the_held_out_item_is_ranked_even_if_seen_and_item_zero_is_a_miss():
    scores = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0.0], [9.0, 1.0, 1.0, 1.0, 1.0]])
    meter = RankingMeter(1, INDPTR, ITEMS, N_ITEMS)
    meter.update(scores, torch.tensor([[2, 2], [3, 0]]))  # user 2's own training item 2 is kept; item 0 held out
    assert meter.compute() == pytest.approx({"hr@1": 0.5, "ndcg@1": 0.5})


def test_stats_sum_across_meters_like_ranks():
    scores = torch.randn(3, N_ITEMS, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, 4], [2, 1], [3, 3]])
    whole, a, b = (RankingMeter(2, INDPTR, ITEMS, N_ITEMS) for _ in range(3))
    whole.update(scores, targets)
    a.update(scores[:2], targets[:2])
    b.update(scores[2:], targets[2:])
    merged = RankingMeter(2, INDPTR, ITEMS, N_ITEMS)
    merged.load_stats(a.stats() + b.stats())
    assert merged.compute() == pytest.approx(whole.compute())
    assert whole.stats().dtype == torch.float64 and whole.stats().shape == (3,)


def test_most_popular_on_a_tiny_example():
    train_items = torch.tensor([1, 2, 3, 2, 3, 3])  # popularity: 3 > 2 > 1 > 4 (0 ratings)
    users, items = torch.tensor([1, 2, 3]), torch.tensor([3, 1, 4])
    # user 1 (seen {1}): ranking 3, 2, 4 → item 3 at rank 0. user 2 (seen {2, 3}): 1, 4 → item 1 at rank 0.
    # user 3 (seen {}): 3, 2, 1, 4 → item 4 at rank 3.
    result = most_popular_baseline(train_items, N_ITEMS, users, items, INDPTR, ITEMS, k=2, batch_size=2)
    assert result == pytest.approx({"hr@2": 2 / 3, "ndcg@2": 2 / 3})


def test_negatives_avoid_seen_items_and_are_a_pure_function_of_seed_epoch_row():
    # User 1 has seen 3 of the 4 items, so most first draws collide and need redraws or the fallback.
    indptr, items = torch.tensor([0, 0, 3, 4]), torch.tensor([1, 2, 4, 3])
    users = torch.tensor([1] * 200 + [2] * 200)
    rows = torch.arange(1000, 1400)
    draw = negatives(users, rows, epoch=3, seed=7, n_items=5, seen_indptr=indptr, seen_items=items)
    assert draw.dtype == torch.int64 and draw.shape == (400,)
    assert torch.all(draw[:200] == 3)  # the only unseen item
    assert torch.all((draw[200:] >= 1) & (draw[200:] <= 4) & (draw[200:] != 3))
    assert set(draw[200:].tolist()) == {1, 2, 4}
    again = negatives(users, rows, epoch=3, seed=7, n_items=5, seen_indptr=indptr, seen_items=items)
    assert torch.equal(draw, again)
    # The same row in another batch (other position, other neighbours) draws the same item.
    alone = negatives(users[250:251], rows[250:251], 3, 7, 5, indptr, items)
    assert int(alone) == int(draw[250])


def test_negatives_change_with_the_epoch_and_the_seed():
    indptr, items = torch.tensor([0, 0, 2]), torch.tensor([3, 7])
    users, rows = torch.ones(500, dtype=torch.int64), torch.arange(500)
    a = negatives(users, rows, 0, 0, 100, indptr, items)
    assert not torch.equal(a, negatives(users, rows, 1, 0, 100, indptr, items))
    assert not torch.equal(a, negatives(users, rows, 0, 1, 100, indptr, items))
    assert not torch.isin(a, items).any() and a.min() >= 1 and a.max() <= 99
    counts = torch.bincount(a, minlength=100)[1:]
    assert counts.max() < 20  # roughly uniform over 97 items (expected ~5 each)


def test_negatives_raise_when_a_user_has_seen_every_item():
    with pytest.raises(DataError, match="seen all"):
        negatives(torch.tensor([1]), torch.tensor([0]), 0, 0, 3, torch.tensor([0, 0, 2]), torch.tensor([1, 2]))
