"""Tiny random causal LMs saved to local directories, with a byte-level BPE tokenizer trained on chat text.

A pretrained causal LM does not ship offline, so tests build their own: the architectures are the
library's (Llama, Qwen2, GPT-2), the weights random, the tokenizer small (vocabulary 512).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512


def train_tokenizer(directory: Path, texts: list[str]) -> None:
    """A byte-level BPE of ``VOCAB`` tokens trained on ``texts``, saved with ``<|endoftext|>`` as EOS (and no pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))


def chat_texts() -> list[str]:
    from gradwise.data.chat import bundled_conversations

    return [turn["content"] for conv in bundled_conversations() for turn in conv]


def save_tiny(kind: str, directory: Path, vocab: int = VOCAB, seed: int = 0) -> Path:
    """A random ``kind`` (llama, qwen2, gpt2) causal LM of ~100k parameters saved in ``directory``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    # Llama and Qwen2 at one size (grouped-query attention); Qwen2 ties its head to the embedding.
    decoder = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **common,
    }
    if kind == "llama":
        config = LlamaConfig(tie_word_embeddings=False, **decoder)
    elif kind == "qwen2":
        config = Qwen2Config(tie_word_embeddings=True, **decoder)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory))
    return directory


def make_model_dir(kind: str, directory: Path, texts: list[str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer(directory, texts if texts is not None else chat_texts())
    return save_tiny(kind, directory)
