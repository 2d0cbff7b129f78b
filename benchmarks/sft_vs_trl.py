"""The same supervised fine-tune of a causal LM by gradwise and by TRL's ``SFTTrainer``, alternated.

Both sides train the same random Llama (built from a config, saved once with ``save_pretrained``; both
load it from that directory, so the initial weights are the same bytes) on the same conversations: the
bundled chatterbot-corpus ones (``gradwise.data.chat.bundled_conversations``) written to a JSONL with a
``messages`` column. gradwise reads all of it (``data.name=chat data.path=...``) and splits it 80/10/10
by its seed; the parent reproduces that split with gradwise's own functions and hands TRL the training
conversations in a second JSONL (``datasets.load_dataset("json", ...)``, offline), so both train on the
same conversations and are scored on the same held-out ones (gradwise's test split, checked equal).

- Chat template and loss: the tokenizer (a byte-level BPE trained on the chatterbot texts) gets
  ``tokenizer.chat_template`` = gradwise's ``DEFAULT_CHAT_TEMPLATE`` with ``{% generation %}`` markers
  around each assistant reply and its EOS. It renders byte-identical text (checked on every
  conversation); gradwise finds the reply spans by rendering prefixes, TRL's ``assistant_only_loss=True``
  by the markers. Loss on assistant tokens only, on both sides; the trained tokens are checked equal
  (same ids, same -100 positions) for the unpacked layout.
- Layout: ``packing`` off (one conversation per row, padded per batch) or on (gradwise
  ``data.packing=packed``: best-fit-decreasing rows of ``max_length`` with restarting position ids and
  a block-diagonal mask; TRL ``packing=True`` with its default ``packing_strategy="bfd"``, which turns on
  ``padding_free``: each batch becomes one row of ``batch x max_length`` slots with restarting position
  ids, which transformers turns into a block-diagonal mask for SDPA). ``--batch`` counts rows on both
  sides (conversations unpacked, packed rows packed).
- Optimization: AdamW lr ``--lr`` (fused kernel on both: TRL's default ``adamw_torch_fused``, gradwise's
  default where every parameter allows it), betas (0.9, 0.999), no weight decay, constant LR, no
  warmup, clipping at norm 1.0, ``--steps`` steps of ``--batch`` rows, no gradient accumulation, no
  evaluation during training, no gradient checkpointing (TRL's default is on; turned off), fp32 on CPU
  (``--dtype bfloat16``: bf16 autocast on both, fp32 master weights for full fine-tuning, a bf16 base
  for LoRA). LoRA: PEFT adapters of rank ``--lora-r``, alpha ``--lora-alpha``, no dropout, on
  ``--lora-targets`` (TRL ``peft_config=LoraConfig(...)``, gradwise ``finetune.lora``); QLoRA: NF4 base
  with double quantization and bf16 compute (gradwise ``model.load_in_4bit=true``, TRL a
  ``BitsAndBytesConfig`` with the same settings). Shuffling differs (each side's own sampler), so the
  tokens per step differ a little; the rates below are per token.
- What differs by design, each side's own way: TRL computes the loss with its fused LM head
  (``trl.trainer.utils.add_fused_lm_head``: log-probabilities of the positions with a target only, in
  tiles, recomputed in backward; plus entropy and top-1 for its logs); gradwise materializes the
  ``(B, L, V)`` logits and takes the cross-entropy. With a 4-bit base TRL casts the adapters to bf16;
  gradwise keeps them fp32 (and runs PEFT's ``prepare_model_for_kbit_training``).

What each number is:

- input tokens/s: non-pad tokens fed to the model in training steps (gradwise: the real tokens of the
  rows each step takes, read from the split's row lengths; TRL: ``attention_mask.sum()`` of each
  collated batch, or its one row's length when padding-free), over the time between the end of step 1
  and the end of the last step (the clock read at each step end: gradwise through fit's
  ``stop_requested`` poll, TRL through a callback), so start-up, the first step, gradwise's final
  evaluation and checkpoint are outside it on both sides. gradwise feeds each example's ids but the
  last (its next-token targets are the ids but the first), TRL the whole example and shifts inside the
  loss: for the same conversation TRL feeds one token more.
- target tokens/s: the tokens the loss averages over (next-token targets not -100), same window.
- loop tokens/s: input tokens over gradwise's ``time`` of its last train line / TRL's ``train_runtime``.
- held-out loss: each trained model rebuilt as a plain ``AutoModelForCausalLM`` from the model directory
  plus its trained tensors (gradwise: its ``last`` checkpoint, keys with ``body.`` dropped, LoRA keys
  ``lora_*`` under PEFT's names; TRL: the trainer's model's state dict, the same names) and scored by one
  function (:func:`heldout_loss`) on the held-out conversations' token ids from gradwise's tokenizer: mean
  cross-entropy per assistant target token, in fp32 (QLoRA: on the NF4 base with bf16 compute it trained on). gradwise's
  own ``summary.json`` test_loss is shown beside it as a check of the scorer.
- peak RSS (``ru_maxrss`` of that child) and, on CUDA, peak allocated GPU memory; MFU = 6·N·(input
  tokens/s) / the bf16 peak measured with a large matmul (N = all parameters of the model, LoRA or not).

Each side runs in its own subprocess; each round runs every configuration, gradwise first in odd rounds
and TRL first in even ones; the table shows medians over rounds and the ratios gradwise/TRL. On CPU each
child uses one torch thread by default: on a shared 2-core machine two OpenMP threads per process spin
in barriers whenever a neighbour takes a core, and single steps then take 10x longer (measured: 0.11 s
quiet, 0.15-2.4 s loaded with 2 threads; 0.17-0.23 s loaded with 1). The CPU default uses the first
``--limit 400`` conversations (train 320 / test 40) to keep start-up, gradwise's final evaluation and the
scoring short; the whole default run (16 children) takes about 6 minutes on 2 loaded cores.

    .venv/bin/python benchmarks/sft_vs_trl.py                       # CPU defaults: 4M-param Llama, 15 steps, 2 rounds
    .venv/bin/python benchmarks/sft_vs_trl.py --configs full,full+packed --steps 60 --repeats 3
    .venv/bin/python benchmarks/sft_vs_trl.py --device cuda --dtype bfloat16 --size 0.5b   # GPU: full, packed, QLoRA
"""

