"""Sampling text from a trained language model, one token at a time.

Our own loop over the model's ``forward`` (token ids → logits) rather than
``transformers``' ``generate``: it works for any model that maps ``(B, L)``
ids to ``(B, L, V)`` logits, and its randomness is one seeded
``torch.Generator``, so a seed fixes the text on any device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from gradwise.data.corpus import EOT
from gradwise.errors import DataError


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer_dir: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    device: torch.device | None = None,
) -> str:
    """Continue ``prompt`` by sampling up to ``max_new_tokens`` tokens; returns the prompt plus the continuation.

    The context always begins with ``<|endoftext|>``, the separator that precedes
    every file in training, so a prompt reads as the start of a file (an empty
    prompt samples a file from its first token). Sampling stops early at the
    next ``<|endoftext|>``, which is not part of the text returned. The context
    is cropped to the model's ``n_positions`` (its last tokens) when it grows
    longer. The model runs in eval mode; its mode is restored afterwards.

    Args:
        model: Maps int64 ids ``(1, L)`` to logits ``(1, L, V)``; an ``n_positions`` attribute bounds ``L``.
        tokenizer_dir: Directory holding the ``tokenizer.json`` the model was trained with.
        prompt: Text to continue.
        max_new_tokens: Most tokens to sample.
        temperature: Divides the logits; 0 takes the most likely token every time (greedy).
        top_k: Sample among the ``top_k`` most likely tokens only; None samples from all.
        seed: Seeds the sampling generator: the same seed gives the same text.
        device: Where the model runs; default the device of its parameters.

    Raises:
        DataError: ``tokenizer_dir`` holds no readable ``tokenizer.json``.
        ValueError: a negative ``max_new_tokens`` or ``temperature``, or ``top_k`` below 1.
    """
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"need max_new_tokens ≥ 0, temperature ≥ 0 and top_k ≥ 1 or None; "
            f"got {max_new_tokens}, {temperature}, {top_k}"
        )
    tokenizer = _load_tokenizer(Path(tokenizer_dir))
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise DataError(f"{Path(tokenizer_dir) / 'tokenizer.json'}: has no {EOT} token")
    if device is None:
        device = next(model.parameters()).device
    window = getattr(model, "n_positions", None)
    # Sampling happens on the CPU so that a seed gives the same text on every device.
    generator = torch.Generator().manual_seed(seed)
    ids = [eot_id, *tokenizer.encode(prompt).ids]
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = ids[-window:] if window else ids
            logits = model(torch.tensor([context], dtype=torch.long, device=device))[0, -1].float().cpu()
            token = _pick(logits, temperature, top_k, generator)
            if token == eot_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(new)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a sample from the tempered, top-k-truncated softmax."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _load_tokenizer(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise DataError(f"{file}: cannot load the tokenizer ({exc})") from None
