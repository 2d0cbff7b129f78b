"""Measuring the source run and every variant with one function, and the table that compares them.

Every row comes from :func:`gradwise.compress.measure.measure` on the same
inputs, threads and repeats, one variant after another in one process, so the
ratios are fair on a shared machine. Ratios are against the source run
("baseline"): size and latency as ``baseline / variant`` (above 1 = smaller,
faster), the metric as a difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradwise.compress.measure import MeasureSettings, measure
from gradwise.compress.pipeline import COMPRESSED_DIR, Budget, VariantResult
from gradwise.compress.recipe import MeasureConfig
from gradwise.compress.runs import load_run_model
from gradwise.compress.variant import weight_files
from gradwise.store.files import atomic_write_text
from gradwise.store.records import read_compression, write_compression

BASELINE = "baseline"


def measure_all(
    run_dir: Path, results: list[VariantResult], settings: MeasureConfig, budget: Budget
) -> list[dict[str, Any]]:
    """One row per model (the source run first), each measured by the shared function."""
    measure_settings = MeasureSettings(
        batch_sizes=tuple(settings.batch_sizes),
        repeats=settings.repeats,
        warmup=settings.warmup,
        threads=settings.threads,
    )
    cfg, data, model, task, device = load_run_model(run_dir, "best")
    rows = []
    entries = [(BASELINE, run_dir, "source", "")] + [(r.name, r.directory, r.status, r.reason) for r in results]
    for name, directory, status, reason in entries:
        if directory != run_dir:
            # Variants share the source's data; only the model is rebuilt (sized from data_info.json).
            cfg, _, model, task, device = load_run_model(directory, "best", with_data=False)
        result = measure(
            model,
            task,
            data,
            weight_files(directory),
            measure_settings,
            device=device,
            precision=cfg.precision,
            eval_batch_size=cfg.eval.batch_size,
        ).to_dict()
        row = {"variant": name, "status": status, "reason": reason, "directory": str(directory), **result}
        row["quantization"] = read_compression(directory).get("quantization")
        rows.append(row)
        if directory != run_dir:
            record = read_compression(directory)
            record["measurement"] = result
            write_compression(directory, record)
    _add_ratios(rows, budget)
    return rows


def _add_ratios(rows: list[dict[str, Any]], budget: Budget) -> None:
    base = rows[0]
    test_metric = "test_" + budget.metric.removeprefix("val_")
    for row in rows:
        row["size_ratio"] = base["bytes_on_disk"] / max(row["bytes_on_disk"], 1)
        row["nonzero_ratio"] = base["nonzeros"] / max(row["nonzeros"], 1)
        # Over every counted weight (biases included, unlike a run summary's weight-matrix "sparsity").
        row["sparsity"] = 1.0 - row["nonzeros"] / max(row["parameters"], 1)
        row["speedup"] = {
            b: base["latency_ms"][b]["median"] / max(row["latency_ms"][b]["median"], 1e-9) for b in row["latency_ms"]
        }
        metrics = row["metrics"]
        row["metric"] = test_metric if test_metric in metrics else budget.metric
        row["metric_value"] = metrics.get(row["metric"])
        base_value = base["metrics"].get(row["metric"])
        row["metric_change"] = None if base_value is None else row["metric_value"] - base_value


def write_comparison(run_dir: Path, rows: list[dict[str, Any]], budget: Budget) -> Path:
    """``compressed/comparison.json``, ``comparison.md`` and ``pareto.png``; returns the Markdown file."""
    out = run_dir / COMPRESSED_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {"source": str(run_dir), "budget": vars(budget), "rows": rows}
    atomic_write_text(out / "comparison.json", json.dumps(payload, indent=1) + "\n")
    table = comparison_table(rows, budget)
    atomic_write_text(out / "comparison.md", table)
    from gradwise.report.pareto import write_pareto_plot  # matplotlib only when writing

    write_pareto_plot(rows, out / "pareto.png")
    return out / "comparison.md"


def comparison_table(rows: list[dict[str, Any]], budget: Budget) -> str:
    """A Markdown table a person can read: quality, size and speed of every model against the source."""
    batches = list(rows[0]["latency_ms"])
    metric = rows[0]["metric"]
    head = [
        "variant",
        "status",
        metric,
        "Δ",
        budget.metric,
        "params",
        "nonzeros",
        "sparsity",
        "size MB",
        "size ×",
        *[f"b{b} ms (p95)" for b in batches],
        *[f"b{b} ×" for b in batches],
        f"b{batches[-1]} ex/s",
    ]
    lines = [
        f"Compression of `{rows[0]['directory']}` — budget: {budget.metric} at most {budget.max_drop} worse than "
        f"{budget.baseline:.4f}; {rows[0]['threads']} torch thread(s). sparsity = 1 − nonzeros / params, "
        "over every weight tensor (biases included).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        change = row["metric_change"]
        cells = [
            row["variant"],
            row["status"],
            _num(row["metric_value"]),
            "" if change is None or row["variant"] == BASELINE else f"{change:+.4f}",
            _num(row["metrics"].get(budget.metric)),
            f"{row['parameters']:,}",
            f"{row['nonzeros']:,}",
            f"{row['sparsity']:.4f}",
            f"{row['bytes_on_disk'] / 1e6:.3f}",
            f"{row['size_ratio']:.2f}",
            *[f"{row['latency_ms'][b]['median']:.3f} ({row['latency_ms'][b]['p95']:.3f})" for b in batches],
            *[f"{row['speedup'][b]:.2f}" for b in batches],
            f"{row['throughput'][batches[-1]]:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rejected = [r for r in rows if r["status"] == "rejected"]
    if rejected:
        lines += ["", "Rejected:"] + [f"- {r['variant']}: {r['reason']}" for r in rejected]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
