"""The CNN: reshaping, the conv/norm/pool stack, hand-counted parameters, and tabular data refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradwise.config import ModelConfig
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.models import CNN, build_model, count_parameters


def images(shape: tuple[int, int, int] = (1, 8, 8), n_outputs: int = 10) -> DataInfo:
    c, h, w = shape
    return DataInfo(
        kind="classification",
        n_features=c * h * w,
        image_shape=shape,
        n_outputs=n_outputs,
        class_names=[str(k) for k in range(n_outputs)],
        feature_names=[f"p{j}" for j in range(c * h * w)],
        target_name="digit",
        source="scikit-learn digits",
        name="digits",
    )


# channels [4, 6], kernel 3, 8×8 → pool → 4×4 → pool → 2×2, hidden 10, 10 classes:
# conv1 1·4·9 + 4 = 40; conv2 4·6·9 + 6 = 222; hidden 6·2·2·10 + 10 = 250; head 10·10 + 10 = 110.
PLAIN = 40 + 222 + 250 + 110


@pytest.mark.parametrize(("norm", "extra"), [("none", 0), ("batch", 2 * 4 + 2 * 6), ("layer", 2 * 4 + 2 * 6)])
def test_parameter_count_by_hand(norm: str, extra: int):
    cfg = ModelConfig(name="cnn", channels=[4, 6], kernel_size=3, hidden=[10], norm=norm)
    model = build_model(cfg, images())
    assert count_parameters(model) == PLAIN + extra
    assert model(torch.randn(5, 64)).shape == (5, 10)


def test_without_hidden_the_head_reads_the_flattened_features():
    model = build_model(ModelConfig(name="cnn", channels=[4, 6], hidden=[]), images())
    assert count_parameters(model) == 40 + 222 + (6 * 2 * 2 * 10 + 10)
    assert not any(isinstance(m, nn.Linear) for m in model.hidden.modules())


def test_block_layers_follow_the_config():
    cfg = ModelConfig(name="cnn", channels=[4, 6], hidden=[10], norm="batch", activation="silu", dropout=0.3)
    model = build_model(cfg, images())
    assert isinstance(model, CNN)
    for block in model.features:
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.SiLU, nn.MaxPool2d]
        assert block.conv.padding == "same"
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.3
    layer = build_model(ModelConfig(name="cnn", channels=[4], norm="layer"), images())
    norm = layer.features[0].norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
    plain = build_model(ModelConfig(name="cnn", channels=[4]), images())
    assert not any(isinstance(m, nn.Dropout | nn.BatchNorm2d | nn.GroupNorm) for m in plain.modules())


def test_pooling_stops_when_the_image_is_one_pixel():
    # 5×5 → 2×2 → 1×1, then the third block cannot pool any further.
    model = build_model(ModelConfig(name="cnn", channels=[2, 3, 4], hidden=[]), images((1, 5, 5), n_outputs=3))
    pools = [isinstance(block[-1], nn.MaxPool2d) for block in model.features]
    assert pools == [True, True, False]
    assert model.flat_size == 4
    assert model(torch.randn(2, 25)).shape == (2, 3)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_reshapes_flat_rows_into_multichannel_images():
    model = build_model(ModelConfig(name="cnn", channels=[3], kernel_size=2, hidden=[]), images((2, 4, 6), 4))
    x = torch.randn(3, 48)
    torch.testing.assert_close(model(x), model.head(model.features(x.reshape(3, 2, 4, 6)).flatten(1)))
    assert model(x).shape == (3, 4)


def test_cnn_on_tabular_data_is_a_config_error():
    wine = DataInfo(
        kind="classification",
        n_features=13,
        image_shape=None,
        n_outputs=3,
        class_names=["a", "b", "c"],
        feature_names=[f"f{j}" for j in range(13)],
        target_name="cultivar",
        source="scikit-learn wine",
        name="wine",
    )
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="cnn"), wine)
    assert str(err.value) == "model.name 'cnn' needs image-shaped data; data 'wine' is tabular (use model.name=mlp)"
