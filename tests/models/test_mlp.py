"""The MLP: layer order, optional norm/dropout, output shape and a hand-counted parameter total."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.config import ModelConfig
from gradwise.data import DataInfo
from gradwise.models import MLP, build_model, count_parameters


def tabular(n_features: int = 10, n_outputs: int = 3) -> DataInfo:
    return DataInfo(
        kind="classification",
        n_features=n_features,
        image_shape=None,
        n_outputs=n_outputs,
        class_names=[str(k) for k in range(n_outputs)],
        feature_names=[f"f{j}" for j in range(n_features)],
        target_name="y",
        source="test",
        name="toy",
    )


# 10 → 8 → 4 → 3: (10·8 + 8) + (8·4 + 4) + (4·3 + 3) = 88 + 36 + 15
PLAIN = 139


@pytest.mark.parametrize(("norm", "extra"), [("none", 0), ("batch", 2 * 8 + 2 * 4), ("layer", 2 * 8 + 2 * 4)])
def test_parameter_count_by_hand(norm: str, extra: int):
    model = build_model(ModelConfig(name="mlp", hidden=[8, 4], norm=norm), tabular())
    assert count_parameters(model) == PLAIN + extra


def test_blocks_are_linear_norm_activation_dropout_then_head():
    cfg = ModelConfig(name="mlp", hidden=[8, 4], norm="batch", activation="gelu", dropout=0.25)
    model = build_model(cfg, tabular())
    assert isinstance(model, MLP)
    for block, width in zip(model.body, [8, 4], strict=True):
        assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Dropout]
        assert block.linear.out_features == width and block.dropout.p == 0.25
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 3
    assert {"head.weight", "head.bias", "body.0.linear.weight", "body.0.norm.weight"} <= {
        name for name, _ in model.named_parameters()
    }


def test_layer_norm_and_no_dropout_when_zero():
    model = build_model(ModelConfig(name="mlp", hidden=[8], norm="layer", activation="tanh"), tabular())
    assert [type(m) for m in model.body[0]] == [nn.Linear, nn.LayerNorm, nn.Tanh]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    plain = build_model(ModelConfig(name="mlp", hidden=[8]), tabular())
    assert not any(isinstance(m, nn.BatchNorm1d | nn.LayerNorm) for m in plain.modules())


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu", "leaky_relu"])
def test_output_shape(activation: str):
    model = build_model(ModelConfig(name="mlp", hidden=[16, 8], activation=activation), tabular(n_outputs=5))
    assert model(torch.randn(7, 10)).shape == (7, 5)


def test_no_hidden_layers_is_a_linear_map():
    model = build_model(ModelConfig(name="mlp", hidden=[]), tabular())
    assert count_parameters(model) == 10 * 3 + 3
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), x @ model.head.weight.T + model.head.bias)
