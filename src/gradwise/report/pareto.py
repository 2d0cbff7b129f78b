"""The Pareto picture of a compression: quality against latency and against size, one point per model.

A point is on the frontier when no other accepted model is at least as fast
(or small) and at least as good; the frontier is drawn as a step line so the
trade-off reads at a glance. Rejected variants (over the accuracy budget) are
grey crosses, the source run a black star.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.lines import Line2D

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
    """Two panels — metric vs batch-1 latency, metric vs bytes on disk — and a numbered key, for a comparison.

    Each point carries a number; the names are in the key at the right, so long names never cross. The axes
    are scaled to the source run and the accepted variants: a rejected variant outside them is drawn clipped
    at the edge and marked "off scale" in the key. Labels are nudged (measured with the renderer) until no
    two overlap.
    """
    metric = rows[0]["metric"]
    higher = not any(k in metric for k in ("loss", "mse", "mae", "perplexity"))
    batch = next(iter(rows[0]["latency_ms"]))
    drawn = [r for r in rows if r["metric_value"] is not None]
    numbers = {id(r): n for n, r in enumerate(drawn, start=1)}
    fig = _figure((13.0, 4.8))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 0.62])
    panels = [
        (
            fig.add_subplot(grid[0, 0]),
            lambda r: r["latency_ms"][batch]["median"],
            f"latency at batch {batch} (ms, median)",
        ),
        (fig.add_subplot(grid[0, 1]), lambda r: r["bytes_on_disk"] / 1e6, "weights on disk (MB)"),
    ]
    key = fig.add_subplot(grid[0, 2])
    key.set_axis_off()
    off_scale: set[int] = set()
    labels: list[tuple[Any, list[Any]]] = []
    for ax, cost, xlabel in panels:
        kept = [r for r in drawn if r["status"] != "rejected"]
        points = [(cost(r), r["metric_value"]) for r in kept]
        front = pareto_front(points, higher)
        if len(front) > 1:
            xs = [points[i][0] for i in front]
            ys = [points[i][1] for i in front]
            ax.step(xs, ys, where="post", color="tab:blue", alpha=0.5, lw=1.5)
        scale = [r for r in drawn if r["status"] != "rejected"] or drawn
        log = _use_log([cost(r) for r in scale])
        if log:
            ax.set_xscale("log")
            xlabel += " — log scale"
        (x0, x1), (y0, y1) = _limits([cost(r) for r in scale], log), _limits([r["metric_value"] for r in scale], False)
        texts = []
        for row in drawn:
            x, y = cost(row), row["metric_value"]
            if row["status"] == "rejected" and not (x0 <= x <= x1 and y0 <= y <= y1):
                off_scale.add(id(row))
                x, y = min(max(x, x0), x1), min(max(y, y0), y1)
            style = _style(row)
            ax.plot([x], [y], style["marker"], color=style["color"], ms=style["ms"], zorder=5, clip_on=False)
            texts.append(
                ax.annotate(
                    str(numbers[id(row)]),
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 3),
                    fontsize="x-small",
                    annotation_clip=False,
                )
            )
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_metric_label(metric))
        ax.grid(alpha=0.3, which="both")
        labels.append((ax, texts))
    handles, names = [], []
    if any(
        len(pareto_front([(c(r), r["metric_value"]) for r in drawn if r["status"] != "rejected"], higher)) > 1
        for _, c, _ in panels
    ):
        handles.append(Line2D([], [], color="tab:blue", alpha=0.5, lw=1.5))
        names.append("Pareto frontier")
    for row in drawn:
        style = _style(row)
        handles.append(Line2D([], [], ls="", marker=style["marker"], color=style["color"], ms=min(style["ms"], 9)))
        note = {"source": " (source run)", "rejected": " (rejected: over budget)"}.get(row["status"], "")
        if row["variant"] == _BASELINE and row["status"] != "rejected":
            note = " (source run)"
        if id(row) in off_scale:
            note = " (rejected, off scale)"
        names.append(f"{numbers[id(row)]}  {row['variant']}{note}")
    key.legend(handles, names, loc="upper left", fontsize="x-small", ncols=1 if len(names) <= 22 else 2, frameon=False)
    fig.suptitle(f"Compression trade-offs: {metric} vs speed and size (upper left is better)")
    _separate(fig, labels)
    return _save(fig, out)


def _style(row: dict[str, Any]) -> dict[str, Any]:
    if row["variant"] == _BASELINE and row["status"] != "rejected":
        return {"marker": "*", "color": "black", "ms": 13}
    if row["status"] == "rejected":
        return {"marker": "x", "color": "grey", "ms": 8}
    return {"marker": "o", "color": "tab:blue", "ms": 6}


def _use_log(values: list[float]) -> bool:
    return min(values) > 0 and max(values) / min(values) > 10


def _limits(values: list[float], log: bool) -> tuple[float, float]:
    """The view of ``values`` with a margin: 8% of the span each side (a factor on a log axis)."""
    low, high = min(values), max(values)
    if log:
        factor = (high / low) ** 0.08
        return low / factor, high * factor
    pad = 0.08 * (high - low) if high > low else 0.05 * (abs(high) or 1.0)
    return low - pad, high + pad


# Where to try a label, in points from its point: right, then above, left, below, then further out.
_OFFSETS = [(5, 3), (5, -11), (-12, 3), (-12, -11), (0, 9), (0, -16)]


def _separate(fig: Any, labels: list[tuple[Any, list[Any]]]) -> None:
    """Move each point's number to the first offset where its box overlaps no number before it."""
    fig.canvas.draw()  # the tight layout settles here; then it is fixed so moving labels cannot move the axes
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    for ax, texts in labels:
        frame = ax.get_window_extent(renderer)
        placed: list[Any] = []
        for text in texts:
            options = _OFFSETS + [(dx * ring, dy * ring) for ring in range(2, 8) for dx, dy in _OFFSETS]
            for dx, dy in options:
                text.set_position((dx, dy))
                box = text.get_window_extent(renderer).expanded(1.05, 1.1)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(other) for other in placed):
                    break
            placed.append(text.get_window_extent(renderer).expanded(1.05, 1.1))
