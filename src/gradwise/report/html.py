"""One self-contained HTML page from run directories and the comparison directories built on them.

The page needs nothing but a browser: plots are inlined as base64 ``data:`` URIs,
the style sheet is inline, and there is no script, web font or link to fetch.
What a directory holds decides how it is shown (see :func:`directory_kind`): a
run (``config.yaml`` + ``metrics.jsonl``/``summary.json``), a variants parent
(``comparison.json`` rows), a sweep (``trials.json``/``trials.md``, ``best.yaml``),
a multi-seed compare (``compare.json``) or a compression (``comparison.json`` with
``rows`` and ``pareto.png``). Tables are taken from the Markdown file each tool
writes for people (their own formatting, e.g. ``mean ± std``), or from its JSON
when the Markdown is missing (see :mod:`gradwise.report.tables`). All text from the
directories is HTML-escaped.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from gradwise.config import monitor_mode
from gradwise.errors import ConfigError
from gradwise.report.tables import _STATUS_CLASS, _e, _fmt, json_table, markdown_to_html
from gradwise.store.files import atomic_write_text

_RUN_PLOTS = {
    "loss.png": "Loss: training (raw and smoothed) and evaluation splits",
    "metrics.png": "Evaluation metrics",
    "lr.png": "Learning rate (and batch size when it changes)",
    "confusion.png": "Confusion matrix",
}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class _Section:
    """One entry of the table of contents and its HTML."""

    anchor: str
    title: str
    kind: str
    status: str
    headline: str
    body: str
    depth: int = 0


def directory_kind(path: Path) -> str | None:
    """``"sweep"``, ``"compare"``, ``"compression"``, ``"variants"``, ``"run"``, or None for anything else."""
    if (path / "trials.json").is_file() or (path / "trials.md").is_file():
        return "sweep"
    if (path / "compare.json").is_file():
        return "compare"
    if (path / "comparison.json").is_file():
        data = _read_json(path / "comparison.json")
        return "compression" if isinstance(data, dict) and "rows" in data else "variants"
    if (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "summary.json").is_file()):
        return "run"
    return None


def write_report(paths: list[Path], out: Path) -> Path:
    """Write one HTML page showing every directory in ``paths``, in order, with a table of contents.

    Run directories whose ``plots/`` PNGs are missing or older than ``metrics.jsonl``
    get them (re)drawn by :func:`gradwise.report.plots.write_run_plots` first.

    Args:
        paths: Run directories and comparison directories (variants parent, sweep, compare, ``RUN/compressed``).
        out: The HTML file to write (parent directories are created).

    Returns:
        ``out``.

    Raises:
        ConfigError: ``paths`` is empty, or a path is not a run or comparison directory.
    """
    if not paths:
        raise ConfigError("report: give at least one run or comparison directory")
    kinds = []
    for path in map(Path, paths):
        kind = directory_kind(path) if path.is_dir() else None
        if kind is None:
            what = "not found" if not path.exists() else "not a run or comparison directory"
            raise ConfigError(
                f"{path}: {what} (expected config.yaml with metrics.jsonl or summary.json, "
                "comparison.json, trials.json or compare.json)"
            )
        kinds.append((path, kind))
    anchors: set[str] = set()
    sections = [s for path, kind in kinds for s in _sections(path, kind, anchors, 0)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Non-ASCII as character references: the file reads the same whatever encoding a viewer guesses.
    atomic_write_text(out, _page(sections, [p for p, _ in kinds]).encode("ascii", "xmlcharrefreplace").decode())
    return out


def _sections(path: Path, kind: str, anchors: set[str], depth: int) -> list[_Section]:
    builders = {
        "run": _run_sections,
        "variants": _variants_sections,
        "sweep": _sweep_sections,
        "compare": _compare_sections,
        "compression": _compression_sections,
    }
    return builders[kind](path, anchors, depth)


def _run_sections(run_dir: Path, anchors: set[str], depth: int) -> list[_Section]:
    summary = _read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    config_text = _read_text(run_dir / "config.yaml")
    status = str(summary.get("status") or "unfinished")
    note = "" if summary else "<p class=note>No summary.json: the run is still going or was killed.</p>"
    reason = summary.get("stop_reason")
    parts = [f"<p class=path>{_e(run_dir)}</p>", note]
    if reason:
        parts.append(f"<p>Stopped: <strong>{_e(reason)}</strong></p>")
    description = _config_description(config_text)
    if description:
        parts.append(f"<p class=description>{_e(description)}</p>")
    parts += [_facts(summary), _metrics_table(summary), _run_figures(run_dir)]
    parts.append(f"<details><summary>config.yaml (the resolved config)</summary><pre>{_e(config_text)}</pre></details>")
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    headline = (
        f"best {summary.get('monitor')} {_fmt(best['value'])} @ step {best.get('step')}"
        if _is_number(best.get("value"))
        else ""
    )
    section = _Section(_anchor(run_dir.name, anchors), run_dir.name, "run", status, headline, "".join(parts), depth)
    found = [section]
    if directory_kind(run_dir / "compressed") == "compression":
        found += _compression_sections(run_dir / "compressed", anchors, depth + 1)
    return found


def _facts(summary: dict[str, Any]) -> str:
    facts = []
    best = summary.get("best")
    if isinstance(best, dict) and _is_number(best.get("value")):
        mode = summary.get("mode", "")
        value = f"{_fmt(best['value'])} @ step {best['step']}"
        facts.append((f"best {summary.get('monitor')} ({mode} is best)", value))
    if _is_number(summary.get("steps")):
        epochs = f" ({_fmt(summary['epochs'])} epochs)" if _is_number(summary.get("epochs")) else ""
        facts.append(("optimizer steps", f"{summary['steps']:,}{epochs}"))
    if _is_number(summary.get("wall_time_s")):
        facts.append(("wall time", _duration(summary["wall_time_s"])))
    if _is_number(summary.get("examples_per_s")):
        facts.append(("throughput", f"{summary['examples_per_s']:,.0f} examples/s"))
    if _is_number(summary.get("parameters")):
        facts.append(("parameters", f"{summary['parameters']:,}"))
    trainable = summary.get("trainable_parameters")
    if _is_number(trainable) and trainable != summary.get("parameters"):
        facts.append(("trainable parameters", f"{trainable:,}"))
    if _is_number(summary.get("sparsity")) and summary["sparsity"] > 0:
        facts.append(("sparsity (weight matrices)", f"{summary['sparsity']:.4f}"))
    for key in ("optimizer", "schedule", "data", "task", "device"):
        if summary.get(key):
            facts.append((key, str(summary[key])))
    cards = "".join(f"<div class=fact><span>{_e(k)}</span><b>{_e(v)}</b></div>" for k, v in facts)
    return f"<div class=facts>{cards}</div>" if cards else ""


def _metrics_table(summary: dict[str, Any]) -> str:
    """One row per metric: its value at the best step and at the end, per split."""
    final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    splits: list[str] = []
    bases: list[str] = []
    for key in [*best, *final]:
        split, _, base = key.partition("_")
        if base and split in ("val", "test", "train") and (_is_number(final.get(key)) or _is_number(best.get(key))):
            splits += [split] if split not in splits else []
            bases += [base] if base not in bases else []
    if not bases:
        return ""
    columns = []
    if any(f"{s}_{b}" in best for s in splits for b in bases):
        columns.append((f"best step ({best.get('step')})", best, "val"))
    columns += [(f"final {s}", final, s) for s in splits]
    head = "".join(f"<th class=num>{_e(title)}</th>" for title, _, _ in columns)
    rows = []
    for base in bases:
        cells = "".join(f"<td class=num>{_fmt(values.get(f'{split}_{base}'))}</td>" for _, values, split in columns)
        rows.append(f"<tr><th scope=row>{_e(base)}</th>{cells}</tr>")
    caption = f"<caption>Metrics (monitored: {_e(summary.get('monitor', '?'))})</caption>"
    return f"<table class=metrics>{caption}<thead><tr><th>metric</th>{head}</tr></thead>{''.join(rows)}</table>"


def _run_figures(run_dir: Path) -> str:
    plots = run_dir / "plots"
    if plots.is_symlink():  # a shared run directory is untrusted: never drawn into, nor read, through a link
        return f"<p class=note>{_e(plots)} is a symbolic link; its plots are neither drawn nor shown.</p>"
    note = ""
    standard = [plots / name for name in _RUN_PLOTS]
    drawn = [p for p in standard if p.is_file()]
    metrics = run_dir / "metrics.jsonl"
    stale = metrics.is_file() and bool(drawn) and metrics.stat().st_mtime > max(p.stat().st_mtime for p in drawn)
    if not drawn or stale:
        from gradwise.report.plots import write_run_plots  # matplotlib only when a plot must be drawn

        try:
            write_run_plots(run_dir)
        except OSError as exc:
            note = f"<p class=note>Plots could not be (re)drawn: {_e(exc)}</p>"
    extra = sorted(p for p in plots.glob("*.png") if p.name not in _RUN_PLOTS) if plots.is_dir() else []
    figures = [_figure(p, _RUN_PLOTS.get(p.name, p.stem)) for p in [*standard, *extra] if p.is_file()]
    return note + (f"<div class=grid>{''.join(figures)}</div>" if figures else "<p class=note>No plots.</p>")


def _variants_sections(parent: Path, anchors: set[str], depth: int) -> list[_Section]:
    rows = _read_json(parent / "comparison.json")
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    labels = [str(r["variant"]) for r in rows if "variant" in r]
    if not labels:
        labels = sorted(d.name for d in parent.iterdir() if d.is_dir() and directory_kind(d) == "run")
    headline = f"{len(labels)} variants"
    best_key = next((k for r in rows for k in r if k.startswith("best_") and k != "best_step"), None)
    scored = [r for r in rows if best_key and _is_number(r.get(best_key))]
    if best_key and scored:
        pick = max if monitor_mode(best_key.removeprefix("best_"), "auto") == "max" else min
        winner = pick(scored, key=lambda r: r[best_key])
        headline += f"; best: {winner.get('variant')} ({best_key.removeprefix('best_')} {_fmt(winner[best_key])})"
    body = _tables(parent / "comparison.md", rows) + _figure(parent / "comparison.png", "Variants compared")
    anchor = _anchor(parent.name, anchors)
    found = [_Section(anchor, parent.name, "variants", _overall_status(rows), headline, body, depth)]
    for label in labels:
        if directory_kind(parent / label) == "run":
            found += _run_sections(parent / label, anchors, depth + 1)
    return found


def _sweep_sections(sweep: Path, anchors: set[str], depth: int) -> list[_Section]:
    data = _read_json(sweep / "trials.json")
    trials = data.get("trials") if isinstance(data, dict) else data
    trials = [t for t in trials if isinstance(t, dict)] if isinstance(trials, list) else []
    states: dict[str, int] = {}
    for trial in trials:
        state = str(trial.get("state", "?"))
        states[state] = states.get(state, 0) + 1
    headline = f"{len(trials)} trials ({', '.join(f'{n} {s}' for s, n in states.items())})" if trials else ""
    scored = [t for t in trials if _is_number(t.get("value")) and str(t.get("state", "COMPLETE")).upper() == "COMPLETE"]
    if scored:
        pick = max if _sweep_mode(sweep, data) == "max" else min
        best = pick(scored, key=lambda t: t["value"])
        headline += f"; best value {_fmt(best['value'])} (trial {best.get('trial', best.get('number', '?'))})"
    body = _tables(sweep / "trials.md", trials) + _figure(sweep / "trials.png", "Objective per trial and running best")
    if (sweep / "best.yaml").is_file():
        body += (
            "<details open><summary>best.yaml: the best trial as a ready-to-run recipe "
            "(<code>gradwise train best.yaml</code>)</summary>"
            f"<pre>{_e(_read_text(sweep / 'best.yaml'))}</pre></details>"
        )
    return [_Section(_anchor(sweep.name, anchors), sweep.name, "sweep", "", headline, body, depth)]


def _sweep_mode(sweep: Path, data: Any) -> str:
    direction = str(data.get("direction", "")) if isinstance(data, dict) else ""
    if not direction:  # the sweep's own record (sweep.json) says it when trials.json is a plain list
        record = _read_json(sweep / "sweep.json")
        direction = str(record.get("direction", "")) if isinstance(record, dict) else ""
    if direction in ("maximize", "minimize"):
        return direction[:3]
    for trial_dir in sorted(sweep.glob("trial-*")):
        summary = _read_json(trial_dir / "summary.json")
        if isinstance(summary, dict) and summary.get("mode") in ("min", "max"):
            return str(summary["mode"])
    return "max"


def _compare_sections(compare: Path, anchors: set[str], depth: int) -> list[_Section]:
    data = _read_json(compare / "compare.json")
    rows = data.get("strategies", data.get("rows")) if isinstance(data, dict) else data
    if isinstance(rows, dict):  # strategy -> statistics
        rows = [{"strategy": k, **v} if isinstance(v, dict) else {"strategy": k, "value": v} for k, v in rows.items()]
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    seeds = data.get("seeds") if isinstance(data, dict) else None
    headline = f"{len(rows)} strategies" + (f" × {seeds} seeds" if _is_number(seeds) else "") if rows else ""
    body = _tables(compare / "compare.md", rows) + _figure(compare / "compare.png", "Strategies over seeds")
    return [_Section(_anchor(compare.name, anchors), compare.name, "compare", "", headline, body, depth)]


def _compression_sections(compressed: Path, anchors: set[str], depth: int) -> list[_Section]:
    data = _read_json(compressed / "comparison.json")
    rows = data.get("rows") if isinstance(data, dict) else None
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    counts: dict[str, int] = {}
    for row in rows[1:]:  # the first row is the source run
        counts[str(row.get("status"))] = counts.get(str(row.get("status")), 0) + 1
    headline = f"{len(rows) - 1 if rows else 0} variants" + "".join(f", {n} {s}" for s, n in counts.items())
    title = f"{compressed.parent.name}/{compressed.name}"
    body = _tables(compressed / "comparison.md", rows) + _figure(compressed / "pareto.png", "Quality vs speed and size")
    status = "rejected" if counts and set(counts) == {"rejected"} else ""
    return [_Section(_anchor(title, anchors), title, "compression", status, headline, body, depth)]


def _overall_status(rows: list[dict[str, Any]]) -> str:
    statuses = {str(r.get("status")) for r in rows if r.get("status")}
    return statuses.pop() if len(statuses) == 1 else ("mixed" if statuses else "")


def _tables(markdown: Path, rows: list[dict[str, Any]]) -> str:
    """The tool's own Markdown rendered, or a table of its JSON rows when there is no Markdown."""
    if markdown.is_file():
        return f"<div class=md>{markdown_to_html(_read_text(markdown))}</div>"
    return json_table(rows) if rows else "<p class=note>No table found.</p>"