from __future__ import annotations

import os

# Nothing may come from a hub; set before transformers or datasets are imported anywhere (children inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import hashlib
import importlib.util
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIDES = ("gradwise", "trl")
IGNORE = -100
VAL_FRACTION = TEST_FRACTION = 0.1
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# gradwise's DEFAULT_CHAT_TEMPLATE with {% generation %} around each reply and its EOS (what TRL's
# assistant_only_loss reads); it renders the same text (checked in setup()).
MARKED_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Llama shapes built from a config (random weights). "tiny" steps in well under a second on 2 CPU cores.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "0.5b": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 20,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
}


# --------------------------------------------------------------------------- the shared setup


def parse_config(name: str) -> dict[str, Any]:
    """``full``, ``lora`` or ``qlora``, with ``+packed``: what the two sides train."""
    kind, _, layout = name.partition("+")
    if kind not in ("full", "lora", "qlora") or layout not in ("", "packed"):
        raise SystemExit(f"--configs: {name!r}; expected full|lora|qlora, optionally +packed")
    return {"name": name, "kind": kind, "lora": kind != "full", "qlora": kind == "qlora", "packed": layout == "packed"}


def train_tokenizer(directory: Path, texts: list[str], vocab: int) -> None:
    """A byte-level BPE of ``vocab`` tokens trained on ``texts``; ``<|endoftext|>`` is BOS and EOS; no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = MARKED_TEMPLATE
    fast.save_pretrained(str(directory))


def build_model_dir(directory: Path, size: str, vocab: int, max_length: int, seed: int) -> int:
    """Tokenizer + a random Llama of ``size`` saved (fp32 safetensors) in ``directory``; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gradwise.data.chat import bundled_conversations

    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer(directory, [t["content"] for c in bundled_conversations() for t in c], vocab)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(2048, max_length),
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def gradwise_raw(args: argparse.Namespace, config: dict[str, Any], work: Path) -> dict[str, Any]:
    """The gradwise run: the dict ``validate`` turns into its RunConfig."""
    bf16 = args.dtype == "bfloat16"
    model: dict[str, Any] = {
        "name": "hf_causal_lm",
        "path": str(work / "model"),
        # A frozen LoRA base loads in bf16 under bf16 (its adapters stay fp32); full fine-tuning keeps fp32 weights.
        "dtype": "bfloat16" if bf16 and config["lora"] else "float32",
        "attention": args.attention,
    }
    if config["qlora"]:
        model["load_in_4bit"] = True
    raw: dict[str, Any] = {
        "name": f"sft-vs-trl-{config['name']}",
        "seed": args.seed,
        "device": args.device,
        "precision": "bf16" if bf16 else "fp32",
        "data": {
            "name": "chat",
            "path": str(work / "conversations.jsonl"),
            "max_length": args.max_length,
            "packing": "packed" if config["packed"] else "none",
            "loss_on": "assistant",
            "val_fraction": VAL_FRACTION,
            "test_fraction": TEST_FRACTION,
        },
        "model": model,
        "task": {"kind": "language_modeling"},
        "optim": {"name": "adamw", "lr": args.lr},
        "regularize": {"clip_grad_norm": 1.0},
        "schedule": {"name": "constant"},
        "batch": {"size": args.batch},
        "stop": {"epochs": None, "max_steps": args.steps},
        # Evaluate only at the last step (fit always does): no evaluation during training.
        "eval": {"every_steps": 10**9, "batch_size": 64},
        "log": {"progress": False, "plots": False},
    }
    if config["lora"]:
        raw["finetune"] = {"lora": lora_settings(args)}
    return raw


