"""Preference pairs for DPO-style tuning of a causal LM: a prompt, a chosen and a rejected completion.

A JSONL, Parquet or CSV file with ``prompt``, ``chosen`` and ``rejected`` columns. The prompt is a
text or a list of messages (then rendered with the chat template and its generation prompt); a
completion is a text or a list whose last message is the assistant's reply. Without
``data.path`` the bundled pairs come from chatterbot-corpus: the prompt is a conversation up to
its last reply, chosen is that real reply, rejected the last reply of another conversation
(drawn by a seeded derangement, never the same text).

Each pair becomes one example of two rows: inputs ``(2, L)`` (chosen, rejected) and targets
``(2, 1 + L)`` whose first column is the example's index in the whole data set (the preference
task looks its reference log-probabilities up by it) and the rest the next-token targets, -100
outside the completion.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from gradwise.config.kinds import DataSection
from gradwise.config.registry import Component
from gradwise.data.chat import (
    DEFAULT_CHAT_TEMPLATE,
    Example,
    bundled_conversations,
    chat_tokenizer,
    common_prefix_length,
    parse_messages,
)
from gradwise.data.files import available
from gradwise.data.packing import IGNORE_INDEX, shifted
from gradwise.data.readers import Table, detect_format, first_line, read_table
from gradwise.data.splits import split_indices
from gradwise.data.text import corpus_dir
from gradwise.data.types import DataInfo, Dataset, Split
from gradwise.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class PreferenceData(DataSection):
    """``preference``: prompt / chosen / rejected pairs (unset ``path``: pairs made from chatterbot-corpus).

    Pairs whose longer side exceeds ``max_length`` tokens are cut at the end (``overflow:
    truncate``: the completion loses its tail; a pair whose prompt alone fills ``max_length`` is left
    out) or left out (``drop``).
    """

    name: Literal["preference"] = "preference"
    path: Path | None = None
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: Annotated[int, Field(ge=4)] = 256
    overflow: Literal["truncate", "drop"] = "truncate"
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    yields: ClassVar[str] = "token_pairs"


Prompt = str | list[dict[str, str]]


def build_preference_dataset(cfg: PreferenceData, task_kind: str, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """Tokenize, split and lay out the pairs of ``cfg`` (see the module docstring for the layout).

    Raises:
        ConfigError: no tokenizer, or a task kind other than preference.
        DataError: a column is missing or a row is malformed (named by its line).
    """
    if task_kind not in ("auto", "preference"):
        raise ConfigError("data.name 'preference' makes chosen/rejected pairs; task.kind must be preference")
    tokenizer = chat_tokenizer(cfg, tokenizer_dir)  # type: ignore[arg-type]
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    pairs, source = read_pairs(cfg, seed)
    # Split the pairs first, so max_length and overflow never change which pairs validate and test.
    rows = split_indices(len(pairs), None, cfg.val_fraction, cfg.test_fraction, seed, source)
    pad = int(tokenizer.pad_token_id)
    counts = {"examples": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0}
    splits = []
    for chosen_rows in rows:
        kept, index = [], []
        for r in chosen_rows:
            prompt, chosen, rejected = pairs[r]
            where = f"pair {int(r) + 1}"
            sides = [tokenize_completion(tokenizer, template, prompt, c, where) for c in (chosen, rejected)]
            if max(len(side.ids) for side in sides) > cfg.max_length:
                if cfg.overflow == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                counts["truncated"] += 1
                sides = [Example(side.ids[: cfg.max_length], side.trained[: cfg.max_length]) for side in sides]
            if not all(any(side.trained[1:]) for side in sides):
                counts["dropped_no_target"] += 1
                continue
            kept.append((sides[0], sides[1]))
            index.append(int(r))  # the pair's place in the whole data: the reference table's row
        counts["examples"] += len(kept)
        splits.append(pair_split(kept, np.asarray(index, dtype=np.int64), pad))
    if len(splits[0]) == 0:
        raise DataError(f"{source}: no training pair keeps completion tokens within data.max_length {cfg.max_length}")
    train, val, test = splits
    stats = {**counts, "pairs_read": len(pairs), "layout": "pairs"}
    info = DataInfo(
        kind="preference",
        n_features=cfg.max_length,
        image_shape=None,
        n_outputs=len(tokenizer),
        class_names=None,
        feature_names=["chosen", "rejected"],
        target_name="preference",
        source=source,
        name=cfg.path.name if cfg.path is not None else "chatterbot-corpus preference pairs",
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        tokenizer_dir=str(tokenizer_dir),
        chat_template=template,
        text_stats=stats,
    )
    return Dataset(train=train, val=val, test=test, info=info)


def pair_split(pairs: list[tuple[Example, Example]], index: np.ndarray, pad: int) -> Split:
    """Pairs as inputs ``(N, 2, L)`` and targets ``(N, 2, 1 + L)`` (the example index, then the targets)."""
    shifted_pairs = [(shifted(c), shifted(r)) for c, r in pairs]
    width = max((len(side[0]) for pair in shifted_pairs for side in pair), default=1)
    x = torch.full((len(pairs), 2, width), pad, dtype=torch.int64)
    y = torch.full((len(pairs), 2, 1 + width), IGNORE_INDEX, dtype=torch.int64)
    for i, pair in enumerate(shifted_pairs):
        for j, (inputs, targets) in enumerate(pair):
            x[i, j, : len(inputs)] = torch.as_tensor(inputs, dtype=torch.int64)
            y[i, j, 1 : 1 + len(targets)] = torch.as_tensor(targets, dtype=torch.int64)
        y[i, :, 0] = int(index[i])
    lengths = torch.tensor([max(len(side[0]) for side in pair) for pair in shifted_pairs], dtype=torch.int64)
    return Split(x=x, y=y, lengths=lengths if len(pairs) else None, collate=trim_pair_targets if len(pairs) else None)


def trim_pair_targets(inputs: Any, targets: torch.Tensor, lengths: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Pair targets cut to their inputs' (dynamically padded) width, the index column kept."""
    return inputs, targets[..., : 1 + inputs.shape[-1]]