def _figure(path: Path, caption: str) -> str:
    """A PNG inlined as a data URI, sized by its own header; nothing when the file is missing."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    size = ""
    if data.startswith(_PNG_MAGIC) and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        size = f" width={width} height={height}"
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{source}" alt="{_e(caption)}"{size}>'
        f"<figcaption>{_e(caption)} <span class=path>({_e(path.name)})</span></figcaption></figure>"
    )


def _page(sections: list[_Section], paths: list[Path]) -> str:
    names = ", ".join(p.name for p in paths)
    title = f"gradwise report: {names if len(names) <= 80 else names[:77] + '...'}"
    toc_rows = "".join(
        f"<tr><td style='padding-left:{0.6 + 1.4 * s.depth:.1f}em'><a href='#{s.anchor}'>{_e(s.title)}</a></td>"
        f"<td>{_e(s.kind)}</td><td>{_badge(s.status)}</td><td>{_e(s.headline)}</td></tr>"
        for s in sections
    )
    toc = (
        "<nav><h2>Contents</h2><table class=toc><thead><tr><th>section</th><th>kind</th><th>status</th>"
        f"<th>at a glance</th></tr></thead><tbody>{toc_rows}</tbody></table></nav>"
    )
    body = "".join(
        f"<section id='{s.anchor}' class='depth{min(s.depth, 2)}'><h2>{_e(s.title)} <small>{_e(s.kind)}</small> "
        f"{_badge(s.status)}</h2>{s.body}<p class=top><a href='#top'>back to contents</a></p></section>"
        for s in sections
    )
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><header id=top><h1>{_e(title)}</h1>"
        f"<p>{len(sections)} sections from {len(paths)} director{'y' if len(paths) == 1 else 'ies'}; "
        f"written {stamp}. Self-contained: works offline.</p></header><main>{toc}{body}</main></body></html>\n"
    )


def _badge(status: str) -> str:
    if not status:
        return ""
    return f"<span class='badge {_STATUS_CLASS.get(status.lower(), 'neutral')}'>{_e(status.replace('_', ' '))}</span>"


def _anchor(title: str, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, n = base, 1
    while anchor in taken:
        n += 1
        anchor = f"{base}-{n}"
    taken.add(anchor)
    return anchor


def _config_description(config_text: str) -> str:
    try:
        raw = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return ""
    return str(raw.get("description") or "") if isinstance(raw, dict) else ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_CSS = """
