"""HTML tables for the report: the Markdown the gradwise tools write, and tables of JSON records.

:func:`markdown_to_html` renders the small Markdown subset the tools write for
people (pipe tables, headings, bullet lists, paragraphs, `code`, **bold**);
:func:`json_table` shows JSON records when a tool's Markdown is missing. In both,
numeric cells are right-aligned and status words (completed, pruned, rejected...)
become coloured badges. Every piece of text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import re
from itertools import groupby
from typing import Any

_NUMERIC = re.compile(r"[-+−]?(\d[\d,]*\.?\d*|\.\d+)([eE][-+]?\d+)?%?(\s*(±|\(|×).*)?")
_STATUS_CLASS = {
    "completed": "ok",
    "accepted": "ok",
    "source": "ok",
    "complete": "ok",
    "early_stopped": "info",
    "pruned": "info",
    "stopped": "warn",
    "running": "warn",
    "failed": "bad",
    "fail": "bad",
    "rejected": "bad",
}


def markdown_to_html(text: str) -> str:
    """The Markdown subset the gradwise tools write: pipe tables, headings, bullet lists, paragraphs, `code`, **bold**.

    Args:
        text: Markdown text.

    Returns:
        HTML; every piece of text is escaped.
    """

    def kind(line: str) -> str:
        line = line.strip()
        if line.startswith("|"):
            return "table"
        if line.startswith(("- ", "* ")):
            return "list"
        return "heading" if line.startswith("#") else "text" if line else "blank"

    out = []
    for block_kind, group in groupby(text.splitlines(), key=kind):
        lines = [line.strip() for line in group]
        if block_kind == "table":
            out.append(_markdown_table(lines))
        elif block_kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>")
        elif block_kind == "heading":
            for line in lines:
                level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # below the section's own <h2>
                out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif block_kind == "text":
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "".join(out)


def _markdown_table(lines: list[str]) -> str:
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip("|"))] for line in lines]
    rows = [row for row in rows if not all(re.fullmatch(r":?-{2,}:?", cell) for cell in row if cell)]
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td{_num_class(cell)}>{_cell_status(_inline(cell))}</td>" for cell in row) + "</tr>"
        for row in rows[1:]
    )
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def json_table(rows: list[dict[str, Any]]) -> str:
    """An HTML table of JSON records; nested objects become dotted columns (``params.optim.lr``).

    Args:
        rows: The records, one per table row; the columns are every key in first-seen order.

    Returns:
        HTML; every piece of text is escaped.
    """
    flat = [_flatten(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    head = "".join(f"<th>{_e(col)}</th>" for col in columns)
    body = ""
    for row in flat:
        cells = [_fmt(row.get(col)) for col in columns]
        body += "<tr>" + "".join(f"<td{_num_class(html.unescape(c))}>{_cell_status(c)}</td>" for c in cells) + "</tr>"
    return f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _cell_status(cell: str) -> str:
    """A table cell that is a status word (accepted, PRUNED, completed...) as a coloured badge, its text unchanged."""
    kind = _STATUS_CLASS.get(cell.lower())
    return f"<span class='badge {kind}'>{cell}</span>" if kind else cell


def _inline(text: str) -> str:
    escaped = _e(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _num_class(cell: str) -> str:
    return " class=num" if cell and _NUMERIC.fullmatch(cell.strip()) else ""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return _e(", ".join(str(v) for v in value))
    return _e(value if isinstance(value, str) else json.dumps(value))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
