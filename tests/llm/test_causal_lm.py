"""The causal-LM component and its data: loading three architectures, assistant-only targets, packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradwise.config import validate
from gradwise.data.chat import DEFAULT_CHAT_TEMPLATE, ChatData, render_conversation, tokenize_examples
from gradwise.data.packing import IGNORE_INDEX, best_fit_decreasing, pack_split, padded_split
from gradwise.data.text import load_tokenizer
from gradwise.errors import ConfigError
from gradwise.models.causal_lm import packed_attention_bias
from gradwise.tasks.language_modeling import LanguageModelingTask
from gradwise.train.loop import fit
from gradwise.train.setup import build_model_and_data

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is a computer?"},
    {"role": "assistant", "content": "A machine that computes."},
]


def sft(model_dir: Path, **sections) -> dict:
    raw = {
        "seed": 0,
        "data": {"name": "chat", "max_length": 64, "limit": 96},
        "model": {"name": "hf_causal_lm", "path": str(model_dir)},
        "task": {"kind": "language_modeling"},
        "optim": {"name": "adamw", "lr": 0.003},
        "batch": {"size": 8},
        "stop": {"epochs": None, "max_steps": 4},
        "eval": {"every_steps": 4, "batch_size": 16},
        "log": {"progress": False, "plots": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_each_architecture_trains_in_full_and_with_lora(model_dirs, tmp_path, kind, lora):
    extra = {"finetune": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}} if lora else {}
    cfg = validate(sft(model_dirs[kind], **extra))
    summary = fit(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["final"]["val_loss"] < 6.3  # below a uniform guess over 512 tokens (ln 512 = 6.24) + slack
    _, model, _, _ = build_model_and_data(cfg, training=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    else:
        assert len(trainable) == len(list(model.parameters()))


def test_model_path_on_a_model_that_cannot_use_it_is_one_line():
    with pytest.raises(ConfigError, match=r"model.path does not apply to model.name 'gpt'"):
        validate({"model": {"name": "gpt", "path": "/tmp/x"}, "data": {"name": "python_source"}})


def test_chat_data_needs_a_causal_lm_with_a_tokenizer():
    with pytest.raises(ConfigError, match=r"does not fit data.name 'chat'"):
        validate({"model": {"name": "mlp"}, "data": {"name": "chat"}})


def test_four_bit_base_says_what_is_needed(model_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"set finetune.lora"):
        validate(sft(model_dirs["llama"], model={"load_in_4bit": True}))
    cfg = validate(sft(model_dirs["llama"], model={"load_in_4bit": True}, finetune={"lora": {"r": 2}}))
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have the 4-bit kernel")
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit: no 4-bit kernel for this device.*bitsandbytes"):
        build_model_and_data(cfg, training=True)


def test_dtype_and_attention_settings(model_dirs):
    """model.dtype loads the weights in bf16; eager attention computes what SDPA does, packed rows included."""
    bf16 = validate(sft(model_dirs["llama"], model={"dtype": "bfloat16"}))
    _, model, _, _ = build_model_and_data(bf16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    outputs = {}
    for attention in ("sdpa", "eager"):
        cfg = validate(sft(model_dirs["qwen2"], model={"attention": attention}, data={"packing": "packed"}))
        data, model, _, _ = build_model_and_data(cfg)
        assert model.body.config._attn_implementation == attention
        with torch.no_grad():
            outputs[attention] = model.eval()({k: v[:4] for k, v in data.train.x.items()})
    assert torch.allclose(outputs["sdpa"], outputs["eager"], atol=1e-5)


# --------------------------------------------------------------------------- assistant-only targets


def test_only_assistant_replies_and_their_end_of_turn_are_targets(model_dirs):
    tokenizer = load_tokenizer(model_dirs["llama"], need_pad=False)
    cfg = ChatData(max_length=512)
    examples, stats = tokenize_examples([CONVERSATION], "messages", tokenizer, DEFAULT_CHAT_TEMPLATE, cfg)
    (example,) = examples
    trained = [tok for tok, keep in zip(example.ids, example.trained, strict=True) if keep]
    assert tokenizer.decode(trained) == "Hi.<|endoftext|>A machine that computes.<|endoftext|>"
    full, spans, missed = render_conversation(tokenizer, DEFAULT_CHAT_TEMPLATE, CONVERSATION)
    assert [full[a:b] for a, b in spans] == ["Hi.<|endoftext|>", "A machine that computes.<|endoftext|>"]
    assert missed == 0
    assert stats.examples == 1 and stats.truncated == 0
    every = tokenize_examples([CONVERSATION], "messages", tokenizer, DEFAULT_CHAT_TEMPLATE, ChatData(loss_on="all"))[0]
    assert all(every[0].trained)


def test_prompt_completion_and_overflow_counts(model_dirs):
    tokenizer = load_tokenizer(model_dirs["llama"], need_pad=False)
    records = [("Question: why? Answer:", " because."), ("Q" * 200, " long answer")]
    truncate = ChatData(layout="prompt_completion", max_length=40)
    examples, stats = tokenize_examples(records, "prompt_completion", tokenizer, DEFAULT_CHAT_TEMPLATE, truncate)
    assert tokenizer.decode([t for t, k in zip(examples[0].ids, examples[0].trained, strict=True) if k]) == (
        " because.<|endoftext|>"
    )
    # The long prompt leaves no completion token within 40 tokens: truncated, then left out for want of a target.
    assert (stats.examples, stats.truncated, stats.dropped_no_target) == (1, 1, 1)
    drop = ChatData(layout="prompt_completion", max_length=40, overflow="drop")
    _, stats = tokenize_examples(records, "prompt_completion", tokenizer, DEFAULT_CHAT_TEMPLATE, drop)
    assert (stats.examples, stats.dropped_too_long) == (1, 1)


# Renders the last reply with a thinking block, earlier ones without (as Qwen3's template does).
THINKING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|assistant|>\\n<think></think>' + m['content'] + eos_token }}"
    "{% else %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def test_a_template_that_renders_the_last_reply_differently_still_trains_every_reply(model_dirs):
    tokenizer = load_tokenizer(model_dirs["llama"], need_pad=False)
    full, spans, missed = render_conversation(tokenizer, THINKING_TEMPLATE, CONVERSATION)
    replies = [full[a:b] for a, b in spans]
    assert missed == 0 and replies[0] == "Hi.<|endoftext|>"
    assert replies[1].endswith("A machine that computes.<|endoftext|>")


def test_a_template_that_refuses_a_conversation_is_one_line(model_dirs):
    from gradwise.errors import DataError

    tokenizer = load_tokenizer(model_dirs["llama"], need_pad=False)
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(
        DataError, match=r"^conversation 3: the chat template refuses this conversation \(System role not supported\)"
    ):
        tokenize_examples([CONVERSATION], "messages", tokenizer, strict, ChatData(), lambda i: "conversation 3")


def test_a_token_across_the_prompt_completion_boundary_is_trained(model_dirs):
    tokenizer = load_tokenizer(model_dirs["llama"], need_pad=False)
    records = [("what is a list? ", "a sequence")]
    (example,), _ = tokenize_examples(records, "prompt_completion", tokenizer, DEFAULT_CHAT_TEMPLATE, ChatData())
    trained = tokenizer.decode([t for t, k in zip(example.ids, example.trained, strict=True) if k])
    assert trained.endswith("a sequence<|endoftext|>") and "list" not in trained


def test_text_targets_are_not_cut_to_the_token_width():
    """Only per-token targets follow dynamic padding: a text classifier's (distillation) targets keep every column."""
    from gradwise.data.batches import take
    from gradwise.data.types import Split

    split = Split(x=torch.ones(4, 9, dtype=torch.int64), y=torch.randn(4, 13), lengths=torch.tensor([5, 7, 3, 2]))
    inputs, targets = take(split, torch.tensor([0, 1]))
    assert inputs.shape == (2, 7) and targets.shape == (2, 13)


