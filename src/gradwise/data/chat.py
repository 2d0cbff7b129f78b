"""Chat, instruction and plain-text data for fine-tuning a causal language model.

Three layouts of a JSONL, Parquet or CSV file (detected from its columns, or set by ``data.layout``):

- ``messages``: a list of ``{"role", "content"}`` turns (system / user / assistant, multi-turn),
  rendered with the tokenizer's chat template (:data:`DEFAULT_CHAT_TEMPLATE` for a tokenizer
  that has none, e.g. a GPT trained by gradwise);
- ``prompt_completion``: a prompt and its completion, concatenated (the completion ends with EOS);
- ``text``: plain text for continued pre-training (every token is a target).

Without ``data.path`` the bundled data are the English conversations of the chatterbot-corpus
package: each conversation is a list of alternating turns, read as user / assistant.

Every example becomes token ids and, aligned with them, next-token targets: ``-100`` (ignored)
wherever the loss must not look — the prompt, the system and user turns, the template's own
markup before each reply — unless ``data.loss_on`` is ``all``. The assistant spans are found
without template-specific markers: the text rendered up to the start of a reply (with the
generation prompt) and up to its end (with the reply) bound it, and the tokenizer's character
offsets say which tokens fall inside.

Examples are split (by example, seeded) before they are laid out in rows: padded rows, packed
rows (:mod:`gradwise.data.packing`), or one row per batch (padding-free).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import yaml
from pydantic import Field

from gradwise.config.kinds import DataSection
from gradwise.config.registry import Component
from gradwise.data.files import available
from gradwise.data.packing import pack_split, padded_split
from gradwise.data.readers import Table, detect_format, first_line, read_table
from gradwise.data.splits import split_indices
from gradwise.data.text import corpus_dir, load_tokenizer
from gradwise.data.types import DataInfo, Dataset, Split
from gradwise.errors import ConfigError, DataError, GradwiseWarning

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# For tokenizers without a chat template: one header line per turn, EOS after each turn, so a
# fine-tuned model learns to stop where its reply ends.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

Layout = Literal["auto", "messages", "prompt_completion", "text"]
ROLES = ("system", "user", "assistant")


class ChatData(DataSection):
    """``chat``: conversations, prompt/completion pairs or plain text for supervised fine-tuning of a causal LM.

    ``path`` is a JSONL, Parquet or CSV file (unset: the bundled chatterbot-corpus conversations);
    ``layout`` which columns to read (auto: ``messages``, else ``prompt``+``completion``, else
    ``text``); examples over ``max_length`` tokens are cut (``overflow: truncate``) or left out
    (``drop``); ``loss_on`` ``assistant`` trains on reply/completion tokens only, ``all`` on every
    token; ``packing`` lays examples out one per padded row (``none``), several per row with
    attention that never crosses an example (``packed``), or all of a batch in one row
    (``padding_free``).
    """

    name: Literal["chat"] = "chat"
    path: Path | None = None
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    layout: Layout = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    max_length: Annotated[int, Field(ge=4)] = 512
    overflow: Literal["truncate", "drop"] = "truncate"
    loss_on: Literal["assistant", "all"] = "assistant"
    packing: Literal["none", "packed", "padding_free"] = "none"
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1

    yields: ClassVar[str] = "tokens"

    def batch_format(self) -> str:
        return "tokens" if self.packing == "none" else "packed_tokens"


class InstructData(ChatData):
    """``instruct``: ``chat`` reading prompt/completion pairs by default (the bundled ones: each conversation's
    first exchange)."""

    name: Literal["instruct"] = "instruct"  # type: ignore[assignment]
    layout: Layout = "prompt_completion"


@dataclass(frozen=True)
class Example:
    """One tokenized example: ids and the mask of tokens the loss trains on (same length)."""

    ids: list[int]
    trained: list[bool]


@dataclass(frozen=True)
class TokenStats:
    """What tokenizing did to the examples; recorded in the run's data record and summary."""

    examples: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int
    untrained_replies: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __add__(self, other: TokenStats) -> TokenStats:
        return TokenStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


