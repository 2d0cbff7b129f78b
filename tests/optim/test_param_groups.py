from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradwise.config import OptimConfig
from gradwise.errors import ConfigError
from gradwise.optim.param_groups import DECOUPLED_WD_KEY, build_param_groups


def _model() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            [
                ("0", nn.Linear(3, 4)),
                ("norm", nn.LayerNorm((2, 2))),  # 2-D weight: exempt only because it is a norm module
                ("bn", nn.BatchNorm1d(4)),
                ("gn", nn.GroupNorm(2, 4)),
                ("rms", nn.RMSNorm(4)),
                ("head", nn.Linear(4, 2)),
            ]
        )
    )


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_biases_1d_and_norm_params_get_no_decay():
    model = _model()
    groups = build_param_groups(model, OptimConfig(lr=0.1), 0.05, native_decoupled=False)
    by_name = _by_name(groups)
    assert model.norm.weight.ndim == 2
    decaying = sorted(n for n, g in by_name.items() if g[DECOUPLED_WD_KEY] > 0)
    assert decaying == ["0.weight", "head.weight"]
    assert {g["group_name"] for g in groups} == {"decay", "no_decay"}
    for name, g in by_name.items():
        assert g["penalize"] is (name in decaying)
        assert g["weight_decay"] == 0.0  # torch's coupled decay stays off
        assert g["lr"] == g["base_lr"] == 0.1


def test_native_decoupled_puts_decay_in_torch_weight_decay():
    groups = build_param_groups(_model(), OptimConfig(), 0.05, native_decoupled=True)
    by_name = _by_name(groups)
    assert by_name["0.weight"]["weight_decay"] == 0.05
    assert by_name["0.weight"][DECOUPLED_WD_KEY] == 0.0
    assert by_name["0.bias"]["weight_decay"] == 0.0


def test_everything_decays_when_exemption_is_off():
    model = _model()
    groups = build_param_groups(model, OptimConfig(no_decay_bias_norm=False), 0.05, native_decoupled=False)
    assert len(groups) == 1
    assert groups[0]["group_name"] == "decay"
    assert groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert groups[0][DECOUPLED_WD_KEY] == 0.05


def test_frozen_params_are_left_out_and_names_match_tensors():
    model = _model()
    model.head.weight.requires_grad_(False)
    groups = build_param_groups(model, OptimConfig(), 0.0, native_decoupled=False)
    params = dict(model.named_parameters())
    names = [n for g in groups for n in g["param_names"]]
    assert "head.weight" not in names
    assert len(names) == len(params) - 1
    for g in groups:
        assert all(p is params[n] for p, n in zip(g["params"], g["param_names"], strict=True))


def test_lr_multipliers_first_match_wins():
    cfg = OptimConfig(lr=0.01, lr_multipliers={"head.bias": 0.5, "head.*": 10.0})
    groups = build_param_groups(_model(), cfg, 0.1, native_decoupled=False)
    by_name = _by_name(groups)
    assert by_name["head.weight"]["lr"] == pytest.approx(0.1)
    assert by_name["head.weight"]["base_lr"] == pytest.approx(0.1)
    assert by_name["head.bias"]["lr"] == pytest.approx(0.005)
    assert by_name["0.weight"]["lr"] == pytest.approx(0.01)
    assert by_name["head.weight"]["group_name"] == "decay*10 head.*"
    assert by_name["head.bias"]["group_name"] == "no_decay*0.5 head.bias"
    assert by_name["head.weight"][DECOUPLED_WD_KEY] == 0.1
    assert by_name["head.bias"][DECOUPLED_WD_KEY] == 0.0


def test_empty_groups_are_dropped():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    groups = build_param_groups(model, OptimConfig(), 0.1, native_decoupled=False)
    assert [g["group_name"] for g in groups] == ["decay"]


def test_bad_pattern_names_the_pattern_and_shows_names():
    model = nn.Sequential(OrderedDict([("0", nn.Linear(2, 3)), ("head", nn.Linear(3, 1))]))
    cfg = OptimConfig(lr_multipliers={"head.*": 2.0, "hed.*": 10.0})
    with pytest.raises(ConfigError) as info:
        build_param_groups(model, cfg, 0.0, native_decoupled=False)
    assert str(info.value) == (
        "optim.lr_multipliers: pattern 'hed.*' matches no parameter "
        "(names look like: 0.weight, 0.bias, head.weight, ...)"
    )


def test_torch_accepts_the_groups_with_names():
    groups = build_param_groups(_model(), OptimConfig(lr_multipliers={"head.*": 3.0}), 0.1, native_decoupled=True)
    opt = torch.optim.AdamW(groups)
    saved = opt.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == [g["param_names"] for g in groups]
    assert all(g["decoupled_weight_decay"] is True for g in opt.param_groups)  # AdamW's own flag untouched
