"""The GPT: transformers' GPT-2 behind gradwise's interface, and a short training run on the stdlib corpus."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradwise.config import DataConfig, ModelConfig
from gradwise.data import DataInfo
from gradwise.data.corpus import load_corpus_dataset, unigram_perplexity
from gradwise.errors import ConfigError
from gradwise.models.gpt import GPTModel, build_gpt
from gradwise.models.transformer import TransformerModel
from gradwise.tasks.language_modeling import LanguageModelingTask

TINY = ModelConfig(name="gpt", n_layer=2, n_head=4, n_embd=64)


def corpus_info(vocab_size: int = 300, seq_len: int = 32) -> DataInfo:
    return DataInfo(
        kind="language_modeling",
        n_features=seq_len,
        image_shape=None,
        n_outputs=vocab_size,
        class_names=None,
        feature_names=["tokens"],
        target_name="next token",
        source="test",
        name="toy",
        vocab_size=vocab_size,
        pad_token_id=0,
    )


def tokens(batch: int = 3, length: int = 32, vocab_size: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_next_token_logits():
    torch.manual_seed(0)
    model = build_gpt(TINY, corpus_info())
    logits = model(tokens())
    assert type(logits) is torch.Tensor and logits.shape == (3, 32, 300)
    assert model(tokens(length=5)).shape == (3, 5, 300)  # shorter contexts are fine
    assert model.n_positions == 32


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_gpt(TINY, corpus_info()).eval()
    x = tokens(batch=1)
    changed = x.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 300
    a, b = model(x), model(changed)
    assert torch.allclose(a[0, :20], b[0, :20], atol=1e-6)
    assert not torch.allclose(a[0, 20:], b[0, 20:], atol=1e-3)


def test_config_reaches_the_library_model():
    model = build_gpt(ModelConfig(name="gpt", n_layer=3, n_head=2, n_embd=32, dropout=0.1), corpus_info(257, 16))
    config = model.hf.config
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head) == (257, 16, 32, 3, 2)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    assert config.eos_token_id == config.bos_token_id == 0 and config.pad_token_id is None
    assert model.hf.config._attn_implementation == "sdpa"


def test_transformer_protocol_and_tied_head():
    model = build_gpt(TINY, corpus_info())
    assert isinstance(model, TransformerModel) and isinstance(model, GPTModel)
    assert model.embeddings() is model.hf.transformer.wte
    blocks = model.blocks()
    assert len(blocks) == 2 and blocks[0] is model.hf.transformer.h[0]
    assert model.head is model.hf.lm_head and model.head.weight is model.embeddings().weight
    # wte 300·64 + wpe 32·64 + 2 blocks · (2·LN 128 + qkv 64·192+192 + proj 64·64+64 + fc 64·256+256 + out 256·64+64)
    # + final LN 128; the head shares wte.
    per_block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert sum(p.numel() for p in model.parameters()) == 300 * 64 + 32 * 64 + 2 * per_block + 128


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ConfigError, match=r"model.n_embd 64 must be divisible by model.n_head 5"):
        build_gpt(ModelConfig(name="gpt", n_layer=1, n_head=5, n_embd=64), corpus_info())


def test_gpt_needs_a_vocabulary():
    info = DataInfo(
        kind="classification",
        n_features=4,
        image_shape=None,
        n_outputs=3,
        class_names=["a", "b", "c"],
        feature_names=list("wxyz"),
        target_name="y",
        source="test",
        name="iris",
    )
    with pytest.raises(ConfigError, match=r"model\.name 'gpt' needs tokenized text; data 'iris'"):
        build_gpt(TINY, info)


def test_state_dict_holds_the_tied_weight_once_and_round_trips_through_safetensors(tmp_path: Path):
    torch.manual_seed(0)
    model = build_gpt(TINY, corpus_info())
    state = model.state_dict()
    assert "hf.transformer.wte.weight" in state and "hf.lm_head.weight" not in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    other = build_gpt(TINY, corpus_info())
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict
    assert other.head.weight is other.embeddings().weight
    x = tokens()
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    info = corpus_info()
    torch.manual_seed(0)
    plain = build_gpt(TINY, info)
    checkpointed = build_gpt(TINY.model_copy(update={"gradient_checkpointing": True}), info)
    checkpointed.load_state_dict(plain.state_dict())
    flag = (
        "is_activation_checkpointing"
        if hasattr(plain.hf, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(checkpointed.hf, flag) and not getattr(plain.hf, flag)
    x = tokens()
    for model in (plain, checkpointed):
        model.train()
        model(x).logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.slow
def test_a_short_training_run_beats_the_unigram_baseline(tmp_path: Path):
    """150 AdamW steps of a 2-layer GPT on 500 k characters of stdlib source (about 5 s on 2 CPU cores)."""
    data = load_corpus_dataset(
        DataConfig(name="python_source", corpus_chars=500_000, vocab_size=512, seq_len=64), seed=0, cache_root=tmp_path
    )
    baseline = unigram_perplexity(data.train, data.val, data.info.vocab_size)
    torch.manual_seed(0)
    model = build_gpt(TINY, data.info)
    task = LanguageModelingTask(data.info.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(150):
        batch = torch.randint(0, len(data.train), (32,), generator=gen)
        loss = task.loss(model(data.train.x[batch]), data.train.y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    meter = task.new_meter()
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.val), 64):
            meter.update(model(data.val.x[start : start + 64]), data.val.y[start : start + 64])
    metrics = meter.compute()
    print(f"val perplexity {metrics['perplexity']:.2f} vs unigram {baseline:.2f} ({elapsed:.1f} s)")
    assert math.isfinite(metrics["perplexity"])
    assert metrics["perplexity"] < 0.5 * baseline
