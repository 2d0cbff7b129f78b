"""Sampling: seeded determinism, greedy decoding, top-k, stopping at <|endoftext|> and context cropping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from gradwise.config import DataConfig, ModelConfig
from gradwise.data import DataInfo
from gradwise.data.corpus import EOT, load_corpus_dataset
from gradwise.errors import DataError
from gradwise.generate import generate
from gradwise.models.gpt import GPTModel, build_gpt

PROMPT = "def main("


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = DataConfig(name="python_source", corpus_chars=200_000, vocab_size=512, seq_len=16)
    info = load_corpus_dataset(cfg, seed=0, cache_root=tmp_path_factory.mktemp("cache")).info
    assert info.tokenizer_dir is not None
    return Path(info.tokenizer_dir)


@pytest.fixture(scope="module")
def model(tokenizer_dir: Path) -> GPTModel:
    info = DataInfo(
        kind="language_modeling",
        n_features=16,  # a short context, so 40 new tokens must crop it
        image_shape=None,
        n_outputs=512,
        class_names=None,
        feature_names=["tokens"],
        target_name="next token",
        source="test",
        vocab_size=512,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return build_gpt(ModelConfig(name="gpt", n_layer=2, n_head=4, n_embd=64), info)


class Scripted(nn.Module):
    """Always predicts ``table[last token]``: a model whose output is known in advance."""

    def __init__(self, table: dict[int, int], vocab_size: int) -> None:
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[0, -1, self.table[int(input_ids[0, -1])]] = 50.0
        return logits


def test_the_same_seed_gives_the_same_text_and_another_seed_another(model: GPTModel, tokenizer_dir: Path):
    first = generate(model, tokenizer_dir, PROMPT, 40, seed=1)
    assert first == generate(model, tokenizer_dir, PROMPT, 40, seed=1)
    assert first != generate(model, tokenizer_dir, PROMPT, 40, seed=2)
    assert first.startswith(PROMPT) and len(first) > len(PROMPT)


def test_greedy_ignores_the_seed_and_equals_top_1(model: GPTModel, tokenizer_dir: Path):
    greedy = generate(model, tokenizer_dir, PROMPT, 40, temperature=0.0, seed=1)
    assert greedy == generate(model, tokenizer_dir, PROMPT, 40, temperature=0.0, seed=2)
    assert greedy == generate(model, tokenizer_dir, PROMPT, 40, temperature=1.5, top_k=1, seed=3)
    assert greedy.startswith(PROMPT)


def test_context_is_cropped_to_n_positions_and_the_mode_restored(model: GPTModel, tokenizer_dir: Path):
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    long_prompt = "import os\nimport sys\n" * 10
    assert len(tokenizer.encode(long_prompt).ids) > model.n_positions
    model.train()
    text = generate(model, tokenizer_dir, long_prompt, 40, temperature=0.0)
    assert text.startswith(long_prompt) and model.training


def test_sampling_stops_at_endoftext_and_an_empty_prompt_starts_a_file(tokenizer_dir: Path):
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tokenizer.token_to_id(EOT)
    a, b = tokenizer.token_to_id("self"), tokenizer.token_to_id("Ġreturn")  # Ġ is byte-level BPE's space
    assert None not in (a, b)
    scripted = Scripted({eot: a, a: b, b: eot}, tokenizer.get_vocab_size())
    assert generate(scripted, tokenizer_dir, "", 100, seed=0) == "self return"
    # The prompt "self" ends in token a, so the script continues with b and stops.
    assert generate(scripted, tokenizer_dir, "self", 100, seed=0) == "self return"
    assert generate(scripted, tokenizer_dir, "", 1, seed=0) == "self"  # max_new_tokens bounds it
    assert generate(scripted, tokenizer_dir, "x", 0) == "x"


def test_bad_arguments_and_a_missing_tokenizer(model: GPTModel, tmp_path: Path, tokenizer_dir: Path):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer_dir, PROMPT, 5, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tokenizer_dir, PROMPT, 5, top_k=0)
    with pytest.raises(DataError, match=r"tokenizer.json: cannot load the tokenizer"):
        generate(model, tmp_path, PROMPT, 5)