:root{--fg:#1d2330;--muted:#5d6678;--line:#dde2ea;--bg:#f5f7fa;--card:#fff;--accent:#2f6fde}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header{background:#1f2a44;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:24px;font-weight:600}
header p{margin:0;color:#c5cde0;font-size:14px}
main{max-width:1500px;margin:0 auto;padding:20px 32px 40px}
nav,section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 24px;
margin:0 0 22px;box-shadow:0 1px 2px rgba(20,30,50,.05)}
section.depth1{margin-left:28px;border-left:4px solid #9db8ea}
section.depth2{margin-left:56px;border-left:4px solid #c9d8f3}
h2{margin:0 0 10px;font-size:20px;font-weight:600}
h2 small{font-size:13px;font-weight:500;color:var(--muted);text-transform:uppercase;letter-spacing:.05em;
margin-left:6px}
h3,h4,h5,h6{margin:14px 0 6px}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
.path{color:var(--muted);font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;margin:0 0 8px}
.description{font-style:italic}
.note{color:#8a5a00;background:#fff6e0;border-radius:6px;padding:6px 10px}
.badge{display:inline-block;font-size:12px;font-weight:600;border-radius:999px;padding:2px 10px;
vertical-align:middle;text-transform:lowercase}
.ok{background:#dcf3e3;color:#17663a}.info{background:#dde9fb;color:#1d4f9c}.warn{background:#fff0cc;color:#845b00}
.bad{background:#fbdfe0;color:#a0262d}.neutral{background:#eceff4;color:#4a5262}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.fact{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:7px 12px;min-width:130px}
.fact span{display:block;font-size:12px;color:var(--muted)}
.fact b{font-size:16px;font-weight:600}
.scroll{overflow-x:auto;margin:10px 0}
table{border-collapse:collapse;font-size:14px;margin:10px 0}
caption{text-align:left;font-weight:600;padding:4px 0;color:var(--muted)}
th,td{border-bottom:1px solid var(--line);padding:5px 12px;text-align:left;white-space:nowrap}
thead th{background:#eef2f8;font-weight:600;border-bottom:2px solid #c8d0de}
tbody tr:nth-child(even){background:#fafbfd}
tbody tr:hover{background:#eef4ff}
.num{text-align:right;font-variant-numeric:tabular-nums}
table.toc{width:100%}
table.toc td:last-child{white-space:normal;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:16px;margin:14px 0}
figure{margin:12px 0;text-align:center}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
figcaption{font-size:13px;color:var(--muted);margin-top:4px}
details{margin:12px 0;border:1px solid var(--line);border-radius:8px;background:var(--bg)}
details summary{cursor:pointer;padding:8px 12px;font-weight:600}
pre{margin:0;padding:10px 14px;max-height:480px;overflow:auto;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,
Consolas,monospace;background:#fff;border-top:1px solid var(--line)}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f6;padding:1px 4px;
border-radius:4px}
.top{text-align:right;font-size:13px;margin:6px 0 0}
"""
