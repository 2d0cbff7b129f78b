"""The same MiniLM fine-tune by gradwise and by the Hugging Face ``transformers.Trainer``, alternated on CPU.

Both sides train the bundled all-MiniLM-L6-v2 with a new 12-class head on the
chatterbot "topics" texts, with the same token ids, the same initial weights
and the same optimization:

- data: ``load_text_dataset`` (data.name topics) tokenizes once; the Trainer
  gets the identical ids, each row trimmed to its length, padded per batch
  with the tokenizer's pad id (what ``DataCollatorWithPadding`` does; the
  model builds its attention mask from the pad id);
- model: ``build_hf_encoder`` after the same seed on both sides (the Trainer
  trains it inside a wrapper whose ``forward(input_ids, labels)`` returns
  ``{"loss", "logits"}``);
- optimization: AdamW lr 5e-5 (head included, no multipliers), weight decay
  0.01 with biases and LayerNorm exempt, linear schedule with a warmup of
  10 % of the steps and decay to 0, batch 16, gradient clipping at norm 1.0,
  fp32, the same number of steps, no evaluation during training. Shuffling
  differs (each side uses its own sampler).

Each side runs in its own subprocess so that its peak RSS is its own; the
parent alternates gradwise, Trainer, gradwise, Trainer, ... for ``--repeats``
rounds and reports medians and the ratios gradwise/HF. Both are scored after
training by the same code, ``gradwise.train.evaluate.evaluate`` on the test split.

What each time covers: gradwise's ``wall_time_s`` (summary.json) is the whole
``fit`` loop: the steps, its per-step metrics.jsonl lines, the one validation
pass at the last step and its fsynced ``last``/``best`` checkpoint (weights and
optimizer state); "steps only" is the time of its last train line in
metrics.jsonl, before that evaluation and checkpoint. The Trainer's
``train_runtime`` covers its training loop with ``save_strategy="no"``. Both
sides also read the clock and the RSS at the end of every step (gradwise
through fit's ``stop_requested`` poll, the Trainer through a callback): the
median gap between step ends is the per-step cost, the measure least hurt by
bursts of load on a shared machine.

The Trainer's default optimizer with torch >= 2.8 is fused AdamW; gradwise
builds torch's AdamW with its defaults (the single-tensor for-loop on CPU).
``--hf-optim adamw_torch`` gives the Trainer the same for-loop AdamW.

    .venv/bin/python benchmarks/finetune_vs_hf.py                      # defaults: 512 texts, 2 epochs, 2 rounds
    .venv/bin/python benchmarks/finetune_vs_hf.py --hf-optim adamw_torch           # same AdamW kernel both sides
    .venv/bin/python benchmarks/finetune_vs_hf.py --limit 1146 --epochs 3 --repeats 3
"""

from __future__ import annotations

import os

# Nothing may come from a hub; set before transformers is imported anywhere (children inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import hashlib
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.config import RunConfig, validate
from gradwise.data import Split, load_dataset
from gradwise.train.adapt import model_dir

SIDES = ("gradwise", "hf")
WARMUP_FRACTION = 0.1


# --------------------------------------------------------------------------- the shared setup


