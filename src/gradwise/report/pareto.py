"""The Pareto picture of a compression: quality against latency and against size, one point per model.

A point is on the frontier when no other accepted model is at least as fast
(or small) and at least as good; the frontier is drawn as a step line so the
trade-off reads at a glance. Rejected variants (over the accuracy budget) are
grey crosses, the source run a black star.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradwise.report.plots import _figure, _metric_label, _save

_BASELINE = "baseline"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points not dominated by another: lower cost (x) and better quality (y), sorted by cost."""
    order = sorted(
        range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_is_better else points[i][1])
    )
    front, best = [], None
    for i in order:
        quality = points[i][1] if higher_is_better else -points[i][1]
        if best is None or quality > best:
            front.append(i)
            best = quality
    return front


def write_pareto_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Two panels — metric vs batch-1 latency, metric vs bytes on disk — for the rows of a comparison."""
    metric = rows[0]["metric"]
    higher = not any(k in metric for k in ("loss", "mse", "mae", "perplexity"))
    batch = next(iter(rows[0]["latency_ms"]))
    fig = _figure((11.0, 4.6))
    panels = [
        (
            fig.add_subplot(1, 2, 1),
            lambda r: r["latency_ms"][batch]["median"],
            f"latency at batch {batch} (ms, median)",
        ),
        (fig.add_subplot(1, 2, 2), lambda r: r["bytes_on_disk"] / 1e6, "weights on disk (MB)"),
    ]
    for ax, cost, xlabel in panels:
        kept = [r for r in rows if r["status"] != "rejected" and r["metric_value"] is not None]
        points = [(cost(r), r["metric_value"]) for r in kept]
        front = pareto_front(points, higher)
        if len(front) > 1:
            xs = [points[i][0] for i in front]
            ys = [points[i][1] for i in front]
            ax.step(xs, ys, where="post", color="tab:blue", alpha=0.5, lw=1.5, label="Pareto frontier")
        placed: list[tuple[float, float]] = []
        values = [r["metric_value"] for r in rows if r["metric_value"] is not None]
        span = (max(values) - min(values)) or 1.0
        for row in rows:
            if row["metric_value"] is None:
                continue
            x, y = cost(row), row["metric_value"]
            if row["variant"] == _BASELINE:
                ax.plot([x], [y], "*", color="black", ms=14, label="source run", zorder=5)
            elif row["status"] == "rejected":
                ax.plot([x], [y], "x", color="grey", ms=9, zorder=4)
            else:
                ax.plot([x], [y], "o", color="tab:blue", ms=7, zorder=4)
            # Variants at the same spot (an export and its source, a rejected chain and its first step):
            # stack their labels instead of printing them on top of each other.
            near = sum(1 for px, py in placed if abs(px - x) <= 0.05 * max(x, 1e-12) and abs(py - y) <= 0.02 * span)
            placed.append((x, y))
            ax.annotate(
                row["variant"], (x, y), textcoords="offset points", xytext=(6, 4 - 10 * near), fontsize="x-small"
            )
        costs = [cost(r) for r in rows if r["metric_value"] is not None]
        if min(costs) > 0 and max(costs) / min(costs) > 10:
            ax.set_xscale("log")
            xlabel += " — log scale"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_label(metric))
        ax.grid(alpha=0.3, which="both")
        if any(r["status"] == "accepted" for r in rows):
            ax.plot([], [], "o", color="tab:blue", label="variant within budget")
        if any(r["status"] == "rejected" for r in rows):
            ax.plot([], [], "x", color="grey", label="rejected (over budget)")
        ax.legend(fontsize="small", loc="best")
    fig.suptitle(f"Compression trade-offs: {metric} vs speed and size (upper left is better)")
    return _save(fig, out)
