"""Plain-text tables for people, JSON for scripts: the two outputs every ops command has."""

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

MAX_CELL = 60


def cell(value: Any, width: int = MAX_CELL) -> str:
    """A table cell: one line, at most `width` characters."""
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.1f}"
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], empty: str
) -> str:
    """columns: (key, HEADER) pairs. An empty table renders as the `empty` sentence.

    Cells are cut at MAX_CELL characters except in the last column, which has room to the end
    of the line (notes and error messages are read in full).
    """
    if not rows:
        return empty
    last = len(columns) - 1
    grid = [[header for _key, header in columns]]
    grid += [
        [
            cell(row.get(key), 10_000 if i == last else MAX_CELL)
            for i, (key, _h) in enumerate(columns)
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in grid
    )


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def emit(as_json: bool, data: Any, human: str) -> None:
    """Print JSON when asked, else the human rendering."""
    click.echo(to_json(data) if as_json else human)


def duration(seconds: float | int | None) -> str:
    """3d 4h, 2h 5m, 7m 3s, 12s."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def timestamp(epoch: float | None) -> str:
    """A worker's time_start (epoch seconds) as UTC ISO 8601."""
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")
