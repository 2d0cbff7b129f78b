"""A decoder-only transformer trained from scratch: transformers' GPT-2, sized by the config, no hub.

The model is the library's ``GPT2LMHeadModel`` built from a ``GPT2Config``
(real, maintained code rather than a re-implementation); :class:`GPTModel`
only adapts it to gradwise's calling convention (token ids in, a logits tensor
out) and to the :class:`~gradwise.models.transformer.TransformerModel`
protocol that fine-tuning uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from gradwise.config.base import Fraction, PositiveInt
from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError
from gradwise.models.lazy_logits import ChunkedLoss, LazyLogits, chunking_applies, lazy_logits, use_chunked_loss

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel


class GPTModel(nn.Module):
    """``GPT2LMHeadModel`` as a plain module: ``forward(input_ids)`` returns logits ``(B, L, V)``.

    With ``chunked_loss`` a training forward returns :class:`~gradwise.models.lazy_logits.LazyLogits`
    instead (the final hidden states and the head), so the loss never materializes the logits;
    evaluation, generation and export still get the logits tensor.

    There is no attention mask: the training data are packed blocks with no
    padding, and ``<|endoftext|>`` (the pad id) separates documents inside a
    block, where it must stay visible. The input embedding and the output
    projection share one weight (tied), so freezing one freezes the other; the
    state dict holds it once (safetensors refuses tensors that share memory) and
    loading ties it again.

    Args:
        hf_model: The library model to wrap.
        chunked_loss: Return :class:`LazyLogits` from training forwards (see :func:`chunking_applies`).

    References:
        Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
        Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (chunked loss).
    """

    def __init__(self, hf_model: GPT2LMHeadModel, chunked_loss: bool = False) -> None:
        super().__init__()
        self.hf = hf_model
        self.chunked_loss = chunked_loss
        self.register_state_dict_post_hook(_drop_tied_weight)
        self.register_load_state_dict_pre_hook(_restore_tied_weight)

    @property
    def head(self) -> nn.Module:
        """The output projection ``lm_head`` (its weight is the token embedding's)."""
        return self.hf.lm_head

    @property
    def n_positions(self) -> int:
        """The longest context the position embeddings cover."""
        return int(self.hf.config.n_positions)

    def forward(self, input_ids: Tensor) -> Tensor | LazyLogits:
        """Next-token logits ``(B, L, V)`` for int64 token ids ``(B, L)``, ``L ≤ n_positions`` (lazy when chunked)."""
        if self.chunked_loss and chunking_applies(self, self.hf.lm_head):
            # GPT2LMHeadModel's forward is transformer → lm_head and nothing else; stop before the head.
            hidden = self.hf.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
            return lazy_logits(hidden, self.hf.lm_head)
        return self.hf(input_ids=input_ids, use_cache=False).logits

    def embeddings(self) -> nn.Module:
        """The token embedding ``wte`` (tied to :attr:`head`)."""
        return self.hf.transformer.wte

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks ``h[0] … h[n_layer-1]``, bottom first."""
        return list(self.hf.transformer.h)


_TIED = "hf.lm_head.weight"
_TIED_TO = "hf.transformer.wte.weight"


def _drop_tied_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if module.hf.lm_head.weight is module.hf.transformer.wte.weight:
        state_dict.pop(prefix + _TIED, None)


def _restore_tied_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if module.hf.lm_head.weight is module.hf.transformer.wte.weight and prefix + _TIED_TO in state_dict:
        state_dict.setdefault(prefix + _TIED, state_dict[prefix + _TIED_TO])


class GPTConfig(ModelSection):
    """``gpt``: a decoder-only transformer (GPT-2 blocks) trained from scratch on tokenized text.

    ``chunked_loss`` computes the training loss from the hidden states a chunk of tokens at a time,
    never holding the ``(tokens, vocab)`` logits (same numbers, about half the step's memory at
    GPT-2's vocabulary): ``auto`` (the default) from a vocabulary of 8192 tokens, or ``on``/``off``.
    Under FSDP the forward returns full logits whatever the setting.
    """

    name: Literal["gpt"] = "gpt"
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    dropout: Fraction = 0.0
    gradient_checkpointing: bool = False
    chunked_loss: ChunkedLoss = "auto"

    takes: ClassVar[tuple[str, ...]] = ("tokens",)
    body: ClassVar[bool] = True


def build_gpt(cfg: GPTConfig, info: DataInfo) -> GPTModel:
    """A GPT sized by ``cfg`` (layers, heads, width, dropout) and ``info`` (vocabulary, context length).

    The context length ``n_positions`` is ``info.n_features`` (``data.seq_len``).
    Attention uses PyTorch's fused ``scaled_dot_product_attention`` where the
    installed transformers supports it for GPT-2, else the eager implementation.

    Raises:
        ConfigError: ``model.n_embd`` is not divisible by ``model.n_head``, or the data is not tokenized text.
    """
    if cfg.n_embd % cfg.n_head != 0:
        raise ConfigError(
            f"model.n_embd {cfg.n_embd} must be divisible by model.n_head {cfg.n_head} "
            f"(each head gets n_embd / n_head dimensions)"
        )
    if info.vocab_size is None:
        label = info.name or info.source
        raise ConfigError(f"model.name 'gpt' needs tokenized text; data {label!r} has no vocabulary")
    # transformers takes seconds to import; only runs that build a GPT pay for it.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=info.vocab_size,
        n_positions=info.n_features,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        tie_word_embeddings=True,
        # GPT-2's own ids (50256) are outside a small vocabulary; ours is <|endoftext|>. No pad id:
        # nothing is padded, and with one set the library warns about every unmasked <|endoftext|>.
        bos_token_id=info.pad_token_id,
        eos_token_id=info.pad_token_id,
        pad_token_id=None,
        use_cache=False,
        attn_implementation="sdpa" if getattr(GPT2LMHeadModel, "_supports_sdpa", False) else "eager",
    )
    model = GPT2LMHeadModel(config)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works when the inputs need no gradient (token ids never do).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return GPTModel(model, chunked_loss=use_chunked_loss(cfg.chunked_loss, info.vocab_size))


COMPONENT = Component(GPTConfig, build_gpt, "decoder-only transformer (GPT-2 blocks) trained from scratch")