def build_chat_dataset(cfg: ChatData, task_kind: str, seed: int, tokenizer_dir: Path | None) -> Dataset:
    """Tokenize, split and lay out ``cfg``'s examples for next-token training on their trained tokens.

    Raises:
        ConfigError: no model directory supplies a tokenizer, or the task kind is not language modeling.
        DataError: the file lacks the layout's columns, or a row is malformed (named by its line).
    """
    if task_kind not in ("auto", "language_modeling"):
        raise ConfigError(f"data.name {cfg.name!r} trains a causal language model; task.kind must be language_modeling")
    tokenizer = chat_tokenizer(cfg, tokenizer_dir)
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    records, source, layout, locate = read_examples(cfg)
    # Split the records before tokenizing, so max_length and overflow never change which examples
    # validate and test (only whether they are kept).
    rows = split_indices(len(records), None, cfg.val_fraction, cfg.test_fraction, seed, source)
    pad = int(tokenizer.pad_token_id)
    splits, kept, stats = [], [], TokenStats(0, 0, 0, 0, 0)
    for i, chosen in enumerate(rows):
        examples, counted = tokenize_examples(
            [records[r] for r in chosen], layout, tokenizer, template, cfg, lambda k, c=chosen: locate(int(c[k]))
        )
        stats = stats + counted
        kept.append(examples)
        if cfg.packing == "packed":
            splits.append(pack_split(examples, cfg.max_length, pad))
        else:
            # Padding-free batches only where they pay: training. Evaluation is the same on padded rows.
            splits.append(padded_split(examples, pad, padding_free=cfg.packing == "padding_free" and i == 0))
    if not kept[0]:
        raise DataError(f"{source}: no training example keeps a trained token within data.max_length {cfg.max_length}")
    if stats.untrained_replies:
        warnings.warn(
            f"{source}: {stats.untrained_replies} assistant replies could not be found in the chat template's "
            "rendering and are not trained on (the template renders them differently from the conversation)",
            GradwiseWarning,
            stacklevel=2,
        )
    train, val, test = splits
    prompts = SamplePrompts.of(kept[1][:64], tokenizer, template)
    info = DataInfo(
        kind="language_modeling",
        n_features=cfg.max_length,
        image_shape=None,
        n_outputs=len(tokenizer),
        class_names=None,
        feature_names=["tokens"],
        target_name="next_token",
        source=source,
        name=cfg.path.name if cfg.path is not None else "chatterbot-corpus conversations",
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        tokenizer_dir=str(tokenizer_dir),
        chat_template=template,
        text_stats={**stats.as_dict(), "layout": layout, "packing": cfg.packing, **_layout_stats(train)},
    )
    return Dataset(train=train, val=val, test=test, info=info, extras={"sample_prompts": prompts})


@dataclass(frozen=True)
class SamplePrompts:
    """Validation prompts (ids up to the first trained token) and their reference replies, for ``eval.samples``."""

    prompts: list[list[int]]
    references: list[str]
    texts: list[str]
    stop_ids: list[int]  # EOS and the template's own end-of-turn tokens
    decode: Any  # ids -> text (the tokenizer's decode)

    @classmethod
    def of(cls, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, template: str) -> SamplePrompts:
        prompts, references, texts = [], [], []
        for example in examples:
            first = next(i for i, keep in enumerate(example.trained) if keep and i > 0)
            end = next((i for i in range(first, len(example.ids)) if not example.trained[i]), len(example.ids))
            prompts.append(example.ids[:first])
            references.append(tokenizer.decode(example.ids[first:end], skip_special_tokens=True))
            texts.append(tokenizer.decode(example.ids[:first]))
        return cls(prompts, references, texts, stop_token_ids(tokenizer, template), tokenizer.decode)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """EOS and every special token the chat template writes (``<|im_end|>``, ``<|eot_id|>``…): a reply ends there."""
    ids = [int(tokenizer.eos_token_id)]
    for token in getattr(tokenizer, "all_special_tokens", []):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in template and isinstance(token_id, int) and token_id not in ids and token != tokenizer.bos_token:
            ids.append(token_id)
    return ids


def chat_tokenizer(cfg: ChatData | DataSection, tokenizer_dir: Path | None) -> PreTrainedTokenizerBase:
    if tokenizer_dir is None:
        raise ConfigError(
            f"data.name {cfg.name!r} is tokenized with the model's tokenizer; set model.name=hf_causal_lm and "
            "model.path to a local Hugging Face model directory"
        )
    tokenizer = load_tokenizer(tokenizer_dir, need_pad=False)
    if tokenizer.eos_token is None:
        raise ConfigError(f"model.path: the tokenizer in {tokenizer_dir} has no EOS token; replies could not end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are never attended to nor trained on
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"model.path: the tokenizer in {tokenizer_dir} is a slow (Python) tokenizer; chat data needs a fast "
            "one (tokenizer.json) for the character offsets that find assistant tokens"
        )
    return tokenizer


# --------------------------------------------------------------------------- reading


