"""Frozen-feature caching: a head-only probe trains on features computed once, with the uncached run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradwise.config import read_yaml, validate
from gradwise.experiments.recipes import find_recipe
from gradwise.store.checkpoint import load_model_state
from gradwise.train.feature_cache import why_not_cached
from gradwise.train.loop import fit
from gradwise.train.setup import build_run


def probe(**sections) -> dict:
    raw = read_yaml(find_recipe("minilm-topics-probe"))
    small = {
        "data": {"limit": 240, "max_length": 24},
        "stop": {"epochs": 3},
        "schedule": {"warmup_steps": 2},
        "log": {"progress": False, "plots": False},
    }
    for key, value in {**small, **sections}.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == "train"]


@pytest.mark.slow
def test_a_cached_probe_trains_as_the_uncached_one(tmp_path: Path):
    cached = fit(validate(probe()), tmp_path / "cached")
    plain = fit(validate(probe(finetune={"cache_features": False})), tmp_path / "plain")
    assert cached["features_cached"] is True and "features_cached" not in plain
    assert cached["steps"] == plain["steps"] > 10
    # The same batches (length buckets included) and dropout draws: only the features' padding differs.
    ours, theirs = train_lines(tmp_path / "cached"), train_lines(tmp_path / "plain")
    assert [line["batch_size"] for line in ours] == [line["batch_size"] for line in theirs]
    assert [line["loss"] for line in ours] == pytest.approx([line["loss"] for line in theirs], abs=1e-5)
    for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        assert cached["final"][key] == pytest.approx(plain["final"][key], abs=1e-5), key
    head, other = (
        load_model_state(tmp_path / "cached" / "checkpoints" / "last"),
        load_model_state(tmp_path / "plain" / "checkpoints" / "last"),
    )
    assert head.keys() == other.keys()  # the checkpoint is the whole model's, as without the cache
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(head[name], other[name], atol=1e-5, rtol=0)
    assert all(torch.equal(head[k], other[k]) for k in head if k.startswith("body."))


def test_a_frozen_body_runs_as_at_inference_even_in_training_mode():
    parts = build_run(validate(probe(finetune={"cache_features": False}, data={"limit": 120})))
    model = parts.model
    model.train()
    rows = parts.data.train.x[:4]
    first, second = model.features(rows), model.features(rows)
    assert torch.equal(first, second)  # the body's dropout is off: its features do not change
    assert model.dropout.training  # the dropout before the head still follows train()


def test_the_cache_applies_only_where_the_body_is_frozen_and_deterministic():
    cfg = validate(probe())
    parts = build_run(cfg)
    assert parts.forward_module is not None and parts.data.train.x.dtype == torch.float32
    assert parts.data.train.x.shape[1] == 384
    for finetune, reason in (
        ({"cache_features": False}, "only finetune.head_only"),
        ({"head_only": False}, "only finetune.head_only"),
        ({"neftune_alpha": 5.0}, "NEFTune"),
    ):
        other = validate(probe(finetune=finetune))
        rebuilt = build_run(other)
        assert rebuilt.forward_module is None
        assert reason in why_not_cached(other, rebuilt.model, rebuilt.hooks, fully_shard=False)
