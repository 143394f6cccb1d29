"""Where output goes: human-facing text to stderr, machine-readable results to stdout."""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

err_console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    """Silence logs and progress (errors still print)."""
    err_console.quiet = quiet


def log(message: str) -> None:
    """A log line; ``message`` is rich markup, so user-supplied parts go through ``esc``. Not wrapped
    at the console width (the terminal wraps; a log file keeps one line per message)."""
    err_console.print(message, highlight=False, soft_wrap=True)


def esc(value: object) -> str:
    """A user-supplied string (file name, class name, dataset name) made safe for rich markup:
    ``x[/b]y.png`` and ``br[ack]ets`` print as they are, never as tags."""
    return escape(str(value))


def print_table(table: Table, *, keep: int = 1, console: Console | None = None) -> None:
    """Print ``table`` readably at the console's width: never cut characters (cells fold), and when
    the columns do not fit side by side, print them as several tables, each repeating the first
    ``keep`` columns (e.g. the class or variant name)."""
    console = console or err_console
    for column in table.columns:
        column.overflow, column.no_wrap = "fold", False
    keys, rest = table.columns[:keep], table.columns[keep:]
    if len(rest) <= 1 or _natural_width(console, table) <= console.width:
        console.print(table)
        return
    chunks: list[list] = [[]]
    for column in rest:
        if chunks[-1] and _natural_width(console, _subtable(table, keys + chunks[-1] + [column])) > console.width:
            chunks.append([])
        chunks[-1].append(column)
    for number, chunk in enumerate(chunks, start=1):
        console.print(_subtable(table, keys + chunk, part=f" ({number}/{len(chunks)})"))


def _natural_width(console: Console, table: Table) -> int:
    return console.measure(table, options=console.options.update(width=10_000)).maximum


def _subtable(table: Table, columns: list, part: str = "") -> Table:
    """A copy of ``table`` with only ``columns`` (rows, sections and styles kept)."""
    title = table.title
    if part and title is not None:
        title = title + part if isinstance(title, str) else Text.assemble(title, part)
    sub = Table(title=title, caption=table.caption, box=table.box, show_header=table.show_header,
                show_lines=table.show_lines, title_justify=table.title_justify, header_style=table.header_style,
                padding=table.padding)
    cells = []
    for column in columns:
        sub.add_column(column.header, justify=column.justify, style=column.style, header_style=column.header_style,
                       vertical=column.vertical, min_width=column.min_width, max_width=column.max_width,
                       overflow="fold")
        cells.append(list(column.cells))
    for index, row in enumerate(table.rows):
        sub.add_row(*(column_cells[index] for column_cells in cells), style=row.style, end_section=row.end_section)
    return sub


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: undefined metrics become null rather than a non-standard token.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(obj: Any, *, compact: bool = False) -> None:
    """Write one JSON document (or one JSON line when ``compact``) to stdout."""
    text = json.dumps(_json_safe(obj), indent=None if compact else 2, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