def read_examples(cfg: ChatData) -> tuple[list[Any], str, str, Callable[[int], str]]:
    """The examples of ``cfg`` as read (conversations, prompt/completion pairs or texts), their source, layout
    and where a user finds example ``i``."""
    if cfg.path is None:
        conversations = bundled_conversations()
        layout = "messages" if cfg.layout == "auto" else cfg.layout
        source = f"chatterbot-corpus ({corpus_dir()})"
        if layout == "messages":
            records: list[Any] = conversations
        elif layout == "prompt_completion":
            # A line break between the two, so the prompt's last word never merges with the reply's first.
            records = [(c[0]["content"] + "\n", c[1]["content"]) for c in conversations]
        else:
            records = ["\n".join(turn["content"] for turn in c) for c in conversations]
        return _limited(records, cfg), source, layout, lambda i: f"conversation {i + 1}"
    fmt = detect_format(cfg.path, cfg.format)
    if fmt == "npz":
        raise DataError(f"{cfg.path}: chat data must be JSONL, Parquet or CSV, not NPZ")
    table = read_table(cfg.path, fmt)
    layout = cfg.layout if cfg.layout != "auto" else _detect_layout(cfg, table)
    n = len(next(iter(table.columns.values())))
    keep = n if cfg.limit is None else min(n, cfg.limit)
    if layout == "messages":
        column = _column(table, cfg.messages_field, "data.messages_field")
        records = [parse_messages(column[i], table.source, table.locate(i)) for i in range(keep)]
    elif layout == "prompt_completion":
        prompts = _column(table, cfg.prompt_field, "data.prompt_field")
        completions = _column(table, cfg.completion_field, "data.completion_field")
        records = [
            (_text(prompts[i], cfg.prompt_field, table, i), _text(completions[i], cfg.completion_field, table, i))
            for i in range(keep)
        ]
    else:
        texts = _column(table, cfg.text_field, "data.text_field")
        records = [_text(texts[i], cfg.text_field, table, i) for i in range(keep)]
    return records, table.source, layout, table.locate


def bundled_conversations() -> list[list[dict[str, str]]]:
    """chatterbot-corpus's English conversations of two or more turns, as alternating user/assistant messages."""
    conversations: list[list[dict[str, str]]] = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for file in sorted(corpus_dir().glob("*.yml")):
        with file.open(encoding="utf-8") as handle:
            document = yaml.load(handle, Loader=loader) or {}
        for conversation in document.get("conversations") or []:
            turns = [t.strip() for t in conversation or [] if isinstance(t, str) and t.strip()]
            if len(turns) >= 2:
                roles = [ROLES[1 + i % 2] for i in range(len(turns))]
                conversations.append([{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)])
    return conversations


def parse_messages(value: Any, source: str, where: str, *, require_assistant: bool = True) -> list[dict[str, str]]:
    """A ``messages`` cell as a list of ``{"role", "content"}`` with known roles (and an assistant turn, unless
    ``require_assistant`` is off: a preference prompt ends before the reply).

    Raises:
        DataError: the cell is not such a list (named by ``where``).
    """
    if isinstance(value, str):  # CSV holds the list as JSON text
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{source}: {where}: messages is not a JSON list of {{role, content}}") from None
    if isinstance(value, np.ndarray):  # Parquet's list column
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: {where}: messages must be a non-empty list of {{role, content}}")
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or turn.get("role") not in ROLES:
            raise DataError(
                f"{source}: {where}: each message needs a role ({', '.join(ROLES)}) and a text content, "
                f"got {turn!r:.80}"
            )
        messages.append({"role": turn["role"], "content": turn["content"]})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{source}: {where}: the conversation has no assistant message to train on")
    return messages


def _detect_layout(cfg: ChatData, table: Table) -> str:
    names = table.names
    if cfg.messages_field in names:
        return "messages"
    if cfg.prompt_field in names and cfg.completion_field in names:
        return "prompt_completion"
    if cfg.text_field in names:
        return "text"
    raise DataError(
        f"{table.source}: no column {cfg.messages_field!r}, {cfg.prompt_field!r}+{cfg.completion_field!r} or "
        f"{cfg.text_field!r} (set data.layout and its field); available columns: {available(names)}"
    )


def _column(table: Table, name: str, role: str) -> np.ndarray:
    if name not in table.names:
        raise DataError(f"{table.source}: no column {name!r} ({role}); available columns: {available(table.names)}")
    return table.column(name)


def _text(value: Any, column: str, table: Table, i: int) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = "missing value" if value is None or isinstance(value, float) else f"{type(value).__name__!r} value"
        shown = "empty text" if isinstance(value, str) else shown
        raise DataError(f"{table.source}: column {column!r} {table.locate(i)}: {shown}, expected text")
    return value


def _limited(records: list[Any], cfg: ChatData) -> list[Any]:
    return records if cfg.limit is None else records[: cfg.limit]


# --------------------------------------------------------------------------- tokenizing


