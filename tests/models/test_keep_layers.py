"""model.keep_layers: a smaller encoder initialised from chosen layers of the pretrained stack."""

from __future__ import annotations

import os

import pytest
import torch

from gradwise.config import ModelConfig, validate
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.hf_encoder import build_hf_encoder

os.environ["HF_HUB_OFFLINE"] = "1"

INFO = DataInfo(
    kind="classification",
    n_features=8,
    image_shape=None,
    n_outputs=3,
    class_names=["a", "b", "c"],
    feature_names=["text"],
    target_name="label",
    source="test",
    name="toy",
    vocab_size=30522,
    pad_token_id=0,
)
IDS = torch.tensor([[101, 2054, 2003, 1037, 3899, 102], [101, 7592, 2088, 102, 0, 0]])


@pytest.fixture(scope="module")
def full_and_small():
    full = build_hf_encoder(ModelConfig(name="hf_encoder"), INFO).eval()
    small = build_hf_encoder(ModelConfig(name="hf_encoder", keep_layers=[0, 2, 4]), INFO).eval()
    return full, small


def test_kept_layers_are_the_pretrained_layers(full_and_small):
    full, small = full_and_small
    assert len(small.blocks()) == 3 and len(full.blocks()) == 6
    assert small.body.config.num_hidden_layers == 3
    full_state, small_state = full.state_dict(), small.state_dict()
    layer_keys = [k for k in small_state if k.startswith("body.encoder.layer.")]
    assert {k.split(".")[3] for k in layer_keys} == {"0", "1", "2"}
    for new, old in zip((0, 1, 2), (0, 2, 4), strict=True):
        prefix = f"body.encoder.layer.{new}."
        keys = [k for k in layer_keys if k.startswith(prefix)]
        assert len(keys) == 16  # q, k, v, attention output, its LayerNorm, intermediate, output, its LayerNorm (w, b)
        for key in keys:
            torch.testing.assert_close(
                small_state[key], full_state[key.replace(prefix, f"body.encoder.layer.{old}.")], rtol=0, atol=0
            )
    for key, value in small_state.items():  # embeddings are the pretrained ones (the heads are new)
        if key.startswith("body.embeddings."):
            torch.testing.assert_close(value, full_state[key], rtol=0, atol=0)
    # One layer fewer per kept layer: 6 − 3 = 3 layers of 1,774,464 parameters each (hand count in test_hf_encoder).
    per_layer = 4 * (384 * 384 + 384) + 2 * 384 + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 384
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in small.parameters()) == 3 * per_layer


def test_the_small_encoder_runs_the_kept_layers_in_order(full_and_small):
    full, small = full_and_small
    mask = (IDS != 0).long()
    seen: list[tuple] = []
    # The embeddings' output and the attention mask as the full model hands them to its first layer.
    handle = full.body.encoder.layer[0].register_forward_pre_hook(lambda module, args: seen.append(args))
    with torch.no_grad():
        full.body(input_ids=IDS, attention_mask=mask)
        handle.remove()
        hidden, extended = seen[0][0], seen[0][1]
        for index in (0, 2, 4):
            hidden = full.body.encoder.layer[index](hidden, extended)
        expected = small.body(input_ids=IDS, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(expected, hidden, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, full.body(input_ids=IDS, attention_mask=mask).last_hidden_state, atol=1e-3)


def test_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.keep_layers: \[6\] out of range; .* 6 layers \(indices 0 to 5\)"):
        build_hf_encoder(ModelConfig(name="hf_encoder", keep_layers=[0, 6]), INFO)


def test_the_schema_checks_the_list():
    with pytest.raises(ConfigError, match="keep_layers"):
        validate({"model": {"name": "hf_encoder", "keep_layers": [2, 0]}, "data": {"name": "topics"}})
    with pytest.raises(ConfigError, match="keep_layers"):
        validate({"model": {"name": "mlp", "keep_layers": [0]}})
