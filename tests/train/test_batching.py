"""Sampler order and resumption, batch-size schedules, LR scaling, step counts."""

from __future__ import annotations

import math

import pytest
import torch

from gradwise.config import BatchConfig
from gradwise.train.batching import BatchPlan, EpochSampler


def test_sampler_covers_each_epoch_once_in_a_new_order():
    sampler = EpochSampler(10, seed=3)
    first = torch.cat([sampler.take(4)[0] for _ in range(3)])
    assert sorted(first.tolist()) == list(range(10))
    assert sampler.epoch == 1 and sampler.cursor == 0
    second = torch.cat([sampler.take(4)[0] for _ in range(3)])
    assert sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()


def test_sampler_reports_epoch_end_and_short_last_batch():
    sampler = EpochSampler(10, seed=0)
    sizes = []
    ended = []
    for _ in range(3):
        indices, epoch_ended = sampler.take(4)
        sizes.append(len(indices))
        ended.append(epoch_ended)
    assert sizes == [4, 4, 2]
    assert ended == [False, False, True]


def test_sampler_resumes_mid_epoch_with_the_same_order():
    a = EpochSampler(17, seed=5)
    a.take(5)
    a.take(5)
    state = a.state_dict()
    rest_a = [a.take(5)[0].tolist() for _ in range(6)]
    b = EpochSampler(17, seed=5)
    b.load_state_dict(state)
    rest_b = [b.take(5)[0].tolist() for _ in range(6)]
    assert rest_a == rest_b


def test_different_seeds_give_different_orders():
    assert EpochSampler(50, 1).take(50)[0].tolist() != EpochSampler(50, 2).take(50)[0].tolist()


def test_full_batch_is_the_whole_training_set():
    plan = BatchPlan(BatchConfig(size="full"), n_train=123)
    assert plan.size(0, 0) == plan.size(99, 7) == 123
    assert plan.total_steps(epochs=40, max_steps=None) == 40


def test_ramp_and_epoch_table():
    ramp = BatchPlan(BatchConfig(size=64, ramp={"start": 16, "steps": 4}), n_train=1000)
    assert [ramp.size(s, 0) for s in range(6)] == [16, 28, 40, 52, 64, 64]
    table = BatchPlan(BatchConfig(size=16, at_epochs={2: 32, 4: 64}), n_train=1000)
    assert [table.size(0, e) for e in range(6)] == [16, 16, 32, 32, 64, 64]


def test_lr_scaling_rules():
    linear = BatchPlan(BatchConfig(size=32, lr_scaling="linear"), n_train=1000)
    root = BatchPlan(BatchConfig(size=32, lr_scaling="sqrt"), n_train=1000)
    none = BatchPlan(BatchConfig(size=32), n_train=1000)
    assert linear.lr_scale(128) == pytest.approx(4.0)
    assert root.lr_scale(128) == pytest.approx(2.0)
    assert linear.lr_scale(8) == pytest.approx(0.25)
    assert none.lr_scale(128) == 1.0


def test_total_steps_matches_what_the_sampler_takes():
    for cfg in (
        BatchConfig(size=7),
        BatchConfig(size=64, ramp={"start": 4, "steps": 30}),
        BatchConfig(size=8, at_epochs={1: 16, 2: 50}),
    ):
        plan = BatchPlan(cfg, n_train=101)
        sampler = EpochSampler(101, seed=0)
        steps = 0
        while sampler.epoch < 3:
            sampler.take(plan.size(steps, sampler.epoch))
            steps += 1
        assert plan.total_steps(epochs=3, max_steps=None) == steps
        assert plan.total_steps(epochs=3, max_steps=5) == 5
    assert BatchPlan(BatchConfig(size=7), 101).total_steps(3, None) == 3 * math.ceil(101 / 7)


def test_micro_batches_partition_the_step():
    plan = BatchPlan(BatchConfig(size=10, accumulate=3), n_train=100)
    chunks = plan.micro_batches(torch.arange(10))
    assert [len(c) for c in chunks] == [4, 3, 3]
    assert torch.cat(chunks).tolist() == list(range(10))
    assert len(plan.micro_batches(torch.arange(2))) == 2  # never an empty micro-batch


def test_smallest_micro_batch_counts_epoch_tails_and_accumulation():
    assert BatchPlan(BatchConfig(size=4), n_train=1257).smallest_micro_batch(1000) == 1  # 1257 = 314·4 + 1
    assert BatchPlan(BatchConfig(size=32), n_train=280).smallest_micro_batch(1000) == 24
    assert BatchPlan(BatchConfig(size=32, accumulate=4), n_train=280).smallest_micro_batch(1000) == 6
    ramp = BatchPlan(BatchConfig(size=64, ramp={"start": 2, "steps": 10}), n_train=1000)
    assert ramp.smallest_micro_batch(50) == 2
