"""Shared fixtures: a tiny BERT saved like a real model directory, and the bundled MiniLM loaded once."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch

from gradwise.config import ModelConfig
from gradwise.data import DataInfo
from gradwise.models.hf_encoder import HFEncoderClassifier, build_hf_encoder, bundled_minilm_dir

os.environ["HF_HUB_OFFLINE"] = "1"

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TINY_LAYERS = 3
TINY_HIDDEN = 16


def text_info(n_outputs: int = 3, vocab_size: int = 30522) -> DataInfo:
    return DataInfo(
        kind="classification",
        n_features=12,
        image_shape=None,
        n_outputs=n_outputs,
        class_names=[f"c{k}" for k in range(n_outputs)],
        feature_names=["text"],
        target_name="label",
        source="test",
        name="toy",
        vocab_size=vocab_size,
        pad_token_id=0,
    )


@pytest.fixture
def info() -> DataInfo:
    """The DataInfo of a 3-class text task, sized for the tiny BERT and MiniLM vocabularies."""
    return text_info()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer, 16-wide BERT with MiniLM's tokenizer, written by save_pretrained."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_minilm_dir() / name, directory / name)
    return directory


@pytest.fixture
def tiny(tiny_bert_dir: Path) -> HFEncoderClassifier:
    torch.manual_seed(0)
    return build_hf_encoder(ModelConfig(name="hf_encoder", path=tiny_bert_dir), text_info())


@pytest.fixture(scope="session")
def _minilm() -> HFEncoderClassifier:
    torch.manual_seed(0)
    return build_hf_encoder(ModelConfig(name="hf_encoder"), text_info())


@pytest.fixture
def minilm(_minilm: HFEncoderClassifier) -> HFEncoderClassifier:
    """A fresh copy of the bundled MiniLM classifier (loading from disk once per session)."""
    return copy.deepcopy(_minilm)
