"""GPT training throughput and MFU in bf16: gradwise (``model.name=gpt``) vs a plain compiled PyTorch loop.

Both sides train the same model — transformers' ``GPT2LMHeadModel`` built from a ``GPT2Config`` (random
weights; ``--size 125m``: 12 layers, 12 heads, width 768, context 1024, the GPT-2 small shape) — on the
same data, gradwise's ``python_source`` blocks (the standard library's source, a byte-level BPE of
``--vocab`` trained locally and cached), with the same optimization: AdamW (fused), lr 6e-4, betas
(0.9, 0.95), no weight decay, clipping at norm 1.0, constant LR, batch ``--batch`` x ``--seq-len``
tokens, bf16 autocast over fp32 weights, ``torch.compile`` (gradwise ``model.compile=step``: the loss with
its backward compiled as one graph, and gradwise's chunked cross-entropy at this vocabulary; the plain loop
compiles the model; if compiling fails, that side runs eager and the table says so).

- gradwise: ``fit`` in this process, as a user runs it (per-step metrics line, evaluation and checkpoint
  at the end); the clock is read (after ``torch.cuda.synchronize``) at every step end through fit's
  ``stop_requested`` poll.
- plain: the same model built directly from ``GPT2Config``, ``torch.compile``-d, a hand-written loop
  (random blocks of the same training split, pinned and copied per step, forward under autocast, fp32
  cross-entropy, backward, clip, step), the clock read the same way.

tokens/s = batch x seq_len tokens per step over the steps after ``--warmup`` (compilation and the
allocator's warm-up are left out, on both sides). MFU = 6·N·tokens/s / peak, N = every parameter (the
tied embedding once), peak = the bf16 (``--dtype``) matmul rate measured here on a large square matmul
(:func:`measure_peak_flops`), not the datasheet's; "MFU with attention" adds nanoGPT's 12·L·d·T per token.
Peak memory: ``torch.cuda.max_memory_allocated`` of each side (reset in between).

``--nproc N`` instead runs gradwise alone as ``gradwise train RECIPE --nproc N distributed.strategy=fsdp``
(FSDP2 over N processes, global batch ``--batch``), timed from the ``time`` of its metrics.jsonl train lines
between two of the loop's settle points (so at least 33 steps are needed for a synced window; see
:func:`fsdp_window`); MFU is per device (divided by N x peak).

    .venv/bin/python benchmarks/gpt_mfu.py --device cuda                       # 125M at 1024 tokens, bf16, compiled
    .venv/bin/python benchmarks/gpt_mfu.py --device cuda --nproc 2             # the same under FSDP2 on 2 GPUs
    .venv/bin/python benchmarks/gpt_mfu.py --device cpu --size tiny --dtype float32 --steps 8 --warmup 3  # CPU check
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SIZES: dict[str, dict[str, int]] = {
    # GPT-2 small's shape; vocabulary 50304 (GPT-2's 50257 rounded up to a multiple of 64) → ~124M parameters.
    "125m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "seq_len": 1024, "vocab": 50304, "corpus_chars": 3_000_000},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "seq_len": 64, "vocab": 512, "corpus_chars": 200_000},
}
LR, BETAS = 6e-4, (0.9, 0.95)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None) -> float:
    """The best FLOP/s of ``n x n`` matmuls in ``dtype`` on ``device`` (best of 5 timed bursts)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    del a, b
    return best


def gradwise_raw(args: argparse.Namespace, compile_model: bool) -> dict[str, Any]:
    size = SIZES[args.size]
    return {
        "name": "gpt-mfu",
        "seed": 0,
        "device": args.device,
        "precision": "bf16" if args.dtype == "bfloat16" else "fp32",
        "data": {
            "name": "python_source",
            "seq_len": args.seq_len,
            "vocab_size": args.vocab or size["vocab"],
            "corpus_chars": args.corpus_chars or size["corpus_chars"],
            # A small validation split and no test split: fit's final evaluation stays short.
            "val_fraction": 0.05,
            "test_fraction": 0.0,
        },
        "model": {
            "name": "gpt",
            "n_layer": size["n_layer"],
            "n_head": size["n_head"],
            "n_embd": size["n_embd"],
            # The whole step compiled (forward + loss + backward; the fused AdamW is one kernel already).
            "compile": "step" if compile_model else False,
        },
        "task": {"kind": "language_modeling"},
        "optim": {"name": "adamw", "lr": LR, "betas": list(BETAS)},
        "regularize": {"clip_grad_norm": 1.0},
        "schedule": {"name": "constant"},
        "batch": {"size": args.batch},
        "stop": {"epochs": None, "max_steps": args.steps},
        "eval": {"every_steps": 10**9, "batch_size": args.batch},
        "log": {"progress": False, "plots": False},
    }


