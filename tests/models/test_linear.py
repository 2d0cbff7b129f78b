"""The linear model and parameter counting."""

from __future__ import annotations

import torch
from torch import nn

from gradwise.config import ModelConfig
from gradwise.data import DataInfo
from gradwise.models import LinearModel, build_model, count_parameters


def regression_info() -> DataInfo:
    return DataInfo(
        kind="regression",
        n_features=4,
        image_shape=None,
        n_outputs=1,
        class_names=None,
        feature_names=["a", "b", "c", "d"],
        target_name="y",
        source="test",
    )


def test_linear_is_one_affine_map_named_head():
    model = build_model(ModelConfig(name="linear"), regression_info())
    assert isinstance(model, LinearModel)
    assert [name for name, _ in model.named_parameters()] == ["head.weight", "head.bias"]
    x = torch.randn(6, 4)
    out = model(x)
    assert out.shape == (6, 1)
    torch.testing.assert_close(out, x @ model.head.weight.T + model.head.bias)


def test_count_parameters_includes_frozen_parameters_but_not_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # 15 + 6 parameters, 7 buffer elements
    assert count_parameters(model) == 21
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 21
    assert count_parameters(build_model(ModelConfig(name="linear"), regression_info())) == 5
