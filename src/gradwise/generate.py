"""Sampling text from a trained language model, one token at a time.

Our own loop over the model's ``forward`` (token ids → logits) rather than
``transformers``' ``generate``: it works for any model that maps ``(B, L)``
ids to ``(B, L, V)`` logits, and its randomness is one seeded
``torch.Generator``, so a seed fixes the text on any device.

A Hugging Face causal LM (``hf_causal_lm`` runs) is sampled through its library body with the
key/value cache (:func:`generate_chat` for a conversation rendered with the run's chat template,
:func:`generate_hf` for a plain prompt), by the same seeded picking of the next token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from torch import nn

from gradwise.data.corpus import EOT
from gradwise.data.readers import first_line
from gradwise.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn.

    Attributes:
        max_new_tokens: Most tokens to sample.
        temperature: Divides the logits; 0 takes the most likely token every time (greedy).
        top_k: Sample among the ``top_k`` most likely tokens only; None samples from all.
        top_p: Sample among the most likely tokens whose probabilities sum to ``top_p`` (nucleus
            sampling, after ``top_k``); None or 1 samples from all.
        seed: Seeds the sampling generator: the same seed gives the same text.

    References:
        Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (top-p).
    """

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError for a negative ``max_new_tokens`` or ``temperature``, ``top_k`` < 1, ``top_p`` ∉ (0, 1]."""
        top_k, top_p = self.top_k, self.top_p
        if (
            self.max_new_tokens < 0
            or self.temperature < 0
            or (top_k is not None and top_k < 1)
            or (top_p is not None and not 0 < top_p <= 1)
        ):
            raise ValueError(
                f"need max_new_tokens ≥ 0, temperature ≥ 0, top_k ≥ 1 or None and 0 < top_p ≤ 1 or None; "
                f"got {self.max_new_tokens}, {self.temperature}, {top_k}, {top_p}"
            )


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
    *,
    top_p: float | None = None,
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
        top_p: Nucleus sampling: keep the most likely tokens whose probabilities sum to ``top_p``.

    Raises:
        DataError: ``tokenizer_dir`` holds no readable ``tokenizer.json``.
        ValueError: a negative ``max_new_tokens`` or ``temperature``, ``top_k`` below 1 or ``top_p`` ∉ (0, 1].
    """
    Sampling(max_new_tokens, temperature, top_k, top_p, seed).check()
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
            token = _pick(logits, temperature, top_k, top_p, generator)
            if token == eot_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(new)