def make_config(args: argparse.Namespace, warmup_steps: int) -> RunConfig:
    """The gradwise run both sides reproduce (the Trainer side reads its data, model and settings from it)."""
    return validate(
        {
            "name": "finetune-vs-hf",
            "seed": args.seed,
            "device": "cpu",
            "precision": "fp32",
            "data": {"name": "topics", "limit": args.limit, "max_length": args.max_length},
            "model": {"name": "hf_encoder", "pooling": "mean"},
            "optim": {"name": "adamw", "lr": args.lr},
            "regularize": {"weight_decay": 0.01, "clip_grad_norm": 1.0},
            "schedule": {"name": "linear", "warmup_steps": warmup_steps},
            "batch": {"size": args.batch},
            "stop": {"epochs": args.epochs},
            # Evaluate only at the last step (fit always does): no evaluation during training.
            "eval": {"every_steps": 10**9},
            "log": {"progress": False, "plots": False},
        },
        source="finetune_vs_hf",
    )


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """A short SHA-256 of the tensors' bytes: equal digests mean bit-identical tensors."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_digest(split: Split) -> str:
    assert split.lengths is not None
    return tensor_digest([split.x, split.lengths, split.y])


def weights_digest(model: nn.Module) -> str:
    return tensor_digest([p for _, p in sorted(model.state_dict().items())])


def rss_now_mb() -> float:
    """Current resident set size in MB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class StepProbe:
    """The clock and the RSS read at the end of every optimizer step, the same way on both sides.

    ``step_s`` is the median time between consecutive step ends, leaving out the last step (gradwise
    evaluates and writes its checkpoint in it): the per-step cost, robust to bursts of load on a shared
    machine. ``steady_rss_mb`` is the largest RSS read before the last step.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rss: list[float] = []

    def sample(self) -> None:
        self.times.append(time.perf_counter())
        self.rss.append(rss_now_mb())

    @property
    def step_s(self) -> float:
        gaps = [b - a for a, b in zip(self.times[:-2], self.times[1:-1], strict=True)]
        return statistics.median(gaps) if gaps else math.nan

    @property
    def steady_rss_mb(self) -> float:
        return max(self.rss[:-1] or self.rss or [math.nan])


def padded_tokens_gradwise(cfg: RunConfig, split: Split, steps: int) -> int:
    """Token slots (batch × longest row) gradwise's sampler feeds over ``steps`` steps, replayed from its seed."""
    from gradwise.train.batching import EpochSampler
    from gradwise.train.setup import SAMPLER_SEED_OFFSET

    assert split.lengths is not None and isinstance(cfg.batch.size, int)
    sampler = EpochSampler(len(split.y), seed=cfg.seed + SAMPLER_SEED_OFFSET)
    total = 0
    for _ in range(steps):
        rows, _ = sampler.take(cfg.batch.size)
        total += len(rows) * int(split.lengths[rows].max())
    return total


def decay_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    """Names of the parameters in groups with weight decay > 0."""
    return sorted(names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])


