"""Layer-wise LR decay: every parameter's optimizer-group LR equals lr · decay^depth, computed from its name."""

from __future__ import annotations

import re

import pytest

from gradwise.config import LoraConfig, OptimConfig
from gradwise.errors import ConfigError
from gradwise.finetune import apply_lora, layer_lr_multipliers
from gradwise.models import MLP
from gradwise.optim import build_optimizer

LR = 0.1


def expected_factor(name: str, n_layers: int, decay: float) -> float:
    """head → 1, layer.k (l = k + 1 from the bottom) → decay^(L − l + 1), embeddings → decay^(L + 1)."""
    if name.startswith("head."):
        return 1.0
    match = re.search(r"encoder\.layer\.(\d+)\.", name)
    if match:
        return decay ** (n_layers - (int(match.group(1)) + 1) + 1)
    assert ".embeddings." in name, name
    return decay ** (n_layers + 1)


def group_lrs(model, multipliers: dict[str, float]) -> dict[str, float]:
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=LR, lr_multipliers=multipliers), 0.01)
    return {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}


def test_minilm_patterns_by_hand(minilm):
    assert layer_lr_multipliers(minilm, 0.5) == {
        "body.embeddings.*": 0.5**7,
        "body.encoder.layer.0.*": 0.5**6,
        "body.encoder.layer.1.*": 0.5**5,
        "body.encoder.layer.2.*": 0.5**4,
        "body.encoder.layer.3.*": 0.5**3,
        "body.encoder.layer.4.*": 0.5**2,
        "body.encoder.layer.5.*": 0.5,
        "head.*": 1.0,
    }


@pytest.mark.parametrize("decay", [0.8, 0.5])
def test_every_parameter_gets_its_layer_lr_through_build_optimizer(minilm, decay):
    lrs = group_lrs(minilm, layer_lr_multipliers(minilm, decay))
    names = [n for n, _ in minilm.named_parameters()]
    assert set(lrs) == set(names)
    for name in names:
        assert lrs[name] == pytest.approx(LR * expected_factor(name, 6, decay), rel=1e-12), name
    assert lrs["body.encoder.layer.5.output.dense.weight"] == pytest.approx(LR * decay)
    assert lrs["body.embeddings.position_embeddings.weight"] == pytest.approx(LR * decay**7)


def test_decay_one_is_a_single_lr(tiny):
    assert set(group_lrs(tiny, layer_lr_multipliers(tiny, 1.0)).values()) == {LR}


def test_lora_names_keep_their_layer(tiny):
    apply_lora(tiny, LoraConfig(r=2, target_modules=["query", "value"]))
    multipliers = layer_lr_multipliers(tiny, 0.5)
    assert multipliers["body.base_model.model.encoder.layer.2.*"] == 0.5
    lrs = group_lrs(tiny, multipliers)  # only adapters and the head train
    assert lrs["body.base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"] == LR * 0.5**3
    assert lrs["head.weight"] == LR


def test_non_transformers_and_bad_decays_are_refused(tiny):
    with pytest.raises(ConfigError, match="needs a transformer"):
        layer_lr_multipliers(MLP(4, [3], 2), 0.9)
    with pytest.raises(ConfigError, match="layer_lr_decay"):
        layer_lr_multipliers(tiny, 0.0)