def lora_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "target_modules": args.lora_targets.split(",")}


def peft_lora_config(args: argparse.Namespace) -> Any:
    """The PEFT config both sides' adapters have (gradwise builds the same one from ``finetune.lora``)."""
    from peft import LoraConfig

    s = lora_settings(args)
    return LoraConfig(
        r=s["r"],
        lora_alpha=s["alpha"],
        lora_dropout=s["dropout"],
        target_modules=s["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def nf4_config() -> Any:
    """QLoRA's NF4 base, as gradwise's ``model.load_in_4bit`` builds it (causal_lm._four_bit)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def digest(rows: list[tuple[list[int], list[int]]]) -> str:
    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(json.dumps([ids, labels]).encode())
    return h.hexdigest()[:16]


def tensor_digest(named: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode())
        h.update(named[name].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def setup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Model directory, conversations, gradwise's split reproduced, the held-out token ids; checks on the way."""
    from gradwise.config import validate
    from gradwise.data import load_dataset
    from gradwise.data.chat import (
        DEFAULT_CHAT_TEMPLATE,
        bundled_conversations,
        chat_tokenizer,
        read_examples,
        tokenize_examples,
    )
    from gradwise.data.packing import padded_split
    from gradwise.data.splits import split_indices

    n_params = build_model_dir(work / "model", args.size, args.vocab, args.max_length, args.seed)
    conversations = bundled_conversations()
    if args.limit:
        conversations = conversations[: args.limit]
    with (work / "conversations.jsonl").open("w") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c}) + "\n")

    cfg = validate(gradwise_raw(args, parse_config("full"), work), source="sft_vs_trl")
    tokenizer = chat_tokenizer(cfg.data, work / "model")  # gradwise's own (pad = EOS where it has none)
    same_text = all(
        tokenizer.apply_chat_template(c, chat_template=MARKED_TEMPLATE, tokenize=False)
        == tokenizer.apply_chat_template(c, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
        for c in conversations
    )
    records, source, layout = read_examples(cfg.data)[:3]
    examples, stats = tokenize_examples(records, layout, tokenizer, tokenizer.chat_template, cfg.data)
    if stats.dropped_no_target or stats.dropped_too_long:  # then examples no longer line up with records
        raise SystemExit(f"gradwise dropped examples ({stats}); raise --max-length")
    # gradwise's own split (seeded, by example) is the reference: which conversations are train and test.
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=work / "model")
    train_rows, _, test_rows = split_indices(len(examples), None, VAL_FRACTION, TEST_FRACTION, args.seed, source)
    mine = padded_split([examples[i] for i in test_rows], int(tokenizer.pad_token_id))
    same_heldout = mine.y.shape == data.test.y.shape and bool(torch.equal(mine.y, data.test.y))
    if not same_heldout:
        raise SystemExit(f"{source}: could not reproduce gradwise's test split; the benchmark needs updating")
    with (work / "train.jsonl").open("w") as f:
        for i in train_rows:
            f.write(json.dumps({"messages": records[i]}) + "\n")
    heldout = [{"ids": examples[i].ids, "trained": examples[i].trained} for i in test_rows]
    (work / "heldout.json").write_text(json.dumps(heldout))
    train_examples = [examples[i] for i in train_rows]
    return {
        "parameters": n_params,
        "vocab": len(tokenizer),
        "conversations": len(conversations),
        "train": len(train_rows),
        "test": len(test_rows),
        "mean_tokens": statistics.mean(len(e.ids) for e in train_examples),
        "truncated": stats.truncated,
        "same_text": same_text,
        "same_heldout": same_heldout,
        "train_digest": digest(
            [(e.ids, [t if k else IGNORE for t, k in zip(e.ids, e.trained, strict=True)]) for e in train_examples]
        ),
    }