def adamw_kind(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop (CPU default)"
    return f"{type(optimizer).__name__} {kind}"


# --------------------------------------------------------------------------- gradwise side


def run_gradwise(args: argparse.Namespace, cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    from gradwise.optim import build_optimizer
    from gradwise.store.checkpoint import load_model_state, load_weights_into, resolve_checkpoint
    from gradwise.store.rundir import read_metrics
    from gradwise.train.evaluate import evaluate
    from gradwise.train.loop import fit
    from gradwise.train.setup import build_model_and_data

    run_dir = workdir / f"gradwise-{time.monotonic_ns()}"
    probe = StepProbe()

    def after_step() -> bool:  # fit polls this after every step; used only to read the clock and the RSS
        probe.sample()
        return False

    summary = fit(cfg, run_dir, stop_requested=after_step)
    peak = peak_rss_mb()  # before anything below allocates
    train_lines, _ = read_metrics(run_dir)

    # Rebuild exactly as fit did (same seed): the initial weights and data, for the digests; then score the
    # trained weights with the same evaluate() the Trainer side uses.
    data, model, task, device = build_model_and_data(cfg, training=True)
    init_digest = weights_digest(model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, cfg.regularize.weight_decay)
    last = resolve_checkpoint(run_dir, "last")
    load_weights_into(model, load_model_state(last), last)
    test = evaluate(model, task, data.test, "test", cfg.eval.batch_size, device, cfg.precision).metrics
    return {
        "train_time_s": summary["wall_time_s"],
        "steps_time_s": train_lines[-1]["time"],
        "examples": summary["examples"],
        "steps": summary["steps"],
        "peak_rss_mb": peak,
        "steady_rss_mb": probe.steady_rss_mb,
        "step_s": probe.step_s,
        "padded_tokens": padded_tokens_gradwise(cfg, data.train, summary["steps"]),
        "real_tokens": int(data.train.lengths.sum()) * args.epochs,
        "test_accuracy": test["test_accuracy"],
        "test_macro_f1": test["test_macro_f1"],
        "summary_test_accuracy": summary["final"].get("test_accuracy"),
        "data_digest": data_digest(data.train),
        "init_digest": init_digest,
        "decay_names": decay_names(optimizer, names),
        "optimizer": adamw_kind(optimizer),
    }


# --------------------------------------------------------------------------- Hugging Face side


class TokenRows(torch.utils.data.Dataset):
    """gradwise's token ids, each row trimmed to its true length, as ``{"input_ids", "labels"}``."""

    def __init__(self, split: Split) -> None:
        assert split.lengths is not None
        self.rows = [split.x[i, : int(n)] for i, n in enumerate(split.lengths)]
        self.labels = split.y

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.labels[i]}


class PadCollator:
    """Dynamic padding to the batch's longest row, as ``DataCollatorWithPadding`` does (no attention mask:
    the model derives it from the pad id)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.padded_tokens = 0  # token slots fed to the model, padding included

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = nn.utils.rnn.pad_sequence([f["input_ids"] for f in features], batch_first=True, padding_value=self.pad_id)
        self.padded_tokens += ids.numel()
        return {"input_ids": ids, "labels": torch.stack([f["labels"] for f in features])}


class WithLoss(nn.Module):
    """The Trainer's view of the classifier: ``forward(input_ids, labels)`` → ``{"loss", "logits"}``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def run_hf(args: argparse.Namespace, cfg: RunConfig, workdir: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradwise.train.evaluate import evaluate
    from gradwise.train.setup import build_model_and_data

    data, model, task, device = build_model_and_data(cfg, training=True)  # fit's own first step: same weights
    init_digest = weights_digest(model)
    assert data.info.pad_token_id is not None
    probe = StepProbe()
    collator = PadCollator(data.info.pad_token_id)

    class ProbeCallback(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            probe.sample()

    training_args = TrainingArguments(
        output_dir=str(workdir / f"hf-{time.monotonic_ns()}"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        **({} if args.hf_optim == "default" else {"optim": args.hf_optim}),
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=cfg.seed,
        use_cpu=True,
    )
    wrapper = WithLoss(model)
    trainer = Trainer(
        model=wrapper,
        args=training_args,
        train_dataset=TokenRows(data.train),
        data_collator=collator,
        callbacks=[ProbeCallback()],
    )
    result = trainer.train()
    peak = peak_rss_mb()
    names = {id(p): n.removeprefix("model.") for n, p in wrapper.named_parameters()}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    test = evaluate(model, task, data.test, "test", cfg.eval.batch_size, device, cfg.precision).metrics
    return {
        "train_time_s": result.metrics["train_runtime"],
        "steps_time_s": result.metrics["train_runtime"],
        "examples": len(data.train.y) * args.epochs,
        "steps": trainer.state.global_step,
        "peak_rss_mb": peak,
        "steady_rss_mb": probe.steady_rss_mb,
        "step_s": probe.step_s,
        "padded_tokens": collator.padded_tokens,
        "real_tokens": int(data.train.lengths.sum()) * args.epochs,
        "test_accuracy": test["test_accuracy"],
        "test_macro_f1": test["test_macro_f1"],
        "data_digest": data_digest(data.train),
        "init_digest": init_digest,
        "decay_names": decay_names(optimizer, names),
        "optimizer": adamw_kind(optimizer),
    }


# --------------------------------------------------------------------------- child and parent


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cfg = make_config(args, args.warmup)
    with tempfile.TemporaryDirectory(prefix=f"finetune-vs-hf-{args.side}-") as tmp:
        result = (run_gradwise if args.side == "gradwise" else run_hf)(args, cfg, Path(tmp))
    result["side"] = args.side
    result["threads"] = torch.get_num_threads()
    Path(args.json).write_text(json.dumps(result))


def run_side(side: str, args: argparse.Namespace, warmup: int, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", side, "--json", str(out), "--warmup", str(warmup)]
    for flag in ("limit", "epochs", "max_length", "batch", "lr", "seed", "threads", "hf_optim"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{side} child failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def fmt_all(values: list[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def report(runs: dict[str, list[dict[str, Any]]], header: str) -> None:
    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    def values(side: str, key: str) -> list[float]:
        return [r[key] for r in runs[side]]

    rows = [
        ("train examples/s", lambda r: r["examples"] / r["train_time_s"], ".2f"),
        ("train time s", lambda r: r["train_time_s"], ".2f"),
        ("steps-only examples/s", lambda r: r["examples"] / r["steps_time_s"], ".2f"),
        ("median step s", lambda r: r["step_s"], ".3f"),
        ("padded tokens trained", lambda r: r["padded_tokens"], ".0f"),
        ("peak RSS MB", lambda r: r["peak_rss_mb"], ".0f"),
        ("RSS between steps MB", lambda r: r["steady_rss_mb"], ".0f"),
        ("test accuracy", lambda r: r["test_accuracy"], ".4f"),
        ("test macro-F1", lambda r: r["test_macro_f1"], ".4f"),
    ]
    print(header)
    print()
    print("| median (all runs) | gradwise | HF Trainer | gradwise/HF |")
    print("|---|---|---|---|")
    for label, get, spec in rows:
        g = [get(r) for r in runs["gradwise"]]
        h = [get(r) for r in runs["hf"]]
        gm, hm = statistics.median(g), statistics.median(h)
        ratio = gm / hm if hm else math.nan
        print(f"| {label} | {gm:{spec}} ({fmt_all(g, spec)}) | {hm:{spec}} ({fmt_all(h, spec)}) | {ratio:.3f} |")
    g0, h0 = runs["gradwise"][0], runs["hf"][0]
    print()
    print(f"optimizer: gradwise {g0['optimizer']}; HF {h0['optimizer']}")
    print(
        f"steps: gradwise {values('gradwise', 'steps')}, HF {values('hf', 'steps')}; examples {g0['examples']}; "
        f"real tokens {g0['real_tokens']} (gradwise) / {h0['real_tokens']} (HF)"
    )
    same_data = len({r["data_digest"] for side in SIDES for r in runs[side]}) == 1
    same_init = len({r["init_digest"] for side in SIDES for r in runs[side]}) == 1
    same_decay = g0["decay_names"] == h0["decay_names"]
    print(f"same token ids: {same_data}; same initial weights: {same_init}; same no-decay split: {same_decay}")
    if not same_decay:
        print(f"  decayed by gradwise only: {sorted(set(g0['decay_names']) - set(h0['decay_names']))}")
        print(f"  decayed by HF only: {sorted(set(h0['decay_names']) - set(g0['decay_names']))}")
    summary = [r["summary_test_accuracy"] for r in runs["gradwise"]]
    print(f"gradwise summary.json test_accuracy (same evaluate, inside fit): {fmt_all(summary, '.4f')}")
    print(f"torch threads: gradwise {values('gradwise', 'threads')}, HF {values('hf', 'threads')}")


def parent(args: argparse.Namespace) -> None:
    import transformers

    torch.set_num_threads(args.threads)
    cfg = make_config(args, warmup_steps=0)
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed, tokenizer_dir=model_dir(cfg))
    n_train = len(data.train.y)
    steps = args.epochs * math.ceil(n_train / args.batch)
    warmup = math.ceil(WARMUP_FRACTION * steps)  # what the Trainer's warmup ratio 0.1 rounds to
    assert data.train.lengths is not None
    mean_len = float(data.train.lengths.float().mean())
    header = (
        f"MiniLM fine-tune, chatterbot topics: {len(data.train.y) + len(data.val.y) + len(data.test.y)} texts "
        f"(train {n_train} / val {len(data.val.y)} / test {len(data.test.y)}), {data.info.n_outputs} classes, "
        f"max_length {args.max_length} (mean {mean_len:.1f} tokens), batch {args.batch}, {args.epochs} epochs = "
        f"{steps} steps, warmup {warmup}, lr {args.lr:g}, {args.threads} torch threads, {args.repeats} alternated "
        f"rounds; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(header, flush=True)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="finetune-vs-hf-") as tmp:
        for round_ in range(args.repeats):
            for side in SIDES:
                start = time.perf_counter()
                result = run_side(side, args, warmup, Path(tmp) / f"{side}-{round_}.json")
                runs[side].append(result)
                print(
                    f"  round {round_ + 1} {side:8s}: {result['examples'] / result['train_time_s']:.2f} ex/s, "
                    f"peak {result['peak_rss_mb']:.0f} MB, test acc {result['test_accuracy']:.4f} "
                    f"({time.perf_counter() - start:.0f} s with start-up)",
                    flush=True,
                )
    print()
    report(runs, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds (each trains both sides once)")
    parser.add_argument("--limit", type=int, default=512, help="texts taken from the topics data (stratified)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    parser.add_argument(
        "--hf-optim", default="default", help="TrainingArguments.optim (default: the Trainer's own, fused AdamW)"
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