def tokenize_completion(
    tokenizer: PreTrainedTokenizerBase, template: str, prompt: Prompt, completion: Prompt, where: str = "a pair"
) -> Example:
    """Ids of prompt + completion and the mask of the completion's tokens.

    A conversational prompt is rendered with the chat template (the completion as the assistant's
    turn, ending with the template's end-of-turn); a text prompt is concatenated with the completion
    and EOS.
    """
    if isinstance(prompt, list):
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        try:
            before = str(
                tokenizer.apply_chat_template(
                    prompt, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            )
            full = str(tokenizer.apply_chat_template(prompt + reply, chat_template=template, tokenize=False))
        except Exception as exc:
            raise DataError(f"{where}: the chat template refuses this conversation ({first_line(exc)})") from None
        start = common_prefix_length(full, before)
    else:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        full, start = prompt + text + str(tokenizer.eos_token), len(prompt)
    # A rendered chat holds its template's special tokens; a plain prompt gets the tokenizer's own (BOS).
    encoded = tokenizer(
        full, add_special_tokens=not isinstance(prompt, list), return_offsets_mapping=True, verbose=False
    )
    # A token straddling the prompt's end and the completion's start (a folded space) belongs to the completion.
    trained = [end > start and end > 0 for _, end in encoded["offset_mapping"]]
    return Example(list(encoded["input_ids"]), trained)


def read_pairs(cfg: PreferenceData, seed: int) -> tuple[list[tuple[Prompt, Prompt, Prompt]], str]:
    """``(prompt, chosen, rejected)`` triples of ``cfg`` and their source."""
    if cfg.path is None:
        pairs = bundled_pairs(seed)
        return (pairs if cfg.limit is None else pairs[: cfg.limit]), f"chatterbot-corpus ({corpus_dir()})"
    fmt = detect_format(cfg.path, cfg.format)
    if fmt == "npz":
        raise DataError(f"{cfg.path}: preference data must be JSONL, Parquet or CSV, not NPZ")
    table = read_table(cfg.path, fmt)
    columns = []
    for field, role in ((cfg.prompt_field, "prompt"), (cfg.chosen_field, "chosen"), (cfg.rejected_field, "rejected")):
        if field not in table.names:
            raise DataError(
                f"{table.source}: no column {field!r} (data.{role}_field); available columns: {available(table.names)}"
            )
        columns.append(table.column(field))
    n = len(columns[0]) if cfg.limit is None else min(cfg.limit, len(columns[0]))
    triples = []
    for i in range(n):
        triples.append(
            tuple(_cell(columns[k][i], name, table, i) for k, name in enumerate(("prompt", "chosen", "rejected")))
        )
    return triples, table.source  # type: ignore[return-value]


def bundled_pairs(seed: int) -> list[tuple[Prompt, Prompt, Prompt]]:
    """Pairs from chatterbot-corpus: (conversation up to its last reply, that reply, another conversation's reply)."""
    prompts: list[list[dict[str, str]]] = []
    replies: list[str] = []
    for conversation in bundled_conversations():
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        prompts.append(conversation[:last])
        replies.append(conversation[last]["content"])
    # A rejected reply is another conversation's, shifted by a seeded permutation; a reply equal to the
    # chosen one (the corpus repeats some) moves on to the next candidate.
    rng = np.random.default_rng([seed, 13])
    order = rng.permutation(len(replies))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    pairs: list[tuple[Prompt, Prompt, Prompt]] = []
    for i, (prompt, chosen) in enumerate(zip(prompts, replies, strict=True)):
        step = 1
        rejected = replies[order[(position[i] + step) % len(order)]]
        while rejected == chosen and step < len(order):
            step += 1
            rejected = replies[order[(position[i] + step) % len(order)]]
        pairs.append((prompt, chosen, rejected))
    return pairs


def _cell(value: Any, column: str, table: Table, i: int) -> Prompt:
    if isinstance(value, (list, np.ndarray)) or (isinstance(value, str) and value.lstrip().startswith("[{")):
        where = f"column {column!r} {table.locate(i)}"
        if column == "prompt":
            return parse_messages(value, table.source, where, require_assistant=False)
        return _reply(value, column, table, i)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{table.source}: column {column!r} {table.locate(i)}: expected a text or a list of messages")
    return value


def _reply(value: Any, column: str, table: Table, i: int) -> str:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{table.source}: column {column!r} {table.locate(i)}: not a JSON list of messages ({exc.msg})"
            ) from None
    turns = list(value) if isinstance(value, (list, np.ndarray)) else []
    last = turns[-1] if turns else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise DataError(
            f"{table.source}: column {column!r} {table.locate(i)}: the last message must be the assistant's"
        )
    return last["content"]


COMPONENT = Component(PreferenceData, build_preference_dataset, "prompt / chosen / rejected pairs for DPO or IPO")