def test_an_empty_micro_batch_keeps_every_parameter_in_the_graph(model_dirs):
    cfg = validate(sft(model_dirs["llama"]))
    _, model, _, _ = build_model_and_data(cfg)
    logits = model(torch.zeros((0, 1), dtype=torch.int64))
    assert logits.shape[0] == 0
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    pairs = model(torch.zeros((0, 2, 5), dtype=torch.int64))
    assert pairs.shape[:3] == (0, 2, 5)


def test_gradients_from_non_assistant_tokens_are_exactly_zero(model_dirs):
    cfg = validate(sft(model_dirs["llama"]))
    data, model, task, _ = build_model_and_data(cfg)
    rows = torch.arange(8)
    x, y = data.train.x[rows], data.train.y[rows]
    logits = model(x).detach().requires_grad_(True)
    (task.loss_sum(logits, y) / task.count(y)).backward()
    masked = y == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(logits.grad[masked]) == 0
    assert torch.count_nonzero(logits.grad[~masked].abs().sum(-1)) == int((~masked).sum())
    assert task.count(y) == int((~masked).sum())


def test_accumulation_is_exact_with_uneven_token_counts(model_dirs, tmp_path):
    base = sft(model_dirs["llama"], precision="fp64", stop={"max_steps": 3}, eval={"every_steps": 3})
    whole = fit(validate(base), tmp_path / "whole")
    split = fit(validate({**base, "batch": {"size": 8, "accumulate": 3}}), tmp_path / "split")
    assert whole["steps"] == split["steps"] == 3
    from gradwise.store.checkpoint import load_model_state

    a = load_model_state(tmp_path / "whole" / "checkpoints" / "last")
    b = load_model_state(tmp_path / "split" / "checkpoints" / "last")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-10