def window(times: list[float], warmup: int, tokens_per_step: int) -> dict[str, float]:
    """tokens/s and median step time over the steps after ``warmup`` (``times``: clock at each step end)."""
    kept = times[max(warmup - 1, 0) :]
    if len(kept) < 2:
        return {"tokens_per_s": math.nan, "step_s": math.nan, "timed_steps": 0}
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    return {
        "tokens_per_s": tokens_per_step * len(gaps) / (kept[-1] - kept[0]),
        "step_s": statistics.median(gaps),
        "timed_steps": len(gaps),
    }


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()


def peak_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan


def run_gradwise(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    from gradwise.config import validate
    from gradwise.train.loop import fit

    errors = []
    for compile_model in [True, False] if args.compile else [False]:
        reset_memory(device)
        times: list[float] = []

        def after_step(times: list[float] = times) -> bool:  # fit polls this after every step: the clock
            sync(device)
            times.append(time.perf_counter())
            return False

        cfg = validate(gradwise_raw(args, compile_model), source="gpt_mfu")
        try:
            summary = fit(cfg, work / f"gradwise-{time.monotonic_ns()}", stop_requested=after_step)
        except Exception as exc:  # a compile failure: measure eager and say why
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        return {
            **window(times, args.warmup, args.batch * args.seq_len),
            "compiled": compile_model,
            "compile_error": errors[0] if errors else None,
            "parameters": summary["parameters"],
            "peak_memory_mb": peak_memory_mb(device),
            "final_val_loss": summary["final"].get("val_loss"),
            "wall_time_s": summary["wall_time_s"],
        }
    raise RuntimeError(f"gradwise failed: {errors}")


def run_plain(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gradwise.config import validate
    from gradwise.data import load_dataset

    cfg = validate(gradwise_raw(args, False), source="gpt_mfu")
    data = load_dataset(cfg.data, cfg.task.kind, cfg.seed)  # the same cached corpus gradwise trained on
    info, size = data.info, SIZES[args.size]
    reset_memory(device)
    torch.manual_seed(0)
    config = GPT2Config(  # what gradwise.models.gpt.build_gpt builds
        vocab_size=info.vocab_size,
        n_positions=args.seq_len,
        n_embd=size["n_embd"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=info.pad_token_id,
        eos_token_id=info.pad_token_id,
        pad_token_id=None,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0, fused=True)
    x_all, y_all = data.train.x, data.train.y
    pin = device.type == "cuda"
    error = None
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    generator = torch.Generator().manual_seed(0)

    def one_step(fn: Any) -> None:
        rows = torch.randint(0, len(x_all), (args.batch,), generator=generator)
        x, y = x_all[rows], y_all[rows]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = fn(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: list[float] = []
    compiled = args.compile
    for _ in range(args.steps):
        try:
            one_step(step_fn)
        except Exception as exc:  # a compile failure: measure eager and say why
            if step_fn is model:
                raise
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            step_fn, compiled, times = model, False, []
            optimizer.zero_grad(set_to_none=True)
            one_step(step_fn)
        sync(device)
        times.append(time.perf_counter())
    result = {
        **window(times, args.warmup, args.batch * args.seq_len),
        "compiled": compiled,
        "compile_error": error,
        "parameters": parameters,
        "peak_memory_mb": peak_memory_mb(device),
    }
    return result


def run_fsdp(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """gradwise's CLI: ``gradwise train RECIPE --nproc N distributed.strategy=fsdp``, timed from its metrics.jsonl."""
    from gradwise.store.rundir import read_metrics

    errors: list[str] = []
    for compile_model in [True, False] if args.compile else [False]:
        raw = gradwise_raw(args, compile_model)
        raw["out_dir"] = str(work)
        recipe = work / "gpt-mfu-fsdp.yaml"
        recipe.write_text(json.dumps(raw))  # JSON is YAML
        name = f"fsdp-{'compiled' if compile_model else 'eager'}"
        command = [
            sys.executable,
            "-m",
            "gradwise",
            "train",
            str(recipe),
            "--nproc",
            str(args.nproc),
            "distributed.strategy=fsdp",
            f"name={name}",
            *args.fsdp_overrides,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            break
        errors.append(
            f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else ''}"
        )
    else:
        raise RuntimeError(f"gradwise --nproc {args.nproc} failed: {errors}\n{done.stderr[-3000:]}")
    run_dir = work / name
    summary = json.loads((run_dir / "summary.json").read_text())
    lines, _ = read_metrics(run_dir)
    return {
        **fsdp_window(lines, args),
        "compiled": compile_model,
        "compile_error": errors[0] if errors else None,
        "parameters": summary["parameters"],
        "processes": summary["processes"],
        "strategy": summary["strategy"],
        "state_mb_per_process": summary["state_mb_per_process"],
        "peak_memory_mb": math.nan,
        "final_val_loss": summary["final"].get("val_loss"),
        "command": " ".join(command[1:]),
    }


def fsdp_window(lines: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """tokens/s from metrics.jsonl ``time`` values that follow a GPU sync.

    Under torch.distributed the loop waits for the device only where the ranks settle (every
    ``STOP_CHECK_STEPS`` steps), and each line's ``time`` is read before that. So the line after a
    settle at step ``s`` (step ``s + 1``) is the first one read after steps ``1..s`` finished on the
    device. The window runs between two such lines, both past the warm-up.
    """
    from gradwise.train.loop import STOP_CHECK_STEPS

    times = {line["step"]: line["time"] for line in lines}
    marks = [
        s + 1 for s in range(STOP_CHECK_STEPS, args.steps, STOP_CHECK_STEPS) if s >= args.warmup and s + 1 in times
    ]
    if len(marks) < 2:  # too few steps for two settles: every line (exact where each step syncs, as on CPU)
        return window([line["time"] for line in lines], args.warmup, args.batch * args.seq_len)
    steps = marks[-1] - marks[0]
    span = times[marks[-1]] - times[marks[0]]
    return {"tokens_per_s": args.batch * args.seq_len * steps / span, "step_s": span / steps, "timed_steps": steps}


def mfu(result: dict[str, Any], args: argparse.Namespace, peak: float, devices: int = 1) -> tuple[float, float]:
    size = SIZES[args.size]
    n = result["parameters"]
    per_token = 6 * n
    with_attention = per_token + 12 * size["n_layer"] * size["n_embd"] * args.seq_len
    rate = result["tokens_per_s"]
    return per_token * rate / (peak * devices), with_attention * rate / (peak * devices)


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    peak = results["peak_flops"]
    head = (
        f"GPT ({args.size}: {results['parameters'] / 1e6:.1f}M parameters, {SIZES[args.size]['n_layer']} layers, "
        f"width {SIZES[args.size]['n_embd']}), seq {args.seq_len}, batch {args.batch}, {args.steps} steps "
        f"({args.warmup} warm-up left out), {args.device} {args.dtype}; measured matmul peak "
        f"{peak / 1e12:.1f} TFLOP/s; torch {torch.__version__}"
    )
    lines = [
        head,
        "",
        "| side | tokens/s | median step s | MFU (6N) | MFU with attention | peak memory MB | compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for side, r in results["sides"].items():
        m6, ma = r["mfu"], r["mfu_attention"]
        compiled = "yes" if r["compiled"] else f"no ({r['compile_error'] or 'off'})"
        lines.append(
            f"| {side} | {r['tokens_per_s']:.0f} | {r['step_s']:.4f} | {m6:.3f} | {ma:.3f} | "
            f"{r['peak_memory_mb']:.0f} | {compiled} |"
        )
    if "ratio" in results:
        lines += ["", f"gradwise/plain tokens/s: {results['ratio']:.3f}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--size", choices=sorted(SIZES), default="125m")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the size's (1024 for 125m)")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default: the size's)")
    parser.add_argument("--corpus-chars", type=int, default=None, help="characters of stdlib source read")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing (compilation)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager on both sides")
    parser.add_argument("--nproc", type=int, default=1, help=">1: gradwise FSDP2 over this many processes only")
    parser.add_argument("--fsdp-overrides", nargs="*", default=[], help="extra key=value for the FSDP run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.seq_len = args.seq_len or SIZES[args.size]["seq_len"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    peak = measure_peak_flops(device, dtype)
    print(f"measured {args.dtype} matmul peak on {device}: {peak / 1e12:.2f} TFLOP/s", flush=True)
    sides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpt-mfu-") as tmp:
        work = Path(tmp)
        if args.nproc > 1:
            r = run_fsdp(args, work)
            r["mfu"], r["mfu_attention"] = mfu(r, args, peak, devices=args.nproc)
            sides[f"gradwise FSDP2 x{args.nproc}"] = r
        else:
            sides["gradwise"] = run_gradwise(args, device, work)
            print(f"  gradwise: {sides['gradwise']['tokens_per_s']:.0f} tokens/s", flush=True)
            if args.out:  # what a run cut short by a timeout still leaves
                Path(args.out).write_text(json.dumps({"peak_flops": peak, "sides": sides}, indent=1))
            sides["plain"] = run_plain(args, device)
            print(f"  plain:    {sides['plain']['tokens_per_s']:.0f} tokens/s", flush=True)
            for r in sides.values():
                r["mfu"], r["mfu_attention"] = mfu(r, args, peak)
    first = next(iter(sides.values()))
    results: dict[str, Any] = {
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": peak,
        "parameters": first["parameters"],
        "torch": torch.__version__,
        "sides": sides,
    }
    if "plain" in sides:
        results["ratio"] = sides["gradwise"]["tokens_per_s"] / sides["plain"]["tokens_per_s"]
        if sides["gradwise"]["parameters"] != sides["plain"]["parameters"]:
            print(f"warning: parameters differ: {sides['gradwise']['parameters']} vs {sides['plain']['parameters']}")
    results["markdown"] = markdown(results, args)
    print()
    print(results["markdown"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
