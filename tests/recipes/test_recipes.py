"""Every shipped recipe validates, and the main ones meet their quality bars when trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradwise.config import read_yaml, validate
from gradwise.experiments.recipes import list_recipes
from gradwise.experiments.variants import run_variants, variant_configs
from gradwise.store.checkpoint import load_model_state
from gradwise.train.loop import fit

RECIPES = {recipe.name: recipe.path for recipe in list_recipes() if recipe.command == "train"}
QUIET = {"log": {"progress": False, "plots": False}}


def train_recipe(name: str, tmp_path: Path, **overrides) -> dict:
    raw = read_yaml(RECIPES[name])
    for section, values in {**QUIET, **overrides}.items():
        raw[section] = {**raw.get(section, {}), **values}
    return fit(validate(raw, source=name), tmp_path / name)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_validates_with_its_variants(name: str):
    raw = read_yaml(RECIPES[name])
    cfg = validate(raw, source=name)
    assert raw.get("description"), f"{name} needs a one-line description for `gradwise recipes`"
    if cfg.variants:
        assert set(variant_configs(raw, name)) == set(cfg.variants)


def test_required_recipes_ship():
    assert {"digits-cnn", "digits-mlp", "linear-gd-vs-sgd", "breast-cancer-l1l2", "optimizer-tour"} <= set(RECIPES)


@pytest.mark.slow
def test_digits_mlp_reaches_95_percent(tmp_path: Path):
    summary = train_recipe("digits-mlp", tmp_path)
    assert summary["final"]["test_accuracy"] >= 0.95


@pytest.mark.slow
def test_breast_cancer_with_l1_l2_and_early_stopping(tmp_path: Path):
    summary = train_recipe("breast-cancer-l1l2", tmp_path)
    assert summary["final"]["test_accuracy"] >= 0.95


@pytest.mark.slow
def test_linear_regression_recovers_slope_and_intercept_with_gd_and_sgd(tmp_path: Path):
    raw = read_yaml(RECIPES["linear-gd-vs-sgd"])
    raw.update(out_dir=str(tmp_path), **QUIET)
    parent = run_variants(raw, validate(raw), "linear-gd-vs-sgd", "linear")
    for variant in ("gd", "sgd"):
        weights = load_model_state(parent / variant / "checkpoints" / "best")
        (w_key,) = [k for k in weights if k.endswith("weight")]
        (b_key,) = [k for k in weights if k.endswith("bias")]
        assert float(weights[w_key]) == pytest.approx(2.0, abs=0.05), variant
        assert float(weights[b_key]) == pytest.approx(1.0, abs=0.05), variant
    rows = json.loads((parent / "comparison.json").read_text())
    gd, sgd = rows
    assert gd["steps"] == 300  # one step per epoch: full-batch gradient descent
    assert sgd["steps"] == 20 * 140  # batch 1: one step per training example
