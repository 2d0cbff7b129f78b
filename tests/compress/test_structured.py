"""Structured pruning: smaller MLP/CNN whose config rebuilds the same architecture."""

from __future__ import annotations

import pytest
import torch

from gradwise.compress.structured import prune_structured
from gradwise.config import ModelConfig
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.models import build_model, count_parameters

DIGITS = DataInfo(
    kind="classification",
    n_features=64,
    image_shape=(1, 8, 8),
    n_outputs=10,
    class_names=[str(k) for k in range(10)],
    feature_names=[f"p{j}" for j in range(64)],
    target_name="digit",
    source="scikit-learn digits",
    name="digits",
)


def build(**fields) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(**fields)
    return build_model(cfg, DIGITS), cfg


def rebuilt_matches(pruned: torch.nn.Module, new_cfg: ModelConfig) -> torch.nn.Module:
    fresh = build_model(new_cfg, DIGITS)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(7, 64)
    pruned.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    return fresh


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_mlp_loses_half_of_each_hidden_layer(norm: str):
    model, cfg = build(name="mlp", hidden=[64, 32], norm=norm, dropout=0.1)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, new_cfg = prune_structured(model, cfg, 0.5, torch.randn(2, 64))
    assert new_cfg.hidden == [32, 16]
    assert new_cfg.model_dump(exclude={"hidden"}) == cfg.model_dump(exclude={"hidden"})
    assert pruned.head.out_features == 10 and pruned.body[0].linear.in_features == 64
    # 64·32+32 + 32·16+16 + 16·10+10 = 2778 (+ norm scales and shifts) instead of 4138 (+ norm)
    extra = {"none": 0, "batch": 2 * 48, "layer": 2 * 48}[norm]
    assert count_parameters(pruned) == 2778 + extra < count_parameters(model)
    assert pruned.training  # the mode it was given, although tracing ran in eval mode
    rebuilt_matches(pruned, new_cfg)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # the input model is untouched


def test_mlp_keeps_the_units_with_the_largest_group_l1_norm():
    model, cfg = build(name="mlp", hidden=[8])
    with torch.no_grad():  # make the importance obvious: units 1, 4, 6, 7 are large in and out
        model.body[0].linear.weight.mul_(0.01)
        model.head.weight.mul_(0.01)
        for unit in (1, 4, 6, 7):
            model.body[0].linear.weight[unit] *= 100
            model.head.weight[:, unit] *= 100
    pruned, new_cfg = prune_structured(model, cfg, 0.5, torch.randn(2, 64))
    assert new_cfg.hidden == [4]
    assert torch.equal(pruned.body[0].linear.weight, model.body[0].linear.weight[[1, 4, 6, 7]])
    assert torch.equal(pruned.head.weight, model.head.weight[:, [1, 4, 6, 7]])


@pytest.mark.parametrize(("hidden", "norm"), [([40], "batch"), ([], "layer")])
def test_cnn_channels_and_hidden_fc_shrink(hidden: list[int], norm: str):
    model, cfg = build(name="cnn", channels=[16, 32], hidden=hidden, norm=norm)
    pruned, new_cfg = prune_structured(model, cfg, 0.5, torch.randn(2, 64))
    assert new_cfg.channels == [8, 16]
    assert new_cfg.hidden == ([20] if hidden else [])
    assert pruned.head.out_features == 10
    assert count_parameters(pruned) < count_parameters(model)
    rebuilt_matches(pruned, new_cfg)


def test_unsupported_models_and_amounts_are_config_errors():
    linear, cfg = build(name="linear")
    with pytest.raises(ConfigError, match=r"structured pruning supports model\.name mlp and cnn; got 'linear'"):
        prune_structured(linear, cfg, 0.5, torch.randn(2, 64))
    mlp, mlp_cfg = build(name="mlp", hidden=[4])
    for amount in (0.0, 1.0):
        with pytest.raises(ConfigError, match="0 < amount < 1"):
            prune_structured(mlp, mlp_cfg, amount, torch.randn(2, 64))
    with pytest.raises(ConfigError, match="would leave no unit"):
        prune_structured(mlp, mlp_cfg, 0.8, torch.randn(2, 64))
    bare, bare_cfg = build(name="mlp", hidden=[])
    with pytest.raises(ConfigError, match="no hidden layer"):
        prune_structured(bare, bare_cfg, 0.5, torch.randn(2, 64))