# --------------------------------------------------------------------------- measuring, the same way on both sides


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class StepProbe:
    """The clock at the end of every optimizer step, and the tokens of every batch the side fed."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.batches: list[tuple[int, int]] = []  # (input tokens, target tokens) per batch, in order

    def step_end(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def measures(self) -> dict[str, float]:
        steps = len(self.times)
        used = self.batches[:steps]  # a loader may fetch one batch ahead
        window = self.times[-1] - self.times[0] if steps > 1 else math.nan
        gaps = [b - a for a, b in zip(self.times[:-1], self.times[1:], strict=True)]
        return {
            "probe_steps": steps,
            "input_tokens": sum(n for n, _ in used),
            "target_tokens": sum(t for _, t in used),
            "input_tokens_per_s": sum(n for n, _ in used[1:]) / window,
            "target_tokens_per_s": sum(t for _, t in used[1:]) / window,
            "step_s": statistics.median(gaps) if gaps else math.nan,
        }


def gpu_peak_mb() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else math.nan


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scored_model(args: argparse.Namespace, config: dict[str, Any], work: Path, trained: dict[str, torch.Tensor]) -> Any:
    """A plain ``AutoModelForCausalLM`` (PEFT-wrapped for LoRA) from the model directory plus ``trained`` tensors.

    Full fine-tuning: every weight comes from ``trained`` (HF names). LoRA: the base from the directory in
    fp32 (QLoRA: in NF4, as it trained), the adapters from ``trained`` (PEFT names).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32, "attn_implementation": "sdpa"}
    if config["qlora"]:
        kwargs.update(
            quantization_config=nf4_config(), dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()}
        )
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), **kwargs)
    if config["lora"]:
        model = get_peft_model(model, peft_lora_config(args))
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise SystemExit(f"trained tensors the scored model lacks: {unexpected[:5]}")
    if not config["lora"] and missing:
        raise SystemExit(f"weights the trained state lacks: {missing[:5]}")
    if config["lora"] and not any("lora_" in k for k in trained):
        raise SystemExit("no LoRA tensors in the trained state")
    if not config["qlora"]:
        model.to(args.device)
    return model.eval()


@torch.no_grad()
def heldout_loss(model: Any, heldout: list[dict[str, Any]], device: str, batch: int = 64) -> float:
    """Mean next-token cross-entropy over the held-out assistant target tokens (the same code for both sides)."""
    rows = sorted(heldout, key=lambda e: len(e["ids"]))
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        width = max(len(e["ids"]) for e in chunk) - 1
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e["ids"]) - 1
            ids[i, :n] = torch.tensor(e["ids"][:-1])
            mask[i, :n] = 1
            targets[i, :n] = torch.tensor(
                [t if k else IGNORE for t, k in zip(e["ids"][1:], e["trained"][1:], strict=True)]
            )
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.to(device).reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        count += int((targets != IGNORE).sum())
    return total / count


