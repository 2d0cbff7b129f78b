"""A pretrained Hugging Face causal language model from a local directory, fine-tuned as is.

Any architecture ``AutoModelForCausalLM`` knows (GPT-2, Llama, Qwen2, Mistral, Phi, …) loads
with ``local_files_only=True``: nothing is fetched. The wrapped model keeps the library's
module names under ``body.`` (``body.model.layers.0.self_attn.q_proj.weight``), so what is
saved exports back to Hugging Face format by dropping that prefix.

The forward takes the three token layouts gradwise's LM data make: padded rows ``(B, L)``
(right padding needs no mask: causal attention never looks ahead at it), packed rows
(``{"input_ids", "position_ids"}``, several examples per row, position ids restarting at each
one; attention stays inside each example), and pairs ``(B, 2, L)`` for preference tuning
(run as ``2B`` rows).

With ``chunked_loss`` a training forward on token rows returns
:class:`~gradwise.models.lazy_logits.LazyLogits` (the decoder's hidden states and the head) and
the language-modeling loss is computed chunk by chunk, never holding the logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from gradwise.config.kinds import ModelSection
from gradwise.config.registry import Component
from gradwise.data.readers import first_line
from gradwise.data.types import DataInfo
from gradwise.errors import ConfigError, GradwiseWarning
from gradwise.models.hf_encoder import enable_checkpointing, layer_list, quiet_transformers
from gradwise.models.lazy_logits import ChunkedLoss, LazyLogits, chunking_applies, lazy_logits, use_chunked_loss

# Architectures whose causal-LM forward is ``lm_head(decoder(...).last_hidden_state)`` and nothing more, so
# the chunked loss may stop before the head. Others scale or cap their logits (Gemma 2's soft-capping,
# Cohere's logit_scale, Granite's logits_scaling) and keep full logits.
PLAIN_HEAD_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3"})


class HFCausalLMConfig(ModelSection):
    """``hf_causal_lm``: a pretrained Hugging Face causal LM from a local directory (tokenizer, chat template too).

    ``dtype`` is the dtype the weights load in (``bfloat16`` halves the memory of a frozen base;
    trainable LoRA adapters stay fp32); ``attention`` picks the implementation (``auto``: flash
    attention 2 on CUDA where the flash-attn package is installed, else PyTorch's SDPA);
    ``load_in_4bit`` loads the frozen base in 4-bit NF4 through bitsandbytes for QLoRA
    (needs ``finetune.lora`` and a CUDA GPU). ``chunked_loss`` computes the language-modeling loss
    from the hidden states a chunk of tokens at a time, never holding the ``(tokens, vocab)`` logits:
    ``auto`` (the default) from a vocabulary of 8192 tokens, or ``on``/``off``; only for the
    architectures in ``PLAIN_HEAD_TYPES``. Preference pairs, FSDP and an adapter on the head keep
    full logits.
    """

    name: Literal["hf_causal_lm"] = "hf_causal_lm"
    path: Path
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    chunked_loss: ChunkedLoss = "auto"

    takes: ClassVar[tuple[str, ...]] = ("tokens", "packed_tokens", "token_pairs")
    body: ClassVar[bool] = True

    def pretrained_dir(self) -> Path:
        return self.path


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM ``body``; ``forward`` returns next-token logits in the layout of its input.

    Args:
        body: The ``AutoModelForCausalLM`` model.
        attention: The attention implementation it was loaded with; flash attention reads packed
            rows from ``position_ids`` alone (its variable-length path), the others get a
            block-diagonal causal mask.
        chunked_loss: Return :class:`LazyLogits` from training forwards on token rows (see
            :func:`~gradwise.models.lazy_logits.chunking_applies`).

    References:
        Radford et al. 2019 (GPT-2); Touvron et al. 2023 (Llama); Dao 2023, "FlashAttention-2";
        Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models" (chunked loss).
    """

    def __init__(self, body: nn.Module, attention: str, chunked_loss: bool = False) -> None:
        super().__init__()
        self.body = body
        self.attention = attention
        self.chunked_loss = chunked_loss
        # Tied weights (lm_head = embed_tokens) are saved once (safetensors refuses shared tensors) and tied on load.
        self.register_state_dict_post_hook(_drop_tied_copies)
        self.register_load_state_dict_pre_hook(_restore_tied_copies)

    def tied_names(self) -> list[list[str]]:
        """Groups of parameter names that are one tensor (first name kept in the state dict)."""
        groups: dict[int, list[str]] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        return [names for names in groups.values() if len(names) > 1]

    @property
    def head(self) -> nn.Module:
        """The output projection (``lm_head``; often tied to the token embedding)."""
        return self.body.get_output_embeddings()

    @property
    def config(self) -> Any:
        """The library model's config (``model_type``, ``vocab_size``, …)."""
        return self.body.config

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor | LazyLogits:
        """Logits ``(*lead, L, V)`` for token ids ``(*lead, L)`` or packed ``{"input_ids", "position_ids"}``.

        Lazy (:class:`LazyLogits`) when chunked, training, and the rows are ``(B, L)`` (not pairs).
        """
        if isinstance(inputs, Mapping):
            ids, positions = inputs["input_ids"], inputs.get("position_ids")
        else:
            ids, positions = inputs, None
        lead, length = ids.shape[:-1], ids.shape[-1]
        if ids.numel() == 0:
            # A rank's empty share of a short batch (DDP): one pad row keeps every parameter in the graph,
            # so the gradient all-reduce still sees each of them; its logits are dropped.
            logits = self.body(input_ids=ids.new_zeros((1, max(length, 1))), use_cache=False).logits[:0]
            return logits.reshape(*lead, length, logits.shape[-1])
        kwargs: dict[str, Tensor] = {}
        if positions is not None:
            positions = positions.reshape(-1, length)
            kwargs["position_ids"] = positions
            if self.attention != "flash_attention_2":
                kwargs["attention_mask"] = packed_attention_bias(positions, self._compute_dtype())
        decoder = self._decoder() if self.chunked_loss and len(lead) == 1 else None
        if decoder is not None:
            hidden = decoder(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
            return lazy_logits(hidden, self.head)
        logits = self.body(input_ids=ids.reshape(-1, length), use_cache=False, **kwargs).logits
        return logits.reshape(*lead, length, logits.shape[-1])

    def _decoder(self) -> nn.Module | None:
        """The library model's decoder (below the head) when this forward may return lazy logits, else None."""
        if not chunking_applies(self, self.head):
            return None
        model = self.body
        if hasattr(model, "get_base_model"):  # PEFT: LoRA layers sit inside the library model it wraps
            config = getattr(model, "active_peft_config", None)
            if config is None or config.is_prompt_learning:  # prompt tuning adds virtual tokens in its forward
                return None
            model = model.get_base_model()
        decoder = getattr(model, "base_model", model)  # PreTrainedModel: the module under base_model_prefix
        return None if decoder is model else decoder

    def _compute_dtype(self) -> torch.dtype:
        dtype = self.body.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(self.body.device.type):
            return torch.get_autocast_dtype(self.body.device.type)
        return dtype if dtype.is_floating_point else torch.float32

    @torch.no_grad()
    def complete(self, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """The greedy continuation of ``prompt`` (token ids) up to a stop token or ``max_new_tokens`` (capped by
        the model's context); touches no RNG."""
        room = self.context_length() - len(prompt)
        if room <= 0:
            return []
        was_training = self.training
        self.eval()
        device = self.body.get_input_embeddings().weight.device
        ids = torch.tensor([prompt], dtype=torch.int64, device=device)
        out = self.body.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=min(max_new_tokens, room),
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=stop_ids[0],
            use_cache=True,
        )
        self.train(was_training)
        reply = out[0, len(prompt) :].tolist()
        end = next((i for i, token in enumerate(reply) if token in stop_ids), len(reply))
        return reply[:end]

    def context_length(self) -> int:
        """The most positions the model reads (``max_position_embeddings`` / ``n_positions``; large if unbounded)."""
        config = self.body.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return int(positions) if isinstance(positions, int) else 1 << 30

    def embeddings(self) -> nn.Module:
        """The token embedding (NEFTune adds its noise to this module's output)."""
        return self.body.get_input_embeddings()

    def blocks(self) -> list[nn.Module]:
        """The decoder layers, bottom first."""
        return list(layer_list(self.body))


def _drop_tied_copies(module: HFCausalLM, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for names in module.tied_names():
        for name in names[1:]:
            state_dict.pop(prefix + name, None)


def _restore_tied_copies(module: HFCausalLM, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for first, *copies in module.tied_names():
        if prefix + first in state_dict:
            for name in copies:
                state_dict.setdefault(prefix + name, state_dict[prefix + first])


def packed_attention_bias(position_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive ``(B, 1, L, L)`` mask: token i sees token j iff j ≤ i and both are in the same example.

    An example starts wherever ``position_ids`` is 0, so each row's examples are the runs between
    zeros; the mask is 0 where attention is allowed and the dtype's lowest value elsewhere (the
    form both eager and SDPA attention add to their scores).
    """
    example = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)  # (B, L): which example a token is in
    same = example.unsqueeze(-1) == example.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal).unsqueeze(1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def build_hf_causal_lm(cfg: HFCausalLMConfig, info: DataInfo) -> HFCausalLM:
    """Load the causal LM in ``model.path`` for the tokenized data ``info``.

    Raises:
        ConfigError: the directory is not a loadable causal LM, its vocabulary or context is too
            small for the data, or 4-bit loading has no kernel on this machine.
    """
    directory = cfg.path
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ConfigError(
            f"model.path: {directory} is not a Hugging Face model directory (no config.json; as written by "
            "save_pretrained or gradwise export --format hf)"
        )
    if info.kind not in ("language_modeling", "preference") or info.vocab_size is None:
        label = info.name or info.source
        raise ConfigError(f"model.name 'hf_causal_lm' needs chat, instruct, text or preference data; {label!r} is not")
    from transformers import AutoModelForCausalLM  # heavy import, only for LLM runs

    attention = _attention(cfg)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "dtype": torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
        "attn_implementation": attention,
    }
    if cfg.load_in_4bit:
        kwargs.update(_four_bit(cfg))
    try:
        with quiet_transformers():
            body = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise ConfigError(f"model.path: cannot load a causal LM from {directory} ({first_line(exc)})") from None
    embedded = body.get_input_embeddings().num_embeddings
    if info.vocab_size > embedded:
        raise ConfigError(
            f"model.path: the tokenizer has {info.vocab_size} tokens but the model in {directory} embeds only "
            f"{embedded}; the tokenizer belongs to another model"
        )
    positions = getattr(body.config, "max_position_embeddings", None) or getattr(body.config, "n_positions", None)
    if isinstance(positions, int) and info.n_features > positions:
        raise ConfigError(
            f"data.max_length: {info.n_features} tokens, but the model in {directory} reads at most {positions}; "
            f"set data.max_length to {positions} or less"
        )
    body.config.use_cache = False
    if (info.text_stats or {}).get("packing") == "padding_free" and attention != "flash_attention_2":
        warnings.warn(
            "data.packing=padding_free without flash attention: each training batch becomes one row with a "
            "(tokens x tokens) attention mask, slower and larger than padding; packed rows cost less here",
            GradwiseWarning,
            stacklevel=2,
        )
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        body = prepare_model_for_kbit_training(body, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        enable_checkpointing(body, directory)
    return HFCausalLM(body, attention, _chunked(cfg, info, body)).train()


def _chunked(cfg: HFCausalLMConfig, info: DataInfo, body: nn.Module) -> bool:
    """What ``model.chunked_loss`` means for ``body`` on ``info``'s data.

    Raises:
        ConfigError: ``on`` for preference pairs or for an architecture that transforms its logits.
    """
    model_type = str(getattr(body.config, "model_type", ""))
    if cfg.chunked_loss == "on" and info.kind != "language_modeling":
        raise ConfigError(
            "model.chunked_loss on: preference tuning scores whole sequences from full logits; use auto or off"
        )
    if cfg.chunked_loss == "on" and model_type not in PLAIN_HEAD_TYPES:
        raise ConfigError(
            f"model.chunked_loss on: {model_type!r} models may scale or cap their logits after the head; "
            f"chunking supports {', '.join(sorted(PLAIN_HEAD_TYPES))} (use auto or off)"
        )
    if info.kind != "language_modeling" or model_type not in PLAIN_HEAD_TYPES:
        return False
    return use_chunked_loss(cfg.chunked_loss, int(body.get_output_embeddings().weight.shape[0]))


def _attention(cfg: HFCausalLMConfig) -> str:
    if cfg.attention != "auto":
        if cfg.attention == "flash_attention_2" and not _has_flash_attention():
            raise ConfigError(
                "model.attention flash_attention_2 needs a CUDA GPU and the flash-attn package "
                "(pip install flash-attn); use sdpa"
            )
        return cfg.attention
    return "flash_attention_2" if _has_flash_attention() else "sdpa"


def _has_flash_attention() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _four_bit(cfg: HFCausalLMConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for an NF4 base (Dettmers et al. 2023, "QLoRA"), or a one-line refusal."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.load_in_4bit: no 4-bit kernel for this device; QLoRA's NF4 base needs a CUDA GPU with the "
            "bitsandbytes package (pip install bitsandbytes); on this machine use model.dtype=bfloat16 with "
            "finetune.lora instead"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("model.load_in_4bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


COMPONENT = Component(HFCausalLMConfig, build_hf_causal_lm, "pretrained Hugging Face causal LM (local directory)")
