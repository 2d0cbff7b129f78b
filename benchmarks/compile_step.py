"""``model.compile: step`` against eager (and against ``model.compile: model``) through gradwise's own loop.

Each configuration trains the same recipe from the same seed in this one process, alternated
eager / model / step over ``--repeats`` rounds (medians over the rounds are reported). The per-step
time is the span between the train lines of ``metrics.jsonl`` after ``--skip`` warm-up steps over the
steps in it (so the compile time itself, reported separately as the time to the first logged step, is
left out). Two models:

- ``mlp``: the digits MLP of ``benchmarks/overhead.py`` (64→512→256→10, batch 64, Adam or SGD momentum);
- ``gpt``: the ``gpt-python`` recipe's GPT (4 layers, 128 wide, vocab 4096, sequence 128, batch 16).

    .venv/bin/python benchmarks/compile_step.py --models mlp gpt --repeats 3

A train line's ``time`` is taken when its step ends (the loss is read later, when the window of
steps settles), so the gaps are the steps' own times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradwise.config import validate
from gradwise.train.loop import fit

MODES = {"eager": False, "model": "model", "step": "step"}


def config(model: str, mode: str, steps: int, optim: str):
    if model == "mlp":
        raw = {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [512, 256]},
            "batch": {"size": 64},
        }
    else:
        raw = {
            "data": {"name": "python_source", "corpus_chars": 400_000, "vocab_size": 4096, "seq_len": 128},
            "model": {"name": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128},
            "task": {"kind": "language_modeling"},
            "batch": {"size": 16},
        }
    raw["optim"] = (
        {"name": "adamw", "lr": 1e-3} if optim == "adamw" else {"name": "momentum", "lr": 0.01, "momentum": 0.9}
    )
    raw["model"]["compile"] = MODES[mode]
    raw.update(
        seed=0,
        device="cpu",
        stop={"epochs": None, "max_steps": steps},
        eval={"every_steps": steps},
        log={"progress": False, "plots": False},
    )
    return validate(raw)


def per_step(run_dir: Path, skip: int) -> tuple[float, float]:
    """(mean step seconds after ``skip`` steps, seconds to the first logged step).

    The mean over the span, not a median of gaps: a line's ``time`` has 0.1 ms resolution.
    """
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [line["time"] for line in lines if line["kind"] == "train"]
    kept = times[skip:]
    return (kept[-1] - kept[0]) / (len(kept) - 1), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=["mlp", "gpt"])
    parser.add_argument("--optim", default="adamw", choices=["adamw", "momentum"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        steps = args.steps if model == "mlp" else max(args.steps // 4, args.skip + 20)
        results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                with tempfile.TemporaryDirectory() as tmp:
                    started = time.perf_counter()
                    summary = fit(config(model, mode, steps, args.optim), Path(tmp) / "run")
                    wall = time.perf_counter() - started
                    step_s, first = per_step(Path(tmp) / "run", args.skip)
                    results[mode].append((step_s, first))
                    print(f"{model} {mode}: {step_s * 1e3:.3f} ms/step, first step at {first:.2f} s, "
                          f"fit {wall:.1f} s, val_loss {summary['final']['val_loss']:.4f}", flush=True)  # fmt: skip
        eager = statistics.median(s for s, _ in results["eager"])
        for mode in MODES:
            step_s = statistics.median(s for s, _ in results[mode])
            first = statistics.median(f for _, f in results[mode])
            rows.append((model, mode, step_s, first, eager / step_s))
    print("\n| model | compile | ms/step | first step s | speed-up vs eager |\n|---|---|---|---|---|")
    for model, mode, step_s, first, ratio in rows:
        print(f"| {model} | {mode} | {step_s * 1e3:.3f} | {first:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