def adamw_kind(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    return f"{type(optimizer).__name__} {'fused' if d.get('fused') else 'foreach' if d.get('foreach') else 'for-loop'}"


def trainable_digest(model: torch.nn.Module, strip: str = "") -> str:
    return tensor_digest({n.removeprefix(strip): p for n, p in model.named_parameters() if p.requires_grad})


# --------------------------------------------------------------------------- gradwise side


def run_gradwise(args: argparse.Namespace, config: dict[str, Any], work: Path) -> dict[str, Any]:
    import gradwise.train.loop as loop
    from gradwise.config import validate
    from gradwise.store.checkpoint import load_model_state, resolve_checkpoint
    from gradwise.store.rundir import read_metrics
    from gradwise.train.loop import fit

    cfg = validate(gradwise_raw(args, config, work), source="sft_vs_trl")
    run_dir = work / f"gradwise-{config['name']}-{time.monotonic_ns()}"
    probe = StepProbe()
    original_take, original_build = loop.take, loop.build_run
    init = ["the model directory"]  # full fine-tuning: every weight as loaded, on both sides
    optimizer = [""]

    def recording_build(*a: Any, **k: Any) -> Any:  # the adapters' random init and the optimizer, before step 1
        parts = original_build(*a, **k)
        if config["lora"]:
            init[0] = trainable_digest(parts.model, strip="body.")
        optimizer[0] = adamw_kind(parts.optimizer)
        return parts

    def counting_take(split: Any, rows: torch.Tensor, epoch: int = 0) -> Any:  # the loop's batches only
        inputs, targets = original_take(split, rows, epoch)
        probe.batches.append((int(split.lengths[rows].sum()), int((targets != IGNORE).sum())))
        return inputs, targets

    def after_step() -> bool:  # fit polls this after every step; used only to read the clock
        probe.step_end()
        return False

    loop.take, loop.build_run = counting_take, recording_build
    try:
        summary = fit(cfg, run_dir, stop_requested=after_step)
    finally:
        loop.take, loop.build_run = original_take, original_build
    peak, gpu_peak = peak_rss_mb(), gpu_peak_mb()  # before anything below allocates
    train_lines, _ = read_metrics(run_dir)
    state = load_model_state(resolve_checkpoint(run_dir, "last"))
    trained = {k.removeprefix("body."): v for k, v in state.items() if not config["lora"] or "lora_" in k}
    free_memory()
    scorer = scored_model(args, config, work, trained)
    loss = heldout_loss(scorer, json.loads((work / "heldout.json").read_text()), args.device)
    shutil.rmtree(run_dir, ignore_errors=True)  # a 0.5B run's checkpoint is GBs
    return {
        **probe.measures(),
        "steps": summary["steps"],
        "loop_s": train_lines[-1]["time"],
        "peak_rss_mb": peak,
        "gpu_peak_mb": gpu_peak,
        "heldout_loss": loss,
        "summary_test_loss": summary["final"].get("test_loss"),
        "trainable": summary["trainable_parameters"],
        "init_digest": init[0],
        "data_digest": None,
        "optimizer": optimizer[0],
    }


# --------------------------------------------------------------------------- TRL side


class CountingCollator:
    """TRL's collator, counting what each batch feeds: non-pad input tokens and next-token targets."""

    def __init__(self, inner: Any, probe: StepProbe) -> None:
        self.inner, self.probe = inner, probe

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        inputs = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
        self.probe.batches.append((inputs, int((batch["labels"][:, 1:] != IGNORE).sum())))
        return batch


def run_trl(args: argparse.Namespace, config: dict[str, Any], work: Path) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    bf16 = args.dtype == "bfloat16"
    kwargs: dict[str, Any] = {"local_files_only": True, "attn_implementation": args.attention}
    kwargs["dtype"] = torch.bfloat16 if bf16 and config["lora"] else torch.float32
    if config["qlora"]:
        kwargs.update(quantization_config=nf4_config(), device_map={"": torch.cuda.current_device()})
    model = AutoModelForCausalLM.from_pretrained(str(work / "model"), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    dataset = load_dataset(
        "json", data_files=str(work / "train.jsonl"), split="train", cache_dir=str(work / "hf-datasets")
    )
    sft_args = SFTConfig(
        output_dir=str(work / f"trl-{config['name']}-{time.monotonic_ns()}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        **({} if args.trl_optim == "default" else {"optim": args.trl_optim}),
        max_length=args.max_length,
        packing=config["packed"],
        packing_strategy="bfd",
        assistant_only_loss=True,
        gradient_checkpointing=False,  # TRL's default is on; gradwise's off
        bf16=bf16,
        fp16=False,
        use_cpu=args.device == "cpu",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=args.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(args) if config["lora"] else None,
    )
    data_digest = None
    if not config["packed"]:
        prepared = trainer.train_dataset
        data_digest = digest([(list(r["input_ids"]), list(r["labels"])) for r in prepared])
    init = trainable_digest(trainer.model) if config["lora"] else "the model directory"
    probe = StepProbe()
    trainer.data_collator = CountingCollator(trainer.data_collator, probe)

    class ProbeCallback(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            probe.step_end()

    trainer.add_callback(ProbeCallback())
    result = trainer.train()
    peak, gpu_peak = peak_rss_mb(), gpu_peak_mb()
    optimizer = adamw_kind(getattr(trainer.optimizer, "optimizer", trainer.optimizer))  # accelerate wraps it
    state = trainer.model.state_dict()
    trained = {k: v.detach().cpu() for k, v in state.items() if not config["lora"] or "lora_" in k}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    steps = trainer.state.global_step
    del trainer, model, state
    free_memory()
    scorer = scored_model(args, config, work, trained)
    loss = heldout_loss(scorer, json.loads((work / "heldout.json").read_text()), args.device)
    return {
        **probe.measures(),
        "steps": steps,
        "loop_s": result.metrics["train_runtime"],
        "peak_rss_mb": peak,
        "gpu_peak_mb": gpu_peak,
        "heldout_loss": loss,
        "summary_test_loss": None,
        "trainable": trainable,
        "init_digest": init,
        "data_digest": data_digest,
        "optimizer": optimizer,
    }


# --------------------------------------------------------------------------- child and parent


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config = parse_config(args.config)
    work = Path(args.work)
    result = (run_gradwise if args.side == "gradwise" else run_trl)(args, config, work)
    result.update(side=args.side, config=config["name"], threads=torch.get_num_threads())
    Path(args.json).write_text(json.dumps(result))


PASSED = (
    "steps",
    "batch",
    "max_length",
    "lr",
    "seed",
    "threads",
    "device",
    "dtype",
    "attention",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "trl_optim",
)


def run_side(side: str, config: str, args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", side, "--config", config, "--work", str(work), "--json", str(out)]
    for flag in PASSED:
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} {config} child failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


ROWS = [
    ("input tokens/s (steps 2..N)", "input_tokens_per_s", ".0f"),
    ("target tokens/s (steps 2..N)", "target_tokens_per_s", ".0f"),
    ("loop tokens/s", "loop_tokens_per_s", ".0f"),
    ("median step s", "step_s", ".3f"),
    ("input tokens / step", "tokens_per_step", ".0f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("held-out loss", "heldout_loss", ".4f"),
]
GPU_ROWS = [("peak GPU MB", "gpu_peak_mb", ".0f"), ("MFU (6N)", "mfu", ".3f")]


def table(config: str, runs: dict[str, list[dict[str, Any]]], cuda: bool) -> list[str]:
    lines = [f"**{config}**", "", "| median (all rounds) | gradwise | TRL | gradwise/TRL |", "|---|---|---|---|"]
    for label, key, spec in ROWS + (GPU_ROWS if cuda else []):
        g = [r[key] for r in runs["gradwise"]]
        t = [r[key] for r in runs["trl"]]
        gm, tm = statistics.median(g), statistics.median(t)
        ratio = gm / tm if tm else math.nan
        gs, ts = (", ".join(format(x, spec) for x in v) for v in (g, t))
        lines.append(f"| {label} | {gm:{spec}} ({gs}) | {tm:{spec}} ({ts}) | {ratio:.3f} |")
    g0, t0 = runs["gradwise"][0], runs["trl"][0]
    lines.append("")
    lines.append(
        f"steps {g0['steps']} / {t0['steps']}; trainable parameters {g0['trainable']:,} / {t0['trainable']:,}; "
        f"trainable init digests {'equal' if g0['init_digest'] == t0['init_digest'] else 'differ'}; "
        f"gradwise summary test_loss {', '.join(format(r['summary_test_loss'], '.4f') for r in runs['gradwise'])}; "
        f"optimizers {g0['optimizer']} / {t0['optimizer']}"
    )
    return lines


def parent(args: argparse.Namespace) -> None:
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    configs = args.configs.split(",") if args.configs else default_configs(args)
    for name in configs:
        parse_config(name)
    peak_flops = math.nan
    if args.device == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        from gpt_mfu import measure_peak_flops

        peak_flops = measure_peak_flops(torch.device("cuda"), torch.bfloat16)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {c: {s: [] for s in SIDES} for c in configs}
    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-vs-trl-") as tmp:
        work = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
        info = setup(args, work)
        header = (
            f"SFT of a random Llama ({info['parameters'] / 1e6:.1f}M parameters, size {args.size}, vocab "
            f"{info['vocab']}) on the chatterbot conversations: {info['conversations']} (train {info['train']} / test "
            f"{info['test']}, "
            f"mean {info['mean_tokens']:.1f} tokens, {info['truncated']} cut at max_length {args.max_length}); "
            f"batch {args.batch} rows, {args.steps} steps, lr {args.lr:g}, {args.device} {args.dtype}, "
            f"{args.attention} attention, "
            f"{args.threads} torch threads, {args.repeats} alternated rounds; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}"
        )
        print(header, flush=True)
        print(
            f"  marked template renders the same text: {info['same_text']}; held-out = gradwise's test split: "
            f"{info['same_heldout']}",
            flush=True,
        )
        for round_ in range(args.repeats):
            for name in configs:
                for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                    t0 = time.perf_counter()
                    try:
                        r = run_side(side, name, args, work, work / f"{side}-{name}-{round_}.json")
                    except RuntimeError as exc:
                        failures.append(str(exc))
                        print(f"  round {round_ + 1} {name:14s} {side:8s}: FAILED\n{exc}", flush=True)
                        continue
                    r["loop_tokens_per_s"] = r["input_tokens"] / r["loop_s"]
                    r["tokens_per_step"] = r["input_tokens"] / max(r["probe_steps"], 1)
                    r["mfu"] = 6 * info["parameters"] * r["input_tokens_per_s"] / peak_flops
                    runs[name][side].append(r)
                    if args.out:  # after every child, so that a run cut short by a timeout leaves what it measured
                        partial = {"setup": info, "peak_flops": peak_flops, "runs": runs, "failures": failures}
                        Path(args.out).write_text(json.dumps(partial, indent=1))
                    print(
                        f"  round {round_ + 1} {name:14s} {side:8s}: {r['input_tokens_per_s']:.0f} tok/s, "
                        f"step {r['step_s']:.3f} s, peak {r['peak_rss_mb']:.0f} MB, held-out {r['heldout_loss']:.4f} "
                        f"({time.perf_counter() - t0:.0f} s with start-up)",
                        flush=True,
                    )
    lines = [header, ""]
    if args.device == "cuda":
        lines += [f"bf16 matmul peak measured: {peak_flops / 1e12:.0f} TFLOP/s", ""]
    lines += [
        f"marked template renders gradwise's text: {info['same_text']}; held-out = gradwise's test split: "
        f"{info['same_heldout']}",
        "",
    ]
    for name in configs:
        if not (runs[name]["gradwise"] and runs[name]["trl"]):
            lines += [f"**{name}**: no result on one side", ""]
            continue
        lines += table(name, runs[name], args.device == "cuda")
        trl_digests = {r["data_digest"] for r in runs[name]["trl"]} - {None}
        if trl_digests:
            lines.append(
                f"same trained tokens (ids and -100 positions) as gradwise: {trl_digests == {info['train_digest']}}"
            )
        lines.append("")
    lines.append(f"{time.perf_counter() - started:.0f} s in all")
    print()
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "setup": info,
                    "peak_flops": peak_flops,
                    "runs": runs,
                    "failures": failures,
                    "markdown": "\n".join(lines),
                },
                indent=1,
            )
        )
    if failures:
        sys.exit(1)


def default_configs(args: argparse.Namespace) -> list[str]:
    if args.device == "cpu":
        return ["full", "full+packed", "lora", "lora+packed"]
    four_bit = importlib.util.find_spec("bitsandbytes") is not None
    return ["full", "full+packed", "qlora+packed" if four_bit else "lora+packed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternated rounds (each trains every config on both sides)"
    )
    parser.add_argument("--configs", default=None, help="comma-separated full|lora|qlora[+packed] (default: by device)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--max-length", type=int, default=None, help="default 128 on CPU, 512 on CUDA")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each child (see above)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="Llama shape (default tiny on CPU, 0.5b on CUDA)"
    )
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary trained on the chatterbot texts")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use the first N conversations (0: all; default 400 on CPU, all on CUDA)",
    )
    parser.add_argument(
        "--attention", default="sdpa", help="attn_implementation on both sides (sdpa, eager, flash_attention_2)"
    )
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-targets", default=LORA_TARGETS)
    parser.add_argument("--trl-optim", default="default", help="SFTConfig.optim (default: TRL's own, fused AdamW)")
    parser.add_argument("--out", default=None, help="also write every result and the markdown to this JSON file")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.batch = args.batch or (16 if cuda else 8)
    args.max_length = args.max_length or (512 if cuda else 128)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.size = args.size or ("0.5b" if cuda else "tiny")
    args.limit = (0 if cuda else 400) if args.limit is None else args.limit
    if args.side:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