# --------------------------------------------------------------------------- packing


def test_best_fit_decreasing_fills_rows_and_is_deterministic():
    bins = best_fit_decreasing([5, 3, 7, 2, 2, 1], 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 7, 2, 2, 1][i] for i in b) <= 8 for b in bins)
    assert len(bins) == 3 and bins == best_fit_decreasing([5, 3, 7, 2, 2, 1], 8)


def test_packed_attention_never_crosses_an_example():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = packed_attention_bias(positions, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_packed_loss_and_logits_equal_the_unpacked_ones(model_dirs, kind):
    cfg = validate(sft(model_dirs[kind], data={"limit": 40}))
    _, model, task, _ = build_model_and_data(cfg)
    model.eval()
    tokenizer = load_tokenizer(model_dirs[kind], need_pad=False)
    from gradwise.data.chat import read_examples

    records, _, layout, _ = read_examples(ChatData(limit=12, max_length=64))
    examples, _ = tokenize_examples(records, layout, tokenizer, DEFAULT_CHAT_TEMPLATE, ChatData(max_length=64))
    pad = int(tokenizer.pad_token_id or tokenizer.eos_token_id)
    unpacked = padded_split(examples, pad)
    packed = pack_split(examples, 64, pad)
    assert len(packed) < len(unpacked)  # several examples share a row
    with torch.no_grad():
        loose = model(unpacked.x)
        tight = model(packed.x)
    loss_unpacked = task.loss_sum(loose, unpacked.y) / task.count(unpacked.y)
    loss_packed = task.loss_sum(tight, packed.y) / task.count(packed.y)
    assert task.count(unpacked.y) == task.count(packed.y)
    assert abs(float(loss_unpacked) - float(loss_packed)) < 1e-5
    # Per example: its logits in the packed row equal its logits alone.
    positions = packed.x["position_ids"]
    for row in range(len(packed)):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        length = int(packed.lengths[row])
        for start, end in zip(starts, [*starts[1:], length], strict=False):
            if start >= length:
                break
            ids = packed.x["input_ids"][row, start:end]
            match = next(
                i
                for i in range(len(unpacked))
                if torch.equal(unpacked.x[i, : len(ids)], ids) and int(unpacked.lengths[i]) == len(ids)
            )
            assert torch.allclose(tight[row, start:end], loose[match, : len(ids)], atol=1e-4)


def test_padding_free_batches_train_exactly_as_padded_ones(model_dirs, tmp_path):
    base = sft(model_dirs["llama"], precision="fp64", stop={"max_steps": 3}, eval={"every_steps": 3})
    padded = fit(validate(base), tmp_path / "padded")
    flat = fit(
        validate(
            sft(
                model_dirs["llama"],
                precision="fp64",
                stop={"max_steps": 3},
                eval={"every_steps": 3},
                data={"packing": "padding_free"},
            )
        ),
        tmp_path / "flat",
    )
    assert abs(padded["final"]["test_loss"] - flat["final"]["test_loss"]) < 1e-9


def test_task_counts_only_target_tokens():
    task = LanguageModelingTask(10)
    y = torch.tensor([[IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert task.count(y) == 3


@pytest.mark.parametrize(
    "sections",
    [
        {"optim": {"name": "muon"}},
        {"finetune": {"layer_lr_decay": 0.8, "neftune_alpha": 5.0}, "noise": {"eta": 0.01}},
        {"finetune": {"freeze_layers": 1, "freeze_embeddings": True}},
        {"finetune": {"unfreeze_every_epochs": 1}},
        {"precision": "bf16", "model": {"gradient_checkpointing": True}},
    ],
    ids=["muon", "llrd-neftune-noise", "freezing", "gradual-unfreezing", "bf16-checkpointing"],
)
def test_the_existing_strategies_apply_to_a_causal_lm(model_dirs, tmp_path, sections):
    summary = fit(validate(sft(model_dirs["llama"], **sections)), tmp_path / "run")
    assert summary["status"] == "completed" and summary["final"]["val_loss"] < 6.3
