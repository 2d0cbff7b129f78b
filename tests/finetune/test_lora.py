"""LoRA through PEFT: hand-counted trainable parameters, merge equivalence and an adapter round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradwise.config import LoraConfig, ModelConfig
from gradwise.errors import CheckpointError, ConfigError
from gradwise.finetune import apply_lora, count_trainable, is_lora, load_adapter, merge_lora, save_adapter
from gradwise.models.hf_encoder import build_hf_encoder


def token_batch() -> torch.Tensor:
    return torch.tensor([[101, 2054, 2003, 1037, 3899, 102], [101, 7592, 2088, 102, 0, 0]])


def randomize_adapters(model: nn.Module) -> None:
    # lora_B starts at zero, so an untrained adapter changes nothing; give it weights to compare.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_minilm_trainable_count_by_hand(minilm):
    apply_lora(minilm, LoraConfig(r=8, target_modules=["query", "value"]))
    # 6 layers × 2 Linear(384 → 384) × r·(in + out), plus the head 384·3 + 3
    adapters = 6 * 2 * 8 * (384 + 384)
    assert count_trainable(minilm) == adapters + 384 * 3 + 3 == 74_883
    names = {n for n, p in minilm.named_parameters() if p.requires_grad}
    assert names - {"head.weight", "head.bias"} == {
        f"body.base_model.model.encoder.layer.{k}.attention.self.{m}.lora_{ab}.default.weight"
        for k in range(6)
        for m in ("query", "value")
        for ab in "AB"
    }


def test_mixed_widths_are_counted_per_linear(tiny):
    # intermediate.dense is 16 → 32 and output.dense 32 → 16 (attention.output.dense, 16 → 16, also ends in "dense").
    apply_lora(tiny, LoraConfig(r=4, target_modules=["intermediate.dense", "key"]))
    expected = 3 * (4 * (16 + 32) + 4 * (16 + 16)) + (16 * 3 + 3)
    assert count_trainable(tiny) == expected
    assert is_lora(tiny)


def test_unknown_target_lists_the_linear_modules(tiny):
    with pytest.raises(ConfigError, match=r"target_modules: no Linear module named 'q_proj'.*query, key, value, dense"):
        apply_lora(tiny, LoraConfig(target_modules=["q_proj"]))
    assert not is_lora(tiny)


def test_a_training_step_moves_only_adapters_and_head(tiny):
    apply_lora(tiny, LoraConfig(r=2, dropout=0.0))
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    optimizer = torch.optim.SGD([p for p in tiny.parameters() if p.requires_grad], lr=0.5)
    torch.nn.functional.cross_entropy(tiny(token_batch()), torch.tensor([0, 1])).backward()
    optimizer.step()
    changed = {n for n, p in tiny.named_parameters() if not torch.equal(p, before[n])}
    # lora_A gets no gradient while lora_B is still zero, so the first step moves B and the head only.
    assert changed and all("lora_B" in n or n.startswith("head.") for n in changed)
    assert {n for n in changed if n.startswith("head.")} == {"head.weight", "head.bias"}


def test_merged_model_computes_the_same_outputs_with_plain_names(minilm):
    plain_names = [n for n, _ in minilm.named_parameters()]
    apply_lora(minilm, LoraConfig(r=4, dropout=0.0))
    randomize_adapters(minilm)
    minilm.eval()
    ids = token_batch()
    with torch.no_grad():
        adapted = minilm(ids)
        with minilm.body.disable_adapter():
            base = minilm(ids)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do change the function
    merge_lora(minilm)
    assert not is_lora(minilm)
    assert [n for n, _ in minilm.named_parameters()] == plain_names
    with torch.no_grad():
        torch.testing.assert_close(minilm(ids), adapted, atol=1e-5, rtol=0)


def test_adapter_round_trip(tiny_bert_dir, tiny, tmp_path, info):
    apply_lora(tiny, LoraConfig(r=2, alpha=8.0, dropout=0.0))
    randomize_adapters(tiny)
    tiny.eval()
    ids = token_batch()
    with torch.no_grad():
        expected = tiny(ids)
    out = tmp_path / "adapter"
    save_adapter(tiny, out)
    assert {"adapter_model.safetensors", "adapter_config.json", "head.safetensors"} <= {f.name for f in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 8.0)
    assert set(load_file(str(out / "head.safetensors"))) == {"weight", "bias"}
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)  # adapters only, not the 1M frozen body weights

    torch.manual_seed(123)  # a different fresh head, overwritten by the saved one
    fresh = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_bert_dir), info)
    load_adapter(fresh, out)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, atol=0, rtol=0)
    assert count_trainable(fresh) == 16 * 3 + 3  # adapters loaded frozen, for inference; the head as built

    save_adapter(tiny, out)  # overwriting an existing adapter directory is allowed
    again = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_bert_dir), info)
    load_adapter(again, out, trainable=True)
    assert count_trainable(again) == count_trainable(tiny)


def test_loading_a_missing_or_foreign_adapter_is_a_checkpoint_error(tiny, tmp_path):
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_adapter(tiny, tmp_path)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_adapter(tiny, tmp_path / "x")
