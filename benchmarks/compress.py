"""Every compression variant of the digits CNN and the fine-tuned MiniLM, measured side by side on CPU.

For each model the source run is trained with its bundled recipe (or reused with
``--runs``), then ``gradwise compress`` makes every variant of the matching
compression recipe and measures the source and all variants with one function,
in one process, one after another: the same fixed test rows, the same thread
count, warm-up calls, then timed repeats (median and p95). Ratios are
source/variant, so above 1 means smaller or faster; the metric change is in
test-accuracy points. Targets from the issue are checked and printed:

- MiniLM: an int8 variant at least 1.5x faster than fp32 at batch 1 with at most 1 point of accuracy lost
  (PyTorch's BERT dynamic-quantization tutorial measured 1.78x on one thread);
- digits CNN: structured pruning of 50% of the channels at least 1.5x faster.

    .venv/bin/python benchmarks/compress.py                         # both models (about 20 minutes on 2 cores)
    .venv/bin/python benchmarks/compress.py --models cnn            # the CNN only (about a minute)
    .venv/bin/python benchmarks/compress.py --runs /tmp/bench-runs  # reuse source runs trained before
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = {
    # name: (training recipe, compression recipe, threads overrides)
    "cnn": ("digits-cnn", "compress-digits-cnn"),
    "minilm": ("minilm-topics", "compress-minilm"),
}


def source_run(runs: Path, recipe: str) -> Path:
    """The newest finished run of ``recipe`` under ``runs``, trained now if there is none."""
    from gradwise.config import load_config
    from gradwise.experiments.recipes import find_recipe
    from gradwise.store.rundir import new_run_dir
    from gradwise.train.loop import fit

    finished = sorted(p.parent for p in runs.glob(f"{recipe}-*/summary.json"))
    for run in reversed(finished):
        if json.loads((run / "summary.json").read_text()).get("status") == "completed":
            return run
    cfg = load_config(find_recipe(recipe), [f"out_dir={runs}", "log.progress=false"])
    run_dir = new_run_dir(cfg, recipe)
    fit(cfg, run_dir)
    return run_dir


def compress(run_dir: Path, recipe: str, overrides: list[str]) -> list[dict]:
    from gradwise.compress.compare import measure_all, write_comparison
    from gradwise.compress.pipeline import compress_run, source_budget
    from gradwise.compress.recipe import load_compress_recipe
    from gradwise.experiments.recipes import find_recipe

    plan = load_compress_recipe(find_recipe(recipe), overrides)
    budget = source_budget(run_dir, plan)
    results = compress_run(run_dir, plan)
    rows = measure_all(run_dir, results, plan.measure, budget)
    print(write_comparison(run_dir, rows, budget).read_text())
    return rows


def check_targets(model: str, rows: list[dict]) -> list[str]:
    """One line per target of the issue: the best qualifying variant and whether it meets the target."""
    lines = []
    by_name = {r["variant"]: r for r in rows}
    first_batch = next(iter(rows[0]["latency_ms"]))
    if model == "minilm":
        int8 = [r for r in rows if r.get("quantization") and r["status"] == "accepted"]
        good = [r for r in int8 if (r["metric_change"] or 0) >= -0.01]
        best = max(good or int8, key=lambda r: r["speedup"][first_batch], default=None)
        if best is not None:
            ok = best["speedup"][first_batch] >= 1.5 and (best["metric_change"] or 0) >= -0.01
            lines.append(
                f"minilm int8: {best['variant']} {best['speedup'][first_batch]:.2f}x at batch {first_batch}, "
                f"accuracy {best['metric_change']:+.4f} -> target (>=1.5x, >=-0.01) {'MET' if ok else 'NOT MET'}"
            )
    if model == "cnn" and "structured-50" in by_name:
        row = by_name["structured-50"]
        speed = {b: round(s, 2) for b, s in row["speedup"].items()}
        ok = max(speed.values()) >= 1.5
        lines.append(
            f"cnn structured-50: speedup by batch {speed}, parameters {row['parameters']:,} vs "
            f"{rows[0]['parameters']:,}, accuracy {row['metric_change']:+.4f} -> target (>=1.5x) "
            f"{'MET' if ok else 'NOT MET'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,minilm", help="comma-separated: cnn, minilm")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-compress"), help="where source runs live")
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads while timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per batch size (recipe default)")
    args = parser.parse_args(argv)

    import logging

    import torch

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args.runs.mkdir(parents=True, exist_ok=True)
    overrides = [f"measure.threads={args.threads}"]
    if args.repeats:
        overrides.append(f"measure.repeats={args.repeats}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, timing with {args.threads} thread(s)\n")
    summary = []
    for model in args.models.split(","):
        train_recipe, compress_recipe = MODELS[model]
        run_dir = source_run(args.runs, train_recipe)
        print(f"## {model}: {run_dir} with {compress_recipe}\n")
        summary += check_targets(model, compress(run_dir, compress_recipe, overrides))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