def tokenize_examples(
    records: Sequence[Any],
    layout: str,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    cfg: ChatData,
    locate: Callable[[int], str] = lambda i: f"example {i + 1}",
) -> tuple[list[Example], TokenStats]:
    """Token ids and trained-token masks of ``records``; too long ones truncated or dropped as ``cfg`` says.

    A token is trained when its characters overlap a trained span, so a token that straddles the
    prompt's end and the completion's start (a space folded into the first word) is trained.
    """
    texts, spans, missed = render(records, layout, tokenizer, template, locate)
    # A rendered chat holds its template's special tokens (BOS included where the template writes one);
    # plain prompt/completion and text get the tokenizer's own (BOS for Llama-like tokenizers).
    # verbose=False: examples longer than the model's context are cut below, not warned about one by one.
    encoded = tokenizer(texts, add_special_tokens=layout != "messages", return_offsets_mapping=True, verbose=False)
    examples: list[Example] = []
    truncated = too_long = no_target = 0
    for ids, offsets, trained_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans, strict=True):
        if cfg.loss_on == "all" or trained_spans is None:
            trained = [True] * len(ids)
        else:
            trained = [any(start < hi and end > lo for lo, hi in trained_spans) for start, end in offsets]
        if len(ids) > cfg.max_length:
            if cfg.overflow == "drop":
                too_long += 1
                continue
            ids, trained = ids[: cfg.max_length], trained[: cfg.max_length]
            truncated += 1
        if not any(trained[1:]):  # the first token is never a target (nothing predicts it)
            no_target += 1
            continue
        examples.append(Example(list(ids), trained))
    return examples, TokenStats(len(examples), truncated, too_long, no_target, missed)


def render(
    records: Sequence[Any],
    layout: str,
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    locate: Callable[[int], str] = lambda i: f"example {i + 1}",
) -> tuple[list[str], list[list[tuple[int, int]] | None], int]:
    """Each record as one text, the character spans of its trained part (None: all of it), and how many
    assistant replies no span could be found for."""
    eos = str(tokenizer.eos_token)
    texts: list[str] = []
    spans: list[list[tuple[int, int]] | None] = []
    missed = 0
    for i, record in enumerate(records):
        if layout == "messages":
            text, trained, lost = render_conversation(tokenizer, template, record, locate(i))
            missed += lost
        elif layout == "prompt_completion":
            prompt, completion = record
            text, trained = prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))]
        else:
            text, trained = record + eos, None
        texts.append(text)
        spans.append(trained)
    return texts, spans, missed


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]], where: str = "a conversation"
) -> tuple[str, list[tuple[int, int]], int]:
    """The conversation rendered with ``template``, the character span of every assistant reply, and the
    number of replies whose span could not be found.

    A reply's span runs from the end of the conversation rendered up to it with the generation
    prompt (the template's header for an assistant turn) to the end of the conversation rendered
    through it (the reply and the template's end-of-turn markup, so the model learns to stop).
    Common prefixes with the full text bound both ends. A template that renders an earlier reply
    differently once later turns follow (Qwen3's thinking blocks) breaks that: then the reply's
    own text is looked up in the full rendering after the previous span, with the end-of-turn
    token that follows it.

    Raises:
        DataError: the template refuses the conversation (a role it does not support, turns that
            do not alternate), naming ``where``.
    """

    def apply(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return str(
                tokenizer.apply_chat_template(
                    turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
                )
            )
        except Exception as exc:
            raise DataError(f"{where}: the chat template refuses this conversation ({first_line(exc)})") from None

    full = apply(messages, False)
    eos = str(tokenizer.eos_token)
    spans: list[tuple[int, int]] = []
    missed = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A conversation that opens with the assistant has no history to render: its reply starts at 0.
        before = apply(messages[:i], True) if i else ""
        through = apply(messages[: i + 1], False)
        start = common_prefix_length(full, before)
        end = common_prefix_length(full, through)
        if end <= start or not full[start:end].strip():
            found = full.find(message["content"], spans[-1][1] if spans else 0)
            if found < 0 or not message["content"]:
                missed += 1
                continue
            start, end = found, found + len(message["content"])
            if full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
    return full, spans, missed


def common_prefix_length(text: str, other: str) -> int:
    """How many leading characters ``text`` and ``other`` share."""
    return len(os.path.commonprefix([text, other]))  # noqa: RUF071 - characters are what is compared here


def _layout_stats(split: Split) -> dict[str, float]:
    """Tokens of the training split as laid out and, for packed rows, the share of padding in them."""
    if split.lengths is None or len(split.lengths) == 0:
        return {}
    real = int(split.lengths.sum())
    stats: dict[str, float] = {"train_rows": len(split.lengths), "train_tokens": real}
    if isinstance(split.x, dict):  # packed rows of a fixed width
        cells = int(split.y.numel())
        stats["row_padding_fraction"] = round(1 - real / cells, 4)
    return stats


_BUILD = "gradwise.data.chat:build_chat_dataset"
COMPONENTS: dict[str, Component] = {
    "chat": Component(ChatData, _BUILD, "conversations, prompt/completion pairs or text for causal-LM fine-tuning"),
    "instruct": Component(InstructData, _BUILD, "prompt/completion pairs for causal-LM fine-tuning"),
}
