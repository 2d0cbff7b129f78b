"""Seeding: every generator a run draws from, and the process-global deterministic flag set both ways."""

from __future__ import annotations

import random

import numpy as np
import torch

from gradwise.train.rng import seed_everything


def test_seeding_repeats_every_generator_and_sets_the_deterministic_flag_both_ways():
    seed_everything(3)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        seed_everything(0, deterministic=False)  # a later run in the same process must not inherit it
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