@torch.no_grad()
def generate_chat(
    model: nn.Module,
    tokenizer_dir: Path,
    messages: Sequence[dict[str, str]],
    chat_template: str,
    sampling: Sampling,
    device: torch.device | None = None,
) -> str:
    """The assistant's reply to ``messages``, rendered with ``chat_template`` and the generation prompt.

    The conversation is rendered as the run's training examples were (the template's text, then
    tokenized without adding special tokens: the template holds them) and sampling stops at the
    tokenizer's EOS or any end token of the model's generation config, which is not part of the reply.

    Args:
        model: An ``hf_causal_lm`` model (its library model at ``body``) or a gradwise GPT (at ``hf``).
        tokenizer_dir: The run's Hugging Face tokenizer directory.
        messages: ``{"role", "content"}`` turns (system, user, assistant), the last one the user's.
        chat_template: The Jinja template the run's data were rendered with.
        sampling: How tokens are drawn.
        device: Where the model runs; default the device of its parameters.

    Raises:
        ConfigError: the template cannot render the conversation, or it is longer than the model reads.
        DataError: ``tokenizer_dir`` holds no loadable tokenizer.
    """
    sampling.check()
    tokenizer = _load_hf_tokenizer(Path(tokenizer_dir))
    try:
        text = tokenizer.apply_chat_template(
            list(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja raises its own errors (and raise_exception in templates)
        raise ConfigError(f"the run's chat template cannot render this conversation ({first_line(exc)})") from None
    ids = tokenizer(str(text), add_special_tokens=False, verbose=False)["input_ids"]
    new = _sample_cached(_library_model(model), ids, _end_ids(model, tokenizer), sampling, device)
    return tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate_hf(
    model: nn.Module, tokenizer_dir: Path, prompt: str, sampling: Sampling, device: torch.device | None = None
) -> str:
    """Continue ``prompt`` with a Hugging Face causal LM; returns the prompt plus the continuation.

    The prompt is tokenized as the library does by default (with its BOS, where the tokenizer adds
    one); sampling stops at an end token, as in :func:`generate_chat`.

    Raises:
        ConfigError: the prompt is longer than the model reads.
        DataError: ``tokenizer_dir`` holds no loadable tokenizer.
    """
    sampling.check()
    tokenizer = _load_hf_tokenizer(Path(tokenizer_dir))
    ids = tokenizer(prompt, verbose=False)["input_ids"]
    new = _sample_cached(_library_model(model), ids, _end_ids(model, tokenizer), sampling, device)
    return prompt + tokenizer.decode(new, skip_special_tokens=True)


def _sample_cached(
    body: nn.Module, ids: list[int], end_ids: set[int], sampling: Sampling, device: torch.device | None
) -> list[int]:
    """New tokens after ``ids``, one forward per token over the key/value cache, up to an end token."""
    limit = _context_limit(body)
    if not ids:
        raise ConfigError("the prompt is empty and the tokenizer adds no start token; give some text")
    if limit is not None and len(ids) >= limit:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the model reads at most {limit}")
    if device is None:
        device = next(body.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)  # on the CPU: the same text on every device
    step = torch.tensor([ids], dtype=torch.long, device=device)
    cache: Any = None
    keyword = _cache_keyword(body)
    new: list[int] = []
    was_training = body.training
    body.eval()
    try:
        for _ in range(sampling.max_new_tokens):
            if limit is not None and len(ids) + len(new) >= limit:
                break
            output = body(input_ids=step, use_cache=True, **{keyword: cache})
            cache = getattr(output, keyword)
            logits = output.logits[0, -1].float().cpu()
            token = _pick(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            if token in end_ids:
                break
            new.append(token)
            step = torch.tensor([[token]], dtype=torch.long, device=device)
    finally:
        body.train(was_training)
    return new


def _cache_keyword(body: nn.Module) -> str:
    """The forward's key/value cache argument and output: ``cache`` in recent transformers, else ``past_key_values``."""
    inner = body.get_base_model() if hasattr(body, "get_base_model") else body  # PEFT passes it through
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _library_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a gradwise one: ``HFCausalLM.body`` (a PEFT model with LoRA) or ``GPTModel.hf``."""
    for name in ("body", "hf"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    raise ConfigError(f"{type(model).__name__} is not a Hugging Face causal LM; it cannot be sampled this way")


def _end_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS and the end tokens the model's generation config names (an int or a list)."""
    ends = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    generation = getattr(_library_model(model), "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    if isinstance(configured, int):
        ends.add(configured)
    elif isinstance(configured, list | tuple):
        ends.update(int(i) for i in configured)
    return ends


def _context_limit(body: nn.Module) -> int | None:
    """Learned position tables (GPT-2's ``n_positions``) end; rotary models read past their nominal length."""
    config = getattr(body, "config", None)
    positions = getattr(config, "n_positions", None)
    return int(positions) if isinstance(positions, int) else None


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """The next token: argmax at temperature 0, else a sample from the tempered, top-k-, top-p-truncated softmax."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token once the more likely ones already hold top_p of the mass (the first always stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _load_hf_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # heavy import, only for Hugging Face models

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{directory}: cannot load the tokenizer ({first_line(exc)})") from None


def _load_tokenizer(directory: Path) -> Tokenizer:
    file = directory / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for a missing or malformed file
        raise DataError(f"{file}: cannot load the tokenizer ({exc})") from None
