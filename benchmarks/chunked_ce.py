"""Peak memory and step time of a large-vocabulary GPT's training step: chunked cross-entropy vs full logits.

The model is gradwise's ``gpt`` (transformers' ``GPT2LMHeadModel``, tied head) built with
``build_gpt`` at the GPT-2 tokenizer's vocabulary (50257 by default); the step is the loop's:
forward in train mode, ``LanguageModelingTask.loss_sum`` on what the model returns, backward. With
``model.chunked_loss`` the model returns its hidden states and the loss never holds the
``(batch·seq, vocab)`` logits (:mod:`gradwise.tasks.chunked_loss`); without it, it is today's
``F.cross_entropy`` on the full float32 logits.

Each side runs in a fresh subprocess so that neither sees the other's allocations:

- CPU: peak memory = the process's peak RSS (``ru_maxrss``) minus its RSS once the model and its
  gradient buffers exist (the gradients are kept between steps, as zeros), so it is what the steps
  add: activations, logits and their temporaries.
- CUDA: ``torch.cuda.max_memory_allocated`` over the steps minus the allocation before them.

Step time is the median over ``--steps`` steps after ``--warmup``.

    .venv/bin/python benchmarks/chunked_ce.py                                   # CPU, 4 x 512 tokens, vocab 50257
    .venv/bin/python benchmarks/chunked_ce.py --vocab 4096                      # a small BPE vocabulary
    .venv/bin/python benchmarks/chunked_ce.py --device cuda --bf16 --n-layer 12 # GPT-2 small on a GPU

References:
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models";
    Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One side's numbers, measured in this (fresh) process."""
    import torch

    from gradwise.config import ModelConfig
    from gradwise.data import DataInfo
    from gradwise.models.gpt import build_gpt
    from gradwise.tasks.language_modeling import LanguageModelingTask

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = DataInfo("language_modeling", args.seq_len, None, args.vocab, None, ["tokens"], "next", "bench",
                    vocab_size=args.vocab, pad_token_id=0)  # fmt: skip
    cfg = ModelConfig(name="gpt", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                      chunked_loss="on" if args.mode == "chunked" else "off")  # fmt: skip
    torch.manual_seed(0)
    model = build_gpt(cfg, info).to(device).train()
    task = LanguageModelingTask(args.vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the gradient buffers belong to the baseline, not to the step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = model(ids)
        loss = task.loss_sum(outputs.to(torch.float32), targets) / targets.numel()
        loss.backward()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        del outputs, loss
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return {"mode": args.mode, "peak_mb": round(peak / 2**20, 1), "step_s": round(statistics.median(times), 3),
            "first_loss": round(losses[0], 6)}  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights")
    parser.add_argument("--mode", choices=["full", "chunked"], help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.mode is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for mode in ("full", "chunked"):
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    setup = (f"{args.device}{' bf16' if args.bf16 else ''}, vocab {args.vocab}, {args.batch} x {args.seq_len} "
             f"tokens, {args.n_layer} layers x {args.n_embd}")  # fmt: skip
    print(f"| side ({setup}) | peak MB above model+grads | step s | first loss |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['peak_mb']} | {row['step_s']} | {row['first_loss']} |")


if __name__ == "__main__":
    main()
